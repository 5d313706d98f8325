"""What /metrics reports, read from the catalog and the broker.

Part of the service layer: read-only aggregates for monitoring (the API's /metrics renders them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import func, select

from farm.catalog import repository as repo
from farm.catalog.models import JOB_STATES, READY, Adapter, Job
from farm.catalog.session import session_scope
from farm.names import CPU_QUEUE
from farm.settings import FarmSettings

DEFAULT_QUEUES = (CPU_QUEUE,)

# Job durations, in seconds: from a second to a day (training jobs run for hours). The API's job-duration histogram
# and Flower's task-runtime histogram (farm.flower; its default stops at 10 s) use these, so both dashboards line up.
JOB_DURATION_BUCKETS_S: tuple[float, ...] = (
    1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 43200, 86400,
)


@dataclass
class FarmStats:
    """A snapshot of the farm for the metrics endpoint."""

    jobs_by_state: dict[str, int]
    durations: list[tuple[str, str, float]]
    """(kind, final state, seconds from start to finish) of every finished job that started."""
    adapters_by_kind: dict[str, int]
    queue_depths: dict[str, int] = field(default_factory=dict)
    broker_up: bool = True


def collect_stats(settings: FarmSettings) -> FarmStats:
    """Read the catalog, then ask the broker how many messages wait per queue (broker_up False if it cannot)."""
    with session_scope(settings.database_url) as session:
        counts = repo.count_jobs_by_state(session)
        jobs_by_state = {state: counts.get(state, 0) for state in JOB_STATES}
        rows = session.execute(
            select(Job.kind, Job.state, Job.started_at, Job.finished_at)
            .where(Job.started_at.is_not(None), Job.finished_at.is_not(None))
        )
        durations = [(kind, state, max(0.0, (repo.as_utc(end) - repo.as_utc(start)).total_seconds()))
                     for kind, state, start, end in rows]
        adapters_by_kind = dict(session.execute(
            select(Adapter.kind, func.count()).where(Adapter.status == READY).group_by(Adapter.kind)).all())
        queues = sorted(set(DEFAULT_QUEUES) | set(session.scalars(select(Job.queue).distinct())))
    stats = FarmStats(jobs_by_state, durations, adapters_by_kind)
    try:
        from farm.queue import queue_depths

        stats.queue_depths = queue_depths(queues, settings.broker_url)
    except Exception:  # the catalog's figures are still worth reporting
        stats.broker_up = False
    return stats
