"""Alembic environment of the farm's catalog.

The URL is the one in the Alembic config when given (``farm db upgrade`` and the tests set it through
``farm.catalog.migrate``), else ``FARM_DATABASE_URL`` from the farm's settings. The metadata is the models'.
"""

from __future__ import annotations

from logging.config import fileConfig
from pathlib import Path

from alembic import context
from sqlalchemy import create_engine, pool
from sqlalchemy.engine import make_url

from farm.catalog.models import Base, UTCDateTime

config = context.config

# Only the `alembic` command line has an ini file; a programmatic upgrade must leave the caller's logging alone.
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def database_url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from farm.settings import get_settings

    return get_settings().database_url


def render_item(type_: str, obj, autogen_context):
    """Autogenerate writes the farm's UTC timestamp as a plain SQLAlchemy type, so revisions never import the farm."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def configure(**kwargs) -> None:
    context.configure(
        target_metadata=target_metadata,
        render_item=render_item,
        compare_type=True,
        **kwargs,
    )


def run_migrations_offline() -> None:
    """`alembic upgrade head --sql`: print the SQL instead of running it."""
    url = database_url()
    configure(url=url, literal_binds=True, dialect_opts={"paramstyle": "named"},
              render_as_batch=make_url(url).get_backend_name() == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = make_url(database_url())
    connect_args = {}
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        # Wait for workers' write transactions instead of failing at once with "database is locked".
        connect_args["timeout"] = 30
    # Not the farm's pooled engine: that one turns SQLite foreign keys on, and a batch migration that rebuilds a
    # table (copy, DROP, rename) would then fire ON DELETE CASCADE and empty the tables that point at it.
    engine = create_engine(url, poolclass=pool.NullPool, connect_args=connect_args)
    try:
        with engine.connect() as connection:
            configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
