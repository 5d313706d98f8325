"""The SQL catalog: the truth about jobs and adapters (SQLAlchemy 2.0; SQLite or PostgreSQL)."""
