"""Prometheus metrics: jobs by state, queue depths, job durations, published adapter versions."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

from api.deps import SettingsDep
from farm.stats import JOB_DURATION_BUCKETS_S, FarmStats, collect_stats

router = APIRouter(tags=["metrics"])


class _StatsCollector:
    """Turns one FarmStats snapshot into metric families (a fresh registry per scrape: no state in the API)."""

    def __init__(self, stats: FarmStats):
        self.stats = stats

    def collect(self):
        s = self.stats
        jobs = GaugeMetricFamily("farm_jobs", "Jobs in the catalog by state.", labels=["state"])
        for state, n in s.jobs_by_state.items():
            jobs.add_metric([state], n)
        yield jobs

        depth = GaugeMetricFamily("farm_queue_depth", "Messages waiting in each Celery queue.", labels=["queue"])
        for queue, n in s.queue_depths.items():
            depth.add_metric([queue], n)
        yield depth
        yield GaugeMetricFamily("farm_broker_up", "1 when the broker answered this scrape.", value=int(s.broker_up))

        hist = HistogramMetricFamily("farm_job_duration_seconds", "Start-to-finish time of finished jobs.",
                                     labels=["kind", "state"])
        groups: dict[tuple[str, str], list[float]] = {}
        for kind, state, seconds in s.durations:
            groups.setdefault((kind, state), []).append(seconds)
        for (kind, state), values in sorted(groups.items()):
            buckets = [(_le(b), sum(v <= b for v in values)) for b in JOB_DURATION_BUCKETS_S]
            buckets.append(("+Inf", len(values)))
            hist.add_metric([kind, state], buckets, sum(values))
        yield hist

        adapters = GaugeMetricFamily("farm_adapter_versions", "Published adapter versions by kind.",
                                     labels=["kind"])
        for kind, n in sorted(s.adapters_by_kind.items()):
            adapters.add_metric([kind], n)
        yield adapters


def _le(bound: float) -> str:
    return repr(float(bound))


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format."}})
def metrics(settings: SettingsDep) -> Response:
    """The farm's metrics in Prometheus text format (scrape with the bearer token)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatsCollector(collect_stats(settings)))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
