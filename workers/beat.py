"""`farm beat`: Celery beat with a scheduler that reads the farm's schedules from the catalog.

    farm beat                     # or: celery -A workers.beat beat -S workers.beat:CatalogScheduler

Why a small `celery.beat.Scheduler` subclass rather than sqlalchemy-celery-beat (or django-celery-beat, RedBeat):
those keep entries in their own tables or keys (outside this catalog's Alembic chain) and fire each entry by
sending a Celery task to a queue, with no guard against two beat processes firing the same slot. Here a firing
is a producer's act (validate the spec and record the job, the way `farm submit` does), and a slot must submit
once even with two beats running, which needs the firing row and the job row in one catalog transaction. So each
tick reads the schedules from the catalog (as the database schedulers do), fires the due slots through
farm.automation.schedules.fire_due, checks the feedback pools (retraining), and hands out pending webhooks.
"""

from __future__ import annotations

import logging

from celery.beat import Scheduler

from farm.queue import app_for, celery_app
from farm.settings import FarmSettings, get_settings

log = logging.getLogger("farm.beat")
app = celery_app


class CatalogScheduler(Scheduler):
    """A beat scheduler whose entries live in the catalog's `schedules` table; every tick re-reads them."""

    def setup_schedule(self) -> None:
        self.farm_settings = get_settings()

    def tick(self, *args, **kwargs) -> float:
        """Fire due slots, start due retrainings, send due webhooks; returns seconds until the next tick."""
        from farm.automation.retrain import check_all_pools
        from farm.automation.schedules import fire_due
        from farm.automation.webhooks import deliver_due

        settings = getattr(self, "farm_settings", None) or get_settings()
        for step in (fire_due, check_all_pools, deliver_due):
            try:
                step(settings=settings)
            except Exception:  # the catalog blinked: try again next tick
                log.exception("beat: %s failed", step.__name__)
        return settings.beat_interval_seconds


def run_beat(settings: FarmSettings | None = None, loglevel: str = "INFO") -> None:
    """Run Celery beat with the CatalogScheduler until stopped."""
    settings = settings or get_settings()
    beat_app = app_for(settings)
    beat_app.Beat(scheduler_cls=f"{__name__}:CatalogScheduler", loglevel=loglevel,
                  max_interval=settings.beat_interval_seconds).run()
