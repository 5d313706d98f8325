"""One router per resource; every route calls farm.service (or reads the store for file downloads)."""
