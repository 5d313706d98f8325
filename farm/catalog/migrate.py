"""Bring a catalog database to the models' schema with Alembic (``farm db upgrade``, ``farm up``).

Alembic is imported inside the functions that migrate: a command that only asks whether the catalog is at head
(every local CLI command does, before it touches the catalog) reads the version row and the scripts' revision ids
without it (`is_at_head`), which keeps `farm submit` light.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import create_engine, inspect, pool, text
from sqlalchemy.engine import make_url

from farm.errors import FarmError

if TYPE_CHECKING:
    from alembic.config import Config

# This file is farm/catalog/migrate.py; the repository root, which holds migrations/, is two folders up. An
# editable install (pip install -e .) imports this very file from the checkout, so the same path holds there.
_REPO_MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"


def migrations_dir() -> Path:
    """The Alembic scripts folder: ``FARM_MIGRATIONS_DIR`` when set, else the checkout's ``migrations/``."""
    override = os.environ.get("FARM_MIGRATIONS_DIR")
    if override:
        if not (Path(override) / "env.py").is_file():
            raise FarmError(f"FARM_MIGRATIONS_DIR={override} holds no Alembic env.py: point it at the farm's "
                            "migrations/ folder, or unset it to use the one next to the installed code")
        return Path(override).resolve()
    candidates = [_REPO_MIGRATIONS, Path.cwd() / "migrations"]
    for path in candidates:
        if (path / "env.py").is_file():
            return path.resolve()
    raise FarmError(
        "the catalog's Alembic migrations were not found (looked in "
        + ", ".join(str(p) for p in candidates)
        + "): install the farm from its checkout (pip install -e .) or set FARM_MIGRATIONS_DIR to its migrations/"
    )


def alembic_config(url: str) -> Config:
    """An Alembic config for this database URL, without any ini file (logging is left to the caller)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    # ConfigParser interpolates '%': a URL-encoded password (p%40ss) must reach env.py unchanged.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str | None:
    """The newest revision in the migrations folder."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


_REVISION = re.compile(r"^revision(?:\s*:[^=\n]*)?\s*=\s*['\"](\w+)['\"]", re.M)
_DOWN_REVISION = re.compile(r"^down_revision(?:\s*:[^=\n]*)?\s*=\s*(.*)$", re.M)


def _head_from_scripts() -> str | None:
    """The one revision no script revises, read from the scripts' text (None when that is not one clear id)."""
    revisions, revised = set(), set()
    for script in (migrations_dir() / "versions").glob("*.py"):
        body = script.read_text()
        found = _REVISION.search(body)
        if found is None:
            return None
        revisions.add(found.group(1))
        down = _DOWN_REVISION.search(body)
        revised.update(re.findall(r"['\"](\w+)['\"]", down.group(1)) if down else ())
    heads = revisions - revised
    return heads.pop() if len(heads) == 1 else None


def is_at_head(url: str) -> bool:
    """True when the catalog's recorded revision is the scripts' head; False whenever in doubt (no error raised)."""
    if _missing_sqlite_file(url):
        return False
    try:
        engine = _engine(url)
        try:
            with engine.connect() as conn:
                recorded = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
        finally:
            engine.dispose()
        head = _head_from_scripts()
    except Exception:
        return False
    return head is not None and recorded == [head]


def _engine(url: str):
    return create_engine(url, poolclass=pool.NullPool)


def _missing_sqlite_file(url: str) -> bool:
    parsed = make_url(url)
    return (parsed.get_backend_name() == "sqlite" and bool(parsed.database) and parsed.database != ":memory:"
            and not Path(parsed.database).exists())


def current_revision(url: str) -> str | None:
    """The revision the database is at; None for a database Alembic never touched (or a missing SQLite file)."""
    if _missing_sqlite_file(url):
        return None  # connecting would create an empty file as a side effect
    from alembic.runtime.migration import MigrationContext

    engine = _engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def _adopt_unversioned_catalog(url: str) -> None:
    """A catalog made by ``create_all`` (tests, early versions) has the tables but no Alembic history.

    When its schema is exactly the models' (= head), record head instead of failing on CREATE TABLE; otherwise say
    what differs rather than guess.
    """
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from farm.catalog.models import Base

    if _missing_sqlite_file(url):
        return
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            if not tables & set(Base.metadata.tables) or "alembic_version" in tables:
                return
            diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    finally:
        engine.dispose()
    # Tables of other applications sharing the database are theirs, not a difference in the catalog.
    diffs = [d for d in diffs if not (isinstance(d, tuple) and d[0] == "remove_table"
                                      and d[1].name not in Base.metadata.tables)]
    if diffs:
        raise FarmError(
            f"the catalog at {make_url(url).render_as_string(hide_password=True)} has tables but no migration "
            f"history, and they differ from this farm's models ({len(diffs)} differences, first: {diffs[0]}): "
            "back it up and migrate it by hand, or point FARM_DATABASE_URL at a new database"
        )
    command.stamp(alembic_config(url), "head")


def upgrade_database(url: str, revision: str = "head") -> None:
    """Migrate the catalog at `url` to `revision` (default: the newest). Upgrading an up-to-date one does nothing."""
    from alembic import command

    if revision == "head":
        _adopt_unversioned_catalog(url)
    _run(command.upgrade, url, revision)


def downgrade_database(url: str, revision: str) -> None:
    """Migrate the catalog at `url` down to `revision` ("base" drops every table of the catalog)."""
    from alembic import command

    _run(command.downgrade, url, revision)


def _run(step, url: str, revision: str) -> None:
    from alembic.util import CommandError

    if not revision.strip():
        raise FarmError(f"cannot migrate the catalog to revision {revision!r}: give `head`, `base` or a revision id "
                        f"(the newest is {head_revision()!r})")
    try:
        step(alembic_config(url), revision)
    except CommandError as exc:  # an unknown or ambiguous revision, mostly: say it in the farm's words
        raise FarmError(f"cannot migrate the catalog to revision {revision!r}: {exc} "
                        f"(the newest is {head_revision()!r}; `head` and `base` also work)") from exc
