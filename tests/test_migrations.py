"""Alembic migrations of the catalog, on SQLite and PostgreSQL: head is exactly the models' schema."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData, create_engine, inspect, pool, text
from sqlalchemy.engine import make_url

from farm.catalog import repository as repo
from farm.catalog.migrate import (
    current_revision,
    downgrade_database,
    head_revision,
    migrations_dir,
    upgrade_database,
)
from farm.catalog.models import Base
from farm.catalog.session import create_all, get_engine, session_scope
from farm.errors import FarmError

REPO_ROOT = Path(__file__).resolve().parents[1]
CATALOG_TABLES = set(Base.metadata.tables)


def _drop_everything(url: str) -> None:
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.begin() as conn:
        found = MetaData()
        found.reflect(conn)
        found.drop_all(conn)
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def blank_url(request, tmp_path):
    """An empty database (no tables at all, not even Alembic's), on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/fresh/catalog.db"  # the folder does not exist yet either
        return
    url = request.getfixturevalue("pg_url")
    get_engine(url).dispose()  # pooled connections of other tests must not hold locks on what we drop
    _drop_everything(url)
    yield url
    _drop_everything(url)


def tables(url: str) -> set[str]:
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as conn:
        names = set(inspect(conn).get_table_names())
    engine.dispose()
    return names


def schema_differences(url: str) -> list:
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    engine.dispose()
    return diffs


def test_upgrade_to_head_creates_exactly_the_models_schema(blank_url):
    assert current_revision(blank_url) is None
    upgrade_database(blank_url)
    assert current_revision(blank_url) == head_revision() is not None
    assert tables(blank_url) == CATALOG_TABLES | {"alembic_version"}
    assert schema_differences(blank_url) == []


def test_the_comparison_would_notice_a_difference(blank_url):
    """Guard for the test above: compare_metadata does see a missing index and a missing table."""
    upgrade_database(blank_url)
    engine = create_engine(blank_url, poolclass=pool.NullPool)
    with engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_jobs_state"))
        conn.execute(text("DROP TABLE adapter_files"))
    engine.dispose()
    found = sorted((d[0], d[1].name) for d in schema_differences(blank_url))
    assert found == [("add_index", "ix_adapter_files_adapter_id"), ("add_index", "ix_jobs_state"),
                     ("add_table", "adapter_files")]


def test_upgrading_twice_changes_nothing(blank_url):
    upgrade_database(blank_url)
    with session_scope(blank_url) as s:
        job_id = repo.create_job(s, kind="train", name="demo", queue="farm.gpu1", spec={}, spec_hash="f" * 64,
                                 max_attempts=3).id
    upgrade_database(blank_url)
    assert current_revision(blank_url) == head_revision()
    assert schema_differences(blank_url) == []
    with session_scope(blank_url) as s:
        assert repo.get_job(s, job_id).state == "queued"
    get_engine(blank_url).dispose()


def test_downgrade_to_base_drops_the_catalog_and_upgrade_restores_it(blank_url):
    upgrade_database(blank_url)
    downgrade_database(blank_url, "base")
    assert current_revision(blank_url) is None
    assert tables(blank_url) <= {"alembic_version"}
    upgrade_database(blank_url)
    assert schema_differences(blank_url) == []


def test_a_catalog_made_from_the_models_is_adopted_at_head(blank_url):
    create_all(blank_url)
    get_engine(blank_url).dispose()
    upgrade_database(blank_url)  # would fail on CREATE TABLE jobs if it did not see the tables were there
    assert current_revision(blank_url) == head_revision()
    assert schema_differences(blank_url) == []


def test_an_unversioned_catalog_that_differs_is_refused_untouched(blank_url):
    engine = create_engine(blank_url, poolclass=pool.NullPool)
    if blank_url.startswith("sqlite"):
        Path(make_url(blank_url).database).parent.mkdir(parents=True)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE jobs (id VARCHAR(32) PRIMARY KEY, note TEXT)"))
    engine.dispose()
    with pytest.raises(FarmError, match=r"has tables but no migration history, and they differ .* new database"):
        upgrade_database(blank_url)
    assert tables(blank_url) == {"jobs"}


@pytest.mark.parametrize("revision", ["nope", "12345678", "", " "])
def test_an_unknown_revision_is_refused_with_the_known_ones(tmp_path, revision):
    url = f"sqlite:///{tmp_path}/catalog.db"
    with pytest.raises(FarmError, match=rf"cannot migrate the catalog to revision '{revision}': .*the newest is '"):
        upgrade_database(url, revision)
    assert current_revision(url) is None
    upgrade_database(url)
    with pytest.raises(FarmError, match=r"cannot migrate the catalog to revision 'nope'"):
        downgrade_database(url, "nope")
    assert current_revision(url) == head_revision()


def test_current_revision_of_a_missing_sqlite_file_is_none_and_creates_nothing(tmp_path):
    assert current_revision(f"sqlite:///{tmp_path}/nowhere/catalog.db") is None
    assert not (tmp_path / "nowhere").exists()


def test_a_password_with_percent_signs_reaches_the_database(pg_url):
    # The test server trusts local connections, so any password works; ConfigParser would choke on '%' unescaped.
    url = make_url(pg_url).set(password="p%ss%(x)s").render_as_string(hide_password=False)
    get_engine(pg_url).dispose()
    _drop_everything(pg_url)
    try:
        upgrade_database(url)
        assert current_revision(url) == head_revision()
    finally:
        _drop_everything(pg_url)


def test_the_migrations_folder_is_found_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FARM_MIGRATIONS_DIR", raising=False)
    assert migrations_dir() == REPO_ROOT / "migrations"
    monkeypatch.setenv("FARM_MIGRATIONS_DIR", str(tmp_path))
    with pytest.raises(FarmError, match=rf"FARM_MIGRATIONS_DIR={tmp_path} holds no Alembic env.py"):
        migrations_dir()


def test_the_alembic_command_line_takes_the_url_from_the_farm_settings(tmp_path):
    url = f"sqlite:///{tmp_path}/cli/catalog.db"
    env = {**os.environ, "FARM_DATABASE_URL": url}
    env.pop("FARM_MIGRATIONS_DIR", None)
    alembic = [sys.executable, "-m", "alembic", "-c", str(REPO_ROOT / "alembic.ini")]
    done = subprocess.run(alembic + ["upgrade", "head"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert current_revision(url) == head_revision()
    assert schema_differences(url) == []
    check = subprocess.run(alembic + ["check"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr  # autogenerate finds nothing left to migrate


def test_the_light_head_check_agrees_with_alembic(blank_url):
    """`is_at_head` (no Alembic import, used before every local command) reads the same head Alembic computes."""
    from farm.catalog.migrate import _head_from_scripts, is_at_head

    assert _head_from_scripts() == head_revision()
    assert not is_at_head(blank_url)  # nothing there yet (and no SQLite file created by asking)
    upgrade_database(blank_url, "37ad681e8932")
    assert not is_at_head(blank_url)
    upgrade_database(blank_url)
    assert is_at_head(blank_url)
