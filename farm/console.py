"""Read models behind the web console (api/ui): a job's chart series and checkpoints, an adapter's lineage, the
workers alive. Part of the service layer: read-only, no torch, shared by any front end that wants them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import or_, select

from farm.catalog import repository as repo
from farm.catalog.models import ACTIVE_STATES, READY, Adapter, Checkpoint, Job
from farm.catalog.session import session_scope
from farm.schemas import JobEventPublic
from farm.settings import FarmSettings, get_settings

EVENT_PAGE = 1000


# ---------------------------------------------------------------- a job


def all_job_events(job_id: str, *, after: int = 0, settings: FarmSettings | None = None) -> list[JobEventPublic]:
    """Every event of a job after `after`, oldest first (read page by page)."""
    from farm import service

    settings = settings or get_settings()
    events: list[JobEventPublic] = []
    while True:
        page = service.job_events(job_id, after=after, limit=EVENT_PAGE, settings=settings)
        events.extend(page)
        if len(page) < EVENT_PAGE:
            return events
        after = page[-1].id


def chart_point(event: JobEventPublic) -> dict | None:
    """One point of a job's chart from a progress or eval event, or None for any other event.

    Progress gives loss, lr and tokens/s at a step; eval gives eval_loss. The browser's chart script reads the
    same shape from the live event stream, so the first paint and the live updates agree.
    """
    data = event.data or {}
    step = data.get("step")
    if not isinstance(step, (int, float)):
        return None
    if event.type == "progress":
        point = {k: data.get(k) for k in ("loss", "lr", "tokens_per_s")}
    elif event.type == "eval":
        point = {"eval_loss": data.get("eval_loss")}
    else:
        return None
    point = {k: float(v) for k, v in point.items() if isinstance(v, (int, float))}
    return {"step": int(step), "attempt": event.attempt, **point} if point else None


def job_series(events: list[JobEventPublic]) -> list[dict]:
    """The chart points of these events, in order."""
    return [p for p in (chart_point(e) for e in events) if p is not None]


@dataclass
class CheckpointView:
    step: int
    attempt: int
    prefix: str
    files: int
    size: int
    created_at: datetime


def job_checkpoints(job_id: str, *, settings: FarmSettings | None = None) -> list[CheckpointView]:
    """The job's resumable checkpoints in the store, by step."""
    settings = settings or get_settings()
    with session_scope(settings.database_url) as session:
        job = repo.get_job(session, job_id)
        rows = session.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id).order_by(Checkpoint.step))
        return [CheckpointView(step=c.step, attempt=c.attempt, prefix=c.prefix, files=len(c.files or []),
                               size=sum(int(f.get("size", 0)) for f in (c.files or [])), created_at=c.created_at)
                for c in rows]


# ---------------------------------------------------------------- an adapter's lineage


@dataclass
class LineageNode:
    name: str
    version: int
    job_id: str
    relation: str
    """self, parent (continued from, nearest first), child (continued from this), replay (same spec) or
    co-trained (trained in the same runner)."""


@dataclass
class Lineage:
    node: LineageNode
    parents: list[LineageNode] = field(default_factory=list)
    children: list[LineageNode] = field(default_factory=list)
    replays: list[LineageNode] = field(default_factory=list)
    cotrained: list[LineageNode] = field(default_factory=list)


def _node(adapter: Adapter, relation: str) -> LineageNode:
    return LineageNode(adapter.name, adapter.version, adapter.job_id, relation)


MAX_ANCESTORS = 32


def adapter_lineage(name: str, version: int | None = None, *, settings: FarmSettings | None = None) -> Lineage:
    """Where an adapter version comes from and what came of it.

    Parents follow `continued from` links (nearest first); children continued from it; replays are other versions
    trained from the identical resolved spec (same spec hash); co-trained are adapters whose jobs the provenance
    lists as trained beside this one in one runner (`co_training.jobs`, when the farm co-trains).
    """
    settings = settings or get_settings()
    with session_scope(settings.database_url) as session:
        adapter = repo.get_adapter(session, name, version)
        lineage = Lineage(node=_node(adapter, "self"))
        seen = {adapter.id}
        parent_id = adapter.parent_adapter_id
        while parent_id is not None and parent_id not in seen and len(lineage.parents) < MAX_ANCESTORS:
            parent = session.get(Adapter, parent_id)
            if parent is None:
                break
            seen.add(parent.id)
            lineage.parents.append(_node(parent, "parent"))
            parent_id = parent.parent_adapter_id
        ready = Adapter.status == READY
        for child in session.scalars(select(Adapter).where(Adapter.parent_adapter_id == adapter.id, ready)
                                     .order_by(Adapter.name, Adapter.version)):
            lineage.children.append(_node(child, "child"))
        for twin in session.scalars(select(Adapter).where(Adapter.spec_hash == adapter.spec_hash,
                                                          Adapter.id != adapter.id, ready)
                                    .order_by(Adapter.name, Adapter.version).limit(20)):
            lineage.replays.append(_node(twin, "replay"))
        co_jobs = [j for j in ((adapter.provenance or {}).get("co_training") or {}).get("jobs", [])
                   if isinstance(j, str) and j != adapter.job_id]
        if co_jobs:
            for other in session.scalars(select(Adapter).where(Adapter.job_id.in_(co_jobs), ready)):
                lineage.cotrained.append(_node(other, "co-trained"))
        return lineage


# ---------------------------------------------------------------- workers


@dataclass
class WorkerView:
    node: str
    """Celery node name: <slot>@<host>, the slot naming its devices (gpu0, gpu0-3, cpu1)."""
    devices: str
    queues: list[str]
    jobs: list[tuple[str, str, str]] = field(default_factory=list)
    """(job id, adapter name, state) of the jobs it holds now."""


def _devices(node: str) -> str:
    slot = node.split("@", 1)[0]
    for kind in ("gpu", "cpu"):
        if slot.startswith(kind) and slot[len(kind):][:1].isdigit():
            return f"{kind.upper()} {slot[len(kind):].replace('-', '–').replace('_', ',')}"
    return "-"


def workers_alive(*, settings: FarmSettings | None = None, timeout: float = 1.0) -> list[WorkerView]:
    """Workers answering a broadcast on the broker now, their queues, and the running jobs the catalog gives them.

    An unreachable broker gives an empty list (the queue figures say so too).
    """
    from farm.queue import app_for

    settings = settings or get_settings()
    try:
        replies = app_for(settings).control.inspect(timeout=timeout).active_queues() or {}
    except Exception:
        replies = {}
    workers = [WorkerView(node=node, devices=_devices(node), queues=sorted(q.get("name", "") for q in queues or []))
               for node, queues in sorted(replies.items())]
    if not workers:
        return workers
    with session_scope(settings.database_url) as session:
        running = session.execute(select(Job.id, Job.name, Job.state, Job.worker).where(
            or_(Job.state.in_(ACTIVE_STATES)), Job.worker.is_not(None))).all()
    for w in workers:
        # job.worker is "<node>/pid<N>" (workers/tasks.worker_name)
        w.jobs = [(i, n, s) for i, n, s, holder in running if holder.split("/pid", 1)[0] == w.node]
    return workers


def served_queues(*, settings: FarmSettings | None = None, timeout: float = 1.0) -> set[str] | None:
    """The queues some live worker consumes; None when the broker did not answer."""
    from farm.queue import app_for

    settings = settings or get_settings()
    try:
        replies = app_for(settings).control.inspect(timeout=timeout).active_queues()
    except Exception:
        return None
    return {q.get("name", "") for queues in (replies or {}).values() for q in queues or []}
