"""Helpers of the issue-15 tests: a farm's catalog and store in a folder, adapters published the way a worker's
publish step does (spec in the provenance, training data content-addressed in the store), without training."""

from __future__ import annotations

from pathlib import Path

from farm.catalog.migrate import upgrade_database
from farm.catalog.session import create_all
from farm.settings import FarmSettings
from tests.fixtures.api import publish_test_adapter


def farm_settings(root: Path, database_url: str | None = None, *, migrate: bool = False, **extra) -> FarmSettings:
    """Settings of a farm living under `root`: a SQLite catalog made from the models (or migrated to head by
    Alembic with `migrate`, as `farm db upgrade` does), a file:// store."""
    root.mkdir(parents=True, exist_ok=True)
    fields = dict(home=root / "home", database_url=database_url or f"sqlite:///{root}/catalog.db",
                  store_url=f"file://{root}/store", work_dir=root / "work", cache_dir=root / "cache")
    settings = FarmSettings(**{**fields, **extra})
    (upgrade_database if migrate else create_all)(settings.database_url)
    return settings


def cli(settings: FarmSettings, *args: str, env: dict | None = None):
    """Run `farm ARGS` in this process against the farm of `settings` (typer's CliRunner); returns its Result.
    FarmErrors propagate as exceptions here: the exit codes of main() are checked by subprocess tests."""
    from typer.testing import CliRunner

    from farm.cli.main import app
    from farm.settings import get_settings

    full = {"FARM_DATABASE_URL": settings.database_url, "FARM_STORE_URL": settings.store_url,
            "FARM_HOME": str(settings.home), "FARM_API_URL": None, **(env or {})}
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(app, list(args), env=full, catch_exceptions=False)
    finally:
        get_settings.cache_clear()


def publish(settings: FarmSettings, name: str, files: dict[str, bytes], *, spec: dict | None = None,
            dataset: Path | None = None, base_model: str = "org/tiny", parent_id: int | None = None) -> int:
    """Publish `files` as the next version of `name`, its spec in the provenance and `dataset` (a local JSONL) in
    the store; returns the version."""
    from farm.service import store_dataset

    spec = {"kind": "train", "name": name, "base_model": base_model, **(spec or {})}
    dataset_uri = None
    if dataset is not None:
        fmt = (spec.get("dataset") or {}).get("format", "chat")
        dataset_uri = store_dataset(dataset, fmt, settings=settings).uri
        spec["dataset"] = {"path": dataset_uri, "format": fmt}
    return publish_test_adapter(settings, name, files, spec=spec, base_model=base_model, dataset_uri=dataset_uri,
                                parent_id=parent_id, train_loss=1.25)


def small_files(seed: str) -> dict[str, bytes]:
    """A small artifact's files (bytes differ per seed)."""
    import hashlib

    return {
        "adapter_config.json": f'{{"r": 4, "seed": "{seed}"}}'.encode(),
        "adapter_model.safetensors": hashlib.sha256(seed.encode()).digest() * 2048,
        "README.md": f"# {seed}\n".encode(),
    }
