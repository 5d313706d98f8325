"""Dedupe: a job identical in content to one that succeeded or is in flight is not trained again.

Identical in content means: same kind, same resolved spec apart from what does not change the weights (the name,
notify, retrain, description, tags), same base model weights (by hash), same dataset (by digest: a validated spec
names its dataset `store:datasets/<sha256>.jsonl`), same `continue_from` as written (a schedule's
`continue_from: NAME` on unchanged data is the same request every night, whatever NAME's latest version is; a
retraining names its parent's version). The key is stored per job in
`job_lineage.content_key`; `farm submit --force` and replays skip the lookup but still record their key.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from sqlalchemy import select

from farm.catalog.models import READY, RECOVERING, QUEUED, RUNNING, SUCCEEDED, Adapter, Job, JobLineage
from farm.catalog.session import session_scope
from farm.settings import FarmSettings

# Spec fields that say where a result goes or what it is called, not what it is.
NOT_CONTENT = ("name", "notify", "retrain", "description", "tags")
# In flight: queued, running or waiting for another attempt. A cancelling job is on its way out.
DEDUPE_STATES = (QUEUED, RUNNING, RECOVERING, SUCCEEDED)

_hash_cache: dict[tuple, str] = {}


def base_model_hash(ref: str, revision: str | None = None) -> str:
    """sha256 of a local base model's weight files (farm.model_files.sha256_weights, the hash provenance records);
    for a remote or hub model, of its reference and revision. Cached per process by the files' size and mtime."""
    from farm import model_files

    model_dir = model_files.resolve_model_dir(ref)
    if model_dir is None:
        return hashlib.sha256(f"ref:{ref}@{revision or ''}".encode()).hexdigest()
    try:
        files = model_files.weight_files(Path(model_dir))
    except Exception:  # no safetensors: the runner says so; identical refs still dedupe
        return hashlib.sha256(f"dir:{Path(model_dir).resolve()}".encode()).hexdigest()
    stamp = tuple((str(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in files)
    if stamp not in _hash_cache:
        _hash_cache[stamp] = model_files.sha256_weights(Path(model_dir))[0]
    return _hash_cache[stamp]


def content_key(spec, settings: FarmSettings) -> str:
    """The dedupe key of a validated spec (see the module docstring)."""
    from farm.specs import spec_to_dict

    data = {k: v for k, v in spec_to_dict(spec).items() if k not in NOT_CONTENT}
    data["base_model_sha256"] = base_model_hash(spec.base_model, getattr(spec, "base_revision", None))
    if spec.kind == "extract":
        data["finetuned_model_sha256"] = base_model_hash(spec.finetuned_model)
    canon = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def record_lineage(session, job_id: str, key: str, *, origin: str = "submit", replay_of: str | None = None) -> None:
    """Store a new job's content key (in the transaction that records the job)."""
    session.add(JobLineage(job_id=job_id, content_key=key, origin=origin, replay_of=replay_of))
    session.flush()


def find_duplicate(key: str, settings: FarmSettings):
    """The newest job with this content key that succeeded (its adapter still published), else the newest in
    flight, as a JobPublic with `deduplicated` set; None when there is none."""
    with session_scope(settings.database_url) as session:
        return duplicate_in(session, key)


def duplicate_in(session, key: str):
    """find_duplicate within `session`'s transaction (after lock_content_key, it sees every identical job)."""
    from farm.service import job_view

    query = (select(Job).join(JobLineage, JobLineage.job_id == Job.id)
             .where(JobLineage.content_key == key, Job.state.in_(DEDUPE_STATES)))
    jobs = session.scalars(query.order_by(Job.created_at.desc()).limit(20)).all()
    # an adapter that exists beats one that may yet come
    for job in sorted(jobs, key=lambda j: j.state != SUCCEEDED):
        adapter = session.scalar(select(Adapter).where(Adapter.job_id == job.id, Adapter.status == READY))
        if job.state == SUCCEEDED and adapter is None:
            continue  # its adapter is gone: train again
        return job_view(job, adapter).model_copy(update={"deduplicated": True})
    return None


def lock_content_key(session, key: str) -> None:
    """Serialise the transactions that record jobs of one content key, so that two identical submits at the same
    moment cannot both miss each other: on PostgreSQL a transaction-scoped advisory lock on the key; on SQLite the
    database's single write lock, taken now (repository.lock_for_write) and held until commit. After it, a check in
    the same transaction sees every identical job committed before."""
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy import text

        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": int(key[:15], 16)})
    else:
        from farm.catalog.repository import lock_for_write

        lock_for_write(session)
