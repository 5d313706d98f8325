"""Retraining from the feedback pool: when an adapter's pool holds `every` new rows, the farm submits exactly one
`continue_from: NAME:<latest>` job on those rows plus a replay share of earlier data (rehearsal).

Exactly once: the job row, a `retrain_runs` row unique on (adapter, sha256 of the pool's row hashes) and the
marking of those rows as used are ONE catalog transaction (submit_job's `on_record`). Two API replicas, two beat
processes or a retry after a crash compute the same pool digest: the second insert fails on the unique
constraint, the marking finds the rows taken, the transaction rolls back, nothing is queued twice. A crash after
the commit and before the doorbell leaves a queued job that the reaper rings again (FARM_REQUEUE_AFTER_SECONDS);
a crash before the commit leaves the rows unused, and the next trigger (next upload, or `farm beat`'s tick)
starts it.

The policy is `farm retrain NAME --every N` (the catalog's retrain_policies row) or, without one, the `retrain:`
section of the spec that made the adapter's latest version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from farm.catalog import repository as repo
from farm.catalog.models import (
    CANCELLING,
    QUEUED,
    RECOVERING,
    RUNNING,
    FeedbackRow,
    Job,
    JobLineage,
    RetrainPolicy,
    RetrainRun,
    utcnow,
)
from farm.catalog.session import session_scope
from farm.errors import FarmError, NotFound, SpecError
from farm.settings import FarmSettings, get_settings

log = logging.getLogger("farm.automation")
RETRAIN_SUBMITTER = "farm:retrain"


class PoolTaken(FarmError):
    """Another process started a retraining on these rows first (the transaction rolls back)."""

    code = "pool_taken"


@dataclass(frozen=True)
class Policy:
    """The retraining policy in force for an adapter."""

    every: int
    replay: float
    max_steps: int | None
    source: str
    """`farm retrain` (catalog) or `spec` (the latest version's retrain: section)."""


def effective_policy(session, name: str) -> Policy | None:
    """The catalog's policy for NAME, else its latest version's spec `retrain:` section, else None."""
    row = session.scalar(select(RetrainPolicy).where(RetrainPolicy.adapter_name == name))
    if row is not None:
        return Policy(row.every, row.replay, row.max_steps, "farm retrain")
    try:
        adapter = repo.get_adapter(session, name)
    except NotFound:
        return None
    job = session.get(Job, adapter.job_id)
    section = (job.spec or {}).get("retrain") if job is not None else None
    if not section:
        return None
    return Policy(int(section["every"]), float(section.get("replay", 0.5)), section.get("max_steps"), "spec")


def set_policy(name: str, every: int, replay: float = 0.5, max_steps: int | None = None, *,
               settings: FarmSettings | None = None) -> dict:
    """Set (or replace) NAME's retraining policy, then check the pool at once. Returns the policy and any job."""
    settings = settings or get_settings()
    if every < 1 or not 0 <= replay <= 10 or (max_steps is not None and max_steps < 1):
        raise SpecError("retrain: every must be >= 1, replay between 0 and 10, max_steps >= 1", field="retrain")
    with session_scope(settings.database_url) as session:
        repo.get_adapter(session, name)  # NotFound: retraining needs a published version to continue from
        row = session.scalar(select(RetrainPolicy).where(RetrainPolicy.adapter_name == name))
        if row is None:
            row = RetrainPolicy(adapter_name=name, every=every, replay=replay, max_steps=max_steps)
            session.add(row)
        else:
            row.every, row.replay, row.max_steps, row.updated_at = every, replay, max_steps, utcnow()
    job = maybe_retrain(name, settings=settings)
    return {**pool_status(name, settings=settings), "retrain_job": job.id if job else None}


def remove_policy(name: str, *, settings: FarmSettings | None = None) -> None:
    """Drop NAME's `farm retrain` policy (a spec's retrain: section applies again, if any)."""
    settings = settings or get_settings()
    with session_scope(settings.database_url) as session:
        row = session.scalar(select(RetrainPolicy).where(RetrainPolicy.adapter_name == name))
        if row is None:
            raise NotFound(f"adapter {name!r} has no `farm retrain` policy")
        session.delete(row)


def pool_status(name: str, *, settings: FarmSettings | None = None) -> dict:
    """NAME's pool (new and used rows), its policy, and its retraining runs, newest first."""
    from sqlalchemy import func

    settings = settings or get_settings()
    with session_scope(settings.database_url) as session:
        policy = effective_policy(session, name)
        counts = dict(session.execute(
            select(FeedbackRow.used_by_job_id.is_(None), func.count()).where(FeedbackRow.adapter_name == name)
            .group_by(FeedbackRow.used_by_job_id.is_(None))).all())
        runs = session.scalars(select(RetrainRun).where(RetrainRun.adapter_name == name)
                               .order_by(RetrainRun.id.desc()).limit(20)).all()
        return {
            "adapter": name, "pool_new": counts.get(True, 0), "pool_used": counts.get(False, 0),
            "policy": policy.__dict__ if policy else None,
            "runs": [{"job_id": r.job_id, "parent": r.parent, "rows": len(r.rows), "replay_rows": r.replay_rows,
                      "pool_sha256": r.pool_sha256, "created_at": r.created_at.isoformat()} for r in runs],
        }


def _in_flight(session, name: str) -> bool:
    return session.scalar(select(RetrainRun.id).join(Job, Job.id == RetrainRun.job_id).where(
        RetrainRun.adapter_name == name, Job.state.in_((QUEUED, RUNNING, RECOVERING, CANCELLING))).limit(1)) \
        is not None


def _earlier_rows(spec: dict, settings: FarmSettings) -> list[bytes]:
    """The lines of the dataset the parent version trained on (its new rows and its own replay share)."""
    from farm.names import is_store_ref, store_key
    from farm.store import open_store

    ref = spec["dataset"]["path"]
    if not is_store_ref(ref):
        return []
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "parent.jsonl"
        open_store(settings.store_url, settings).get_file(store_key(ref), local)
        return [line.rstrip(b"\n") for line in local.read_bytes().splitlines() if line.strip()]


def maybe_retrain(name: str, *, settings: FarmSettings | None = None):
    """Start NAME's retraining when its pool holds `every` unused rows and none of its retrainings is in flight.

    Returns the new job (JobPublic), or None when there is nothing to do or another process started it.
    """
    from farm import service

    settings = settings or get_settings()
    with session_scope(settings.database_url) as session:
        policy = effective_policy(session, name)
        if policy is None or _in_flight(session, name):
            return None
        rows = session.scalars(select(FeedbackRow).where(FeedbackRow.adapter_name == name,
                                                         FeedbackRow.used_by_job_id.is_(None))
                               .order_by(FeedbackRow.id).limit(policy.every)).all()
        if len(rows) < policy.every:
            return None
        try:
            parent = repo.get_adapter(session, name)
        except NotFound:
            return None
        parent_ref = f"{name}:{parent.version}"
        parent_spec = dict(session.get(Job, parent.job_id).spec or {})
        if parent_spec.get("kind") != "train" or "dataset" not in parent_spec:
            log.warning("retraining of %s: its latest version was not trained from a dataset; skipped", name)
            return None
        ids = [r.id for r in rows]
        hashes = [r.sha256 for r in rows]
        new_lines = [json.dumps(r.row, ensure_ascii=False).encode() for r in rows]
    pool_sha = hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()
    rng = random.Random(pool_sha)
    earlier = _earlier_rows(parent_spec, settings)
    replay = rng.sample(earlier, min(len(earlier), round(policy.replay * len(new_lines))))
    lines = new_lines + replay
    rng.shuffle(lines)

    training = dict(parent_spec.get("training") or {})
    if policy.max_steps:
        training["max_steps"] = policy.max_steps
    run_values = dict(adapter_name=name, pool_sha256=pool_sha, parent=parent_ref, rows=hashes,
                      replay_rows=len(replay))

    def take_pool(session, job) -> None:
        session.add(RetrainRun(job_id=job.id, **run_values))
        session.flush()  # a second process with the same pool fails here (unique adapter, pool digest)
        taken = session.execute(update(FeedbackRow).where(FeedbackRow.id.in_(ids),
                                                          FeedbackRow.used_by_job_id.is_(None))
                                .values(used_by_job_id=job.id).execution_options(synchronize_session=False))
        if taken.rowcount != len(ids):
            raise PoolTaken(f"the pool of {name} was taken by another retraining")
        session.get(JobLineage, job.id).origin = "retrain"

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "retrain.jsonl"
        data.write_bytes(b"\n".join(lines) + b"\n")
        spec = {**parent_spec, "continue_from": parent_ref, "training": training,
                "dataset": {**parent_spec["dataset"], "path": str(data)}}
        try:
            job = service.submit_job(spec, submitted_by=RETRAIN_SUBMITTER, settings=settings, on_record=take_pool)
        except (IntegrityError, PoolTaken) as exc:
            log.info("retraining of %s: pool %s already started elsewhere (%s)", name, pool_sha[:12],
                     type(exc).__name__)
            return None
    if job.deduplicated:  # identical to a job that ran or runs: the rows are its; record that, train nothing
        try:
            with session_scope(settings.database_url) as session:
                take_pool(session, session.get(Job, job.id))
        except (IntegrityError, PoolTaken):
            pass
        return None
    log.info("retraining %s from %s on %d new + %d earlier rows: job %s", name, parent_ref, len(new_lines),
             len(replay), job.id)
    return job


def check_all_pools(*, settings: FarmSettings | None = None) -> list[str]:
    """maybe_retrain for every adapter with unused feedback (what `farm beat` does each tick); new job ids."""
    settings = settings or get_settings()
    with session_scope(settings.database_url) as session:
        names = session.scalars(select(FeedbackRow.adapter_name).where(FeedbackRow.used_by_job_id.is_(None))
                                .distinct()).all()
    started = []
    for name in names:
        try:
            job = maybe_retrain(name, settings=settings)
        except FarmError as exc:
            log.warning("retraining of %s not started: %s", name, exc.message)
            continue
        if job is not None:
            started.append(job.id)
    return started


def job_lineage(session, job_id: str) -> dict:
    """What started a job, for its adapter's provenance: origin, replay_of, the feedback rows it learned from."""
    lineage = session.get(JobLineage, job_id)
    run = session.scalar(select(RetrainRun).where(RetrainRun.job_id == job_id))
    out = {"origin": lineage.origin if lineage else None, "replay_of": lineage.replay_of if lineage else None}
    if run is not None:
        out.update(feedback_events=list(run.rows), feedback_pool_sha256=run.pool_sha256, replay_rows=run.replay_rows)
    return out


def adapter_lineage(ref: str, *, settings: FarmSettings | None = None) -> dict:
    """Where an adapter version came from: its parent, the feedback rows it learned from, what it replays."""
    from farm.names import parse_adapter_ref

    settings = settings or get_settings()
    name, version = parse_adapter_ref(ref)
    with session_scope(settings.database_url) as session:
        adapter = repo.get_adapter(session, name, version)
        parent = session.get(type(adapter), adapter.parent_adapter_id) if adapter.parent_adapter_id else None
        lineage = session.get(JobLineage, adapter.job_id)
        run = session.scalar(select(RetrainRun).where(RetrainRun.job_id == adapter.job_id))
        return {
            "adapter": f"{adapter.name}:{adapter.version}", "job_id": adapter.job_id,
            "parent": f"{parent.name}:{parent.version}" if parent else None,
            "origin": lineage.origin if lineage else None,
            "replay_of": lineage.replay_of if lineage else None,
            "content_key": lineage.content_key if lineage else None,
            "feedback_events": list(run.rows) if run else [],
            "replay_rows": run.replay_rows if run else 0,
            "pool_sha256": run.pool_sha256 if run else None,
        }
