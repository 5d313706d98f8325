"""The farm's HTTP API (FastAPI): thin routes over farm.service. Build it with `api.app.create_app()`."""
