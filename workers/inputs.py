"""Fetch a job's inputs to local disk for the runner: models, datasets, the parent adapter, the latest checkpoint."""

from __future__ import annotations

import hashlib
from pathlib import Path

from farm.service import STORE_REF
from farm.settings import FarmSettings


def _store(settings: FarmSettings, url: str | None = None):
    from farm.store import open_store

    return open_store(url or settings.store_url, settings)


def fetch_model(ref: str, settings: FarmSettings) -> str:
    """A local directory for `ref`: local paths as they are, s3:// prefixes cached, hub ids passed through."""
    if ref.startswith("s3://"):
        from farm.store.transfer import download_prefix

        dest = settings.cache_dir / "models" / hashlib.sha256(ref.encode()).hexdigest()[:16]
        if not dest.exists():
            download_prefix(_store(settings, ref), "", dest)
        return str(dest)
    return ref  # a local dir, or a hub id that transformers resolves from its (offline) cache


def fetch_dataset(ref: str, settings: FarmSettings) -> str:
    """A local copy of a store:datasets/<sha256>.jsonl dataset, cached by its digest."""
    if not ref.startswith(STORE_REF):
        return ref
    key = ref[len(STORE_REF):]
    dest = settings.cache_dir / key
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(".part")
        info = _store(settings).get_file(key, tmp)
        expected = Path(key).stem
        if info.sha256 != expected:
            tmp.unlink(missing_ok=True)
            from farm.errors import ChecksumMismatch

            raise ChecksumMismatch(f"dataset {key}: sha256 {info.sha256} does not match its name")
        tmp.replace(dest)
    return str(dest)


def fetch_checkpoint(prefix: str, dest: Path, settings: FarmSettings) -> Path:
    """Download a checkpoint folder from the store (checked against its checksums.json)."""
    from farm.store.transfer import download_prefix

    download_prefix(_store(settings), prefix, dest)
    return dest


def fetch_adapter(ref: str, dest: Path, settings: FarmSettings) -> Path:
    """Pull a published adapter (verified) to continue training from it."""
    from farm.service import pull_adapter

    pull_adapter(ref, dest, settings=settings)
    return dest
