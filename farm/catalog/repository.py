"""Queries and state transitions of the catalog. Every write from a worker carries its attempt (fencing token).

Functions take an open Session and do not commit: the caller's unit of work (``session_scope``) does, so each
use case is one transaction.

Past 400 lines on purpose: every state transition of a job is here, next to `fenced` and the locking it relies
on, so the state machine reads in one place; adapter queries share the version-numbering lock. The retry
decision itself is declared in farm.errors (`next_state`); `end_failed_attempt` applies it.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, false, func, select, update
from sqlalchemy.orm import Session, selectinload

from farm.catalog.models import (
    ACTIVE_STATES,
    CANCELLED,
    CANCELLING,
    CLAIMABLE_STATES,
    FAILED,
    PUBLISHING,
    QUEUED,
    READY,
    RECOVERING,
    RUNNING,
    SUCCEEDED,
    TERMINAL_STATES,
    Adapter,
    AdapterFile,
    Checkpoint,
    Job,
    JobEvent,
    utcnow,
)
from farm.errors import InvalidState, NotFound, StaleAttempt, attempts_left, next_state, retryable
from farm.names import adapter_prefix


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; the catalog stores UTC, so tag them."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


@dataclass(frozen=True)
class Claim:
    """A worker's ownership of one attempt of a job."""

    job_id: str
    attempt: int
    worker: str


def new_job_id() -> str:
    return uuid.uuid4().hex


def add_event(session: Session, job_id: str, attempt: int, type_: str, *, state: str | None = None,
              data: dict | None = None) -> None:
    session.add(JobEvent(job_id=job_id, attempt=attempt, type=type_, state=state, data=data))


def create_job(session: Session, *, kind: str, name: str, queue: str, spec: dict, spec_hash: str,
               max_attempts: int, submitted_by: str | None = None, job_id: str | None = None) -> Job:
    job = Job(id=job_id or new_job_id(), kind=kind, name=name, queue=queue, spec=spec, spec_hash=spec_hash,
              state=QUEUED, attempt=0, max_attempts=max_attempts, submitted_by=submitted_by)
    session.add(job)
    session.flush()
    add_event(session, job.id, 0, "state", state=QUEUED, data={"queue": queue})
    return job


def delete_job(session: Session, job_id: str) -> None:
    """Take back a job recorded by this submit (its doorbell could not ring): one DELETE, the database removes its
    events and lineage with it (ON DELETE CASCADE), whatever the ORM has loaded."""
    session.execute(delete(Job).where(Job.id == job_id).execution_options(synchronize_session=False))


def get_job(session: Session, job_id: str) -> Job:
    """The job with this id, or the only job whose id starts with it (4 characters at least, as git does)."""
    job = session.get(Job, job_id)
    if job is None:
        matches = []
        if len(job_id) >= 4:
            matches = session.scalars(job_prefix_query(job_id)).all()
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise NotFound(f"job id prefix {job_id!r} matches more than one job: give more of the id (`farm jobs`)")
        raise NotFound(f"no job {job_id!r}: list jobs with `farm jobs`")
    return job


def job_prefix_query(prefix: str):
    """At most two jobs whose id starts with `prefix`: a range on the primary key (prefix <= id < next prefix).

    The range is what an index can seek (LIKE 'abc%' is a full scan on PostgreSQL outside the C collation, and on
    SQLite always); startswith keeps the answer exact whatever the collation orders around the bounds.
    autoescape: a '%' or '_' typed by a user is a character, not a LIKE wildcard.
    """
    upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    return (select(Job).where(Job.id >= prefix, Job.id < upper, Job.id.startswith(prefix, autoescape=True))
            .order_by(Job.id).limit(2))


def list_jobs_query(*, state: str | None = None, kind: str | None = None, name: str | None = None,
                    limit: int = 50, offset: int = 0):
    """The listing's SELECT, newest first, in the order of the (state,) created_at, id indexes."""
    q = select(Job).order_by(Job.created_at.desc(), Job.id.desc())
    if state:
        q = q.where(Job.state == state)
    if kind:
        q = q.where(Job.kind == kind)
    if name:
        q = q.where(Job.name == name)
    return q.limit(limit).offset(offset)


def list_jobs(session: Session, *, state: str | None = None, kind: str | None = None, name: str | None = None,
              limit: int = 50, offset: int = 0) -> list[Job]:
    return list(session.scalars(list_jobs_query(state=state, kind=kind, name=name, limit=limit, offset=offset)))


def claim_job(session: Session, job_id: str, worker: str, lease_seconds: float) -> Claim | None:
    """Atomically take a queued or recovering job (compare-and-set). None: someone else has it, or it is over."""
    now = utcnow()
    current = session.execute(select(Job.attempt, Job.state, Job.max_attempts).where(Job.id == job_id)).first()
    if (current is None or current.state not in CLAIMABLE_STATES
            or not attempts_left(current.attempt, current.max_attempts)):
        return None
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state.in_(CLAIMABLE_STATES), Job.attempt == current.attempt)
        .values(state=RUNNING, attempt=current.attempt + 1, worker=worker,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                started_at=func.coalesce(Job.started_at, now))
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return None
    attempt = current.attempt + 1
    add_event(session, job_id, attempt, "state", state=RUNNING, data={"worker": worker})
    return Claim(job_id, attempt, worker)


# how many waiting jobs a group claim looks at for partners (oldest first)
COTRAIN_CANDIDATES = 200


def claim_cotrain_group(session: Session, job_id: str, worker: str, lease_seconds: float, max_size: int,
                        key) -> list[Claim]:
    """Claim `job_id` and, in the same transaction, up to max_size - 1 other waiting jobs of its queue whose
    co-training key (`key(spec)`, None: trains alone) equals its own, oldest first.

    Each partner is taken with claim_job's compare-and-set, so it gets its own lease, attempt and fencing token;
    its own broker message later loses the claim as any duplicate does. [] when `job_id` itself is not claimable.
    """
    lock_for_write(session)
    first = claim_job(session, job_id, worker, lease_seconds)
    if first is None:
        return []
    job = session.get(Job, job_id)
    partners = claim_cotrain_partners(session, kind=job.kind, queue=job.queue, wanted=key(job.spec), worker=worker,
                                      lease_seconds=lease_seconds, limit=max_size - 1, key=key)
    return [first, *partners]


def claim_cotrain_partners(session: Session, *, kind: str, queue: str, wanted, worker: str, lease_seconds: float,
                           limit: int, key) -> list[Claim]:
    """Claim up to `limit` waiting jobs of this kind and queue whose `key(spec)` equals `wanted`, oldest first: a
    group's partners at its start, or jobs joining a running group between its steps."""
    if wanted is None or limit <= 0:
        return []
    lock_for_write(session)
    candidates = session.scalars(
        select(Job).where(Job.state.in_(CLAIMABLE_STATES), Job.kind == kind, Job.queue == queue)
        .order_by(Job.created_at, Job.id).limit(COTRAIN_CANDIDATES)
    ).all()
    claims: list[Claim] = []
    for other in candidates:
        if len(claims) >= limit:
            break
        if key(other.spec) == wanted:
            claim = claim_job(session, other.id, worker, lease_seconds)
            if claim is not None:
                claims.append(claim)
    return claims


def renew_leases(session: Session, claims: list[Claim], lease_seconds: float) -> dict[str, str | None]:
    """One heartbeat for a group: extend every claim's lease; {job_id: state}, None where the claim is stale."""
    states: dict[str, str | None] = {}
    for claim in claims:
        try:
            states[claim.job_id] = renew_lease(session, claim, lease_seconds)
        except StaleAttempt:
            states[claim.job_id] = None
    return states


def lock_for_write(session: Session) -> None:
    """On SQLite, take the database's write lock now, before reading the rows this transaction will change.

    pysqlite runs a SELECT outside any transaction and FOR UPDATE is a no-op there, so a read-then-write could act
    on a row another writer changed in between (a reaper recovering a job that just succeeded, a cancel overwriting
    a claim). An UPDATE that matches nothing opens the write transaction and holds SQLite's one writer lock until
    commit; other writers wait (busy timeout). PostgreSQL locks the rows themselves with FOR UPDATE instead.
    """
    if session.get_bind().dialect.name == "sqlite":
        session.execute(update(Job).where(false()).values(attempt=Job.attempt)
                        .execution_options(synchronize_session=False))


def fenced(session: Session, claim: Claim, states=ACTIVE_STATES) -> Job:
    """The claimed job, locked for this transaction; StaleAttempt when the claim's attempt no longer holds it."""
    lock_for_write(session)
    job = session.get(Job, claim.job_id, with_for_update=True, populate_existing=True)
    if job is None or job.attempt != claim.attempt or job.state not in states:
        raise StaleAttempt(
            f"job {claim.job_id} attempt {claim.attempt} no longer owns the job "
            f"(now attempt {job.attempt if job else '?'}, state {job.state if job else 'gone'})"
        )
    return job


def renew_lease(session: Session, claim: Claim, lease_seconds: float) -> str:
    """Heartbeat: extend the lease. Returns the job's state (``cancelling`` tells the worker to stop)."""
    job = fenced(session, claim)
    job.lease_expires_at = utcnow() + timedelta(seconds=lease_seconds)
    return job.state


def record_progress(session: Session, claim: Claim, progress: dict, *, event_type: str = "progress") -> None:
    """Store the latest progress on the job and append it as an event."""
    job = fenced(session, claim)
    # the latest eval loss stays beside the latest step's figures (`farm jobs`, the console)
    last_eval = {"eval_loss": job.progress["eval_loss"]} if job.progress and "eval_loss" in job.progress else {}
    if event_type in ("progress", "publishing"):  # publishing: the last step's figures, phase `publishing`
        job.progress = {**progress, **last_eval}
    elif event_type == "eval" and isinstance(progress.get("eval_loss"), (int, float)):
        job.progress = {**(job.progress or {}), "eval_loss": progress["eval_loss"]}
    add_event(session, job.id, claim.attempt, event_type, data=progress)


def record_checkpoint(session: Session, claim: Claim, step: int, prefix: str, files: list[dict],
                      metrics: dict | None = None) -> None:
    job = fenced(session, claim)
    existing = session.scalar(select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.step == step))
    if existing is not None:
        existing.attempt, existing.prefix, existing.files = claim.attempt, prefix, files
        existing.metrics = metrics
    else:
        session.add(Checkpoint(job_id=job.id, attempt=claim.attempt, step=step, prefix=prefix, files=files,
                               metrics=metrics))
    add_event(session, job.id, claim.attempt, "checkpoint", data={"step": step, "prefix": prefix})


def latest_checkpoint(session: Session, job_id: str) -> Checkpoint | None:
    return session.scalar(
        select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step.desc()).limit(1)
    )


def list_checkpoints(session: Session, job_id: str) -> list[Checkpoint]:
    """A job's checkpoints, oldest step first."""
    return list(session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)))


def delete_checkpoints(session: Session, job_id: str, steps: list[int]) -> None:
    """Forget these checkpoints of a job (their store objects are deleted by the caller first)."""
    if steps:
        for ckpt in session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step.in_(steps))):
            session.delete(ckpt)


def fail_job(session: Session, claim: Claim, code: str, message: str) -> None:
    """End the attempt failed; the job is over (retry policy lives in the reaper for lost workers)."""
    job = fenced(session, claim)
    job.state, job.error_code, job.error_message = FAILED, code, message[:10_000]
    job.finished_at, job.lease_expires_at = utcnow(), None
    add_event(session, job.id, claim.attempt, "state", state=FAILED, data={"code": code, "message": message[:2000]})


def release_for_retry(session: Session, claim: Claim, code: str, message: str) -> bool:
    """A transient failure: back to ``recovering`` when attempts remain (True: re-enqueue), else ``failed``."""
    job = fenced(session, claim)
    if not attempts_left(job.attempt, job.max_attempts):
        fail_job(session, claim, code, f"{message}\n(all {job.max_attempts} attempts used)")
        return False
    job.state, job.error_code, job.error_message = RECOVERING, code, message[:10_000]
    job.lease_expires_at = None
    add_event(session, job.id, claim.attempt, "state", state=RECOVERING, data={"code": code, "message": message[:2000]})
    return True


def end_failed_attempt(session: Session, claim: Claim, code: str, message: str) -> str:
    """End an attempt that failed with `code` as the retry policy says (farm.errors.next_state); returns the job's
    new state: ``recovering`` (re-enqueue it) or ``failed``."""
    job = fenced(session, claim)
    if next_state(code, attempt=job.attempt, max_attempts=job.max_attempts) == RECOVERING:
        release_for_retry(session, claim, code, message)
        return RECOVERING
    if retryable(code):  # out of attempts
        message = f"{message}\n(all {job.max_attempts} attempts used)"
    fail_job(session, claim, code, message)
    return FAILED


def mark_cancelled(session: Session, claim: Claim) -> None:
    job = fenced(session, claim)
    job.state, job.finished_at, job.lease_expires_at = CANCELLED, utcnow(), None
    add_event(session, job.id, claim.attempt, "state", state=CANCELLED)


def request_cancel(session: Session, job_id: str) -> Job:
    """Queued or recovering jobs end cancelled at once; running ones go to cancelling and their worker stops them."""
    lock_for_write(session)
    job = get_job(session, job_id)
    session.refresh(job, with_for_update=True)
    if job.state in TERMINAL_STATES:
        raise InvalidState(f"job {job.id} is already {job.state}; nothing to cancel")
    if job.state in (QUEUED, RECOVERING):
        job.state, job.finished_at = CANCELLED, utcnow()
    elif job.state == RUNNING:
        job.state = CANCELLING
    add_event(session, job.id, job.attempt, "state", state=job.state)
    return job


def reap_expired_leases(session: Session, now: datetime | None = None) -> list[str]:
    """Jobs whose worker vanished: back to ``recovering`` (returned, to re-enqueue) or ``failed`` when out of attempts."""
    now = now or utcnow()
    lock_for_write(session)
    expired = session.scalars(
        select(Job).where(Job.state.in_(ACTIVE_STATES), Job.lease_expires_at < now).with_for_update(skip_locked=True)
    ).all()
    requeue = []
    for job in expired:
        if job.state == CANCELLING:
            job.state, job.finished_at = CANCELLED, now
        elif next_state("worker_lost", attempt=job.attempt, max_attempts=job.max_attempts) == FAILED:
            job.state, job.finished_at = FAILED, now
            job.error_code = job.error_code or "worker_lost"
            job.error_message = (job.error_message or "") + (
                f"\nworker {job.worker} stopped heartbeating; all {job.max_attempts} attempts used"
            )
        else:
            job.state = RECOVERING
            requeue.append(job.id)
        job.lease_expires_at = None
        add_event(session, job.id, job.attempt, "state", state=job.state, data={"reason": "lease expired"})
    return requeue


def waiting_jobs(session: Session, quiet_since: datetime) -> list[tuple[str, str]]:
    """(id, queue) of jobs waiting for a worker (queued or recovering) with no event since `quiet_since`."""
    last_event = (select(JobEvent.job_id, func.max(JobEvent.at).label("at")).group_by(JobEvent.job_id)
                  .subquery())
    rows = session.execute(
        select(Job.id, Job.queue).join(last_event, last_event.c.job_id == Job.id)
        .where(Job.state.in_(CLAIMABLE_STATES), last_event.c.at < quiet_since)
    )
    return [(r.id, r.queue) for r in rows]


def _lock_adapter_name(session: Session, name: str) -> None:
    """Serialise version numbering per adapter name until commit.

    Two jobs of one name finishing together would both read the same max(version) and one would fail on the
    unique (name, version). PostgreSQL: a transaction-scoped advisory lock keyed by the name. SQLite: the write
    lock that ``fenced`` already holds serialises all writers.
    """
    if session.get_bind().dialect.name == "postgresql":
        key = int.from_bytes(hashlib.sha256(f"farm.adapter:{name}".encode()).digest()[:8], "big", signed=True)
        session.execute(select(func.pg_advisory_xact_lock(key)))


def reserve_adapter_version(session: Session, claim: Claim, *, name: str, kind: str, spec_hash: str) -> Adapter:
    """Reserve the next version of `name` for this job (idempotent: a job keeps its version across retries)."""
    job = fenced(session, claim)
    existing = session.scalar(select(Adapter).where(Adapter.job_id == job.id))
    if existing is not None:
        return existing
    _lock_adapter_name(session, name)
    version = (session.scalar(select(func.max(Adapter.version)).where(Adapter.name == name)) or 0) + 1
    adapter = Adapter(name=name, version=version, status=PUBLISHING, job_id=job.id, kind=kind,
                      prefix=adapter_prefix(name, version), spec_hash=spec_hash)
    session.add(adapter)
    session.flush()
    return adapter


def publish_adapter(session: Session, claim: Claim, *, files: list[dict], provenance: dict, metrics: dict,
                    base_model: str | None = None, base_model_sha256: str | None = None,
                    dataset_uri: str | None = None, dataset_sha256: str | None = None,
                    source_model: str | None = None, source_model_sha256: str | None = None,
                    parent_adapter_id: int | None = None) -> Adapter:
    """One transaction: the reserved version becomes ready with its files and provenance, the job succeeds.

    Publishing again for a job that already succeeded returns the same adapter version.
    """
    lock_for_write(session)
    job = session.get(Job, claim.job_id, with_for_update=True, populate_existing=True)
    adapter = session.scalar(select(Adapter).where(Adapter.job_id == claim.job_id))
    if job is not None and job.state == SUCCEEDED and adapter is not None and adapter.status == READY:
        return adapter
    job = fenced(session, claim)
    if adapter is None:
        raise InvalidState(f"job {job.id} has no reserved adapter version; call reserve_adapter_version first")
    adapter.status, adapter.published_at = READY, utcnow()
    adapter.provenance, adapter.metrics = provenance, metrics
    adapter.base_model, adapter.base_model_sha256 = base_model, base_model_sha256
    adapter.dataset_uri, adapter.dataset_sha256 = dataset_uri, dataset_sha256
    adapter.source_model, adapter.source_model_sha256 = source_model, source_model_sha256
    adapter.parent_adapter_id = parent_adapter_id
    for f in files:
        adapter.files.append(AdapterFile(path=f["path"], size=f["size"], sha256=f["sha256"], etag=f.get("etag")))
    job.state, job.finished_at, job.lease_expires_at = SUCCEEDED, utcnow(), None
    add_event(session, job.id, claim.attempt, "state", state=SUCCEEDED,
              data={"adapter": f"{adapter.name}:{adapter.version}"})
    session.flush()  # a bad file record fails here, in the call, and the caller's rollback undoes all of it
    return adapter


def list_adapters(session: Session, name: str | None = None) -> list[Adapter]:
    q = select(Adapter).where(Adapter.status == READY).order_by(Adapter.name, Adapter.version.desc())
    if name:
        q = q.where(Adapter.name == name)
    return list(session.scalars(q))


def get_adapter(session: Session, name: str, version: int | None = None) -> Adapter:
    """A ready adapter version (the latest when version is None), with its files loaded."""
    q = select(Adapter).where(Adapter.name == name, Adapter.status == READY).options(selectinload(Adapter.files))
    q = q.where(Adapter.version == version) if version is not None else q.order_by(Adapter.version.desc())
    adapter = session.scalars(q.limit(1)).first()
    if adapter is None:
        what = f"{name}:{version}" if version is not None else name
        raise NotFound(f"no adapter {what!r}: list adapters with `farm adapters`")
    return adapter


def adapter_for_job(session: Session, job_id: str) -> Adapter | None:
    return session.scalar(select(Adapter).where(Adapter.job_id == job_id, Adapter.status == READY))


def job_events(session: Session, job_id: str, after_id: int = 0, limit: int = 1000) -> list[JobEvent]:
    return list(session.scalars(
        select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after_id).order_by(JobEvent.id).limit(limit)
    ))


def count_jobs_by_state(session: Session) -> dict[str, int]:
    return {s: n for s, n in session.execute(select(Job.state, func.count()).group_by(Job.state))}
