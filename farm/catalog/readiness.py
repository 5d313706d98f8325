"""Is the catalog there and migrated? Asked before a local command touches it, so that a missing or unmigrated
catalog is one line that says what to run, instead of a stray empty SQLite file and a traceback."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.engine import make_url

from farm.errors import FarmError


class CatalogNotReady(FarmError):
    """The catalog database is missing, unreachable, or not migrated to this farm's schema."""

    code = "catalog_not_ready"
    retryable = False


def check_catalog(url: str, home: Path | None = None) -> None:
    """Raise CatalogNotReady unless the catalog at `url` exists and is at the newest migration.

    Never creates anything: a SQLite file that does not exist is reported, not made.
    """
    from farm.catalog.migrate import is_at_head

    if is_at_head(url):  # the common case, answered without Alembic
        return
    from farm.catalog.migrate import current_revision, head_revision

    parsed = make_url(url)
    shown = parsed.render_as_string(hide_password=True)
    where = f" (FARM_HOME={home})" if home is not None and parsed.get_backend_name() == "sqlite" else ""
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        if not Path(parsed.database).exists():
            raise CatalogNotReady(
                f"no catalog at {parsed.database}{where}: run `farm up` (or `farm db upgrade`) to create it, or point "
                "FARM_HOME / FARM_DATABASE_URL at your farm's")
    try:
        current = current_revision(url)
    except Exception as exc:  # unreachable server, bad credentials, not a database
        raise CatalogNotReady(f"cannot open the catalog at {shown} ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]}); check FARM_DATABASE_URL") from None
    head = head_revision()
    if current != head:
        state = "has no migrations" if current is None else f"is at revision {current}, this farm needs {head}"
        raise CatalogNotReady(f"the catalog at {shown}{where} {state}: run `farm db upgrade`")
