"""Fetch a job's inputs to local disk for the runner: models, datasets, the parent adapter, the latest checkpoint.

`write_job_file` fetches what the job's kind declares (farm/kinds.py) and writes the runner's job file
(farm/runner_protocol.py) into the attempt's folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from farm.kinds import all_kinds, require_kind, spec_field
from farm.names import is_store_ref, store_key
from farm.settings import FarmSettings


def _store(settings: FarmSettings, url: str | None = None):
    from farm.store import open_store

    return open_store(url or settings.store_url, settings)


def fetch_model(ref: str, settings: FarmSettings, revision: str | None = None):
    """A local folder for `ref` (farm.model_fetch: local paths as they are, Hub ids through snapshot_download,
    s3:// prefixes and farm:NAME:V merged models through the content-keyed model cache); a FetchedModel."""
    from farm.model_fetch import fetch_base_model

    return fetch_base_model(ref, settings, revision=revision)


def fetch_dataset(ref: str, settings: FarmSettings) -> str:
    """A local copy of a store:datasets/<sha256>.jsonl dataset, cached by its digest."""
    if not is_store_ref(ref):
        return ref
    key = store_key(ref)
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


def _fetch(fetch: str, ref: str, attempt_dir: Path, job_key: str, settings: FarmSettings, doc: dict) -> str:
    if fetch == "model":  # the resolved revision and whether it was downloaded go to the provenance
        revision = doc["spec"].get("base_revision") if job_key == "base_model" else None
        got = fetch_model(ref, settings, revision=revision)
        doc[f"{job_key}_revision"], doc[f"{job_key}_source"] = got.revision, got.source
        doc[f"{job_key}_fetch"] = {"source": got.source, "downloaded": got.downloaded, "cache_key": got.revision}
        return str(got.path)
    if fetch == "dataset":
        return fetch_dataset(ref, settings)
    return str(fetch_adapter(ref, attempt_dir / "adapters" / job_key, settings))


def write_job_file(attempt_dir: Path, job_id: str, attempt: int, spec: dict, checkpoint: tuple[str, int] | None,
                   settings: FarmSettings) -> tuple[Path, dict]:
    """Make a fresh attempt folder, fetch the inputs the job's kind declares, write job.json; returns its path and
    content. `checkpoint` is the (prefix, step) of the latest checkpoint to resume from, if any."""
    if attempt_dir.exists():
        shutil.rmtree(attempt_dir)
    (attempt_dir / "output").mkdir(parents=True)
    (attempt_dir / "checkpoints").mkdir()
    kind = require_kind(spec.get("kind"))
    doc = {"job_id": job_id, "attempt": attempt, "spec": spec}
    # every input key of every kind is present (null when unused), so the job file has one shape
    doc.update({i.job_key: None for k in all_kinds() for i in k.inputs})
    doc.update({"resume_from": None, "resume_step": None, "output_dir": str(attempt_dir / "output"),
                "checkpoint_dir": str(attempt_dir / "checkpoints")})
    for needed in kind.inputs:
        ref = spec_field(spec, needed.field)
        if ref:
            doc[needed.job_key] = _fetch(needed.fetch, ref, attempt_dir, needed.job_key, settings, doc)
    if checkpoint is not None:
        prefix, step = checkpoint
        doc["resume_from"] = str(fetch_checkpoint(prefix, attempt_dir / "resume" / f"step-{step}", settings))
        doc["resume_step"] = step
    job_file = attempt_dir / "job.json"
    job_file.write_text(json.dumps(doc, indent=2))
    return job_file, doc
