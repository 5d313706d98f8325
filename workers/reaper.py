"""The reaper: a process of its own that hands back jobs whose worker vanished and re-rings lost doorbells.

    python -m workers.reaper [--interval SECONDS] [--once]

Every `interval` (FARM_REAPER_INTERVAL_SECONDS; default a quarter of FARM_LEASE_SECONDS, at least 1 s) it runs
`farm.service.reap_lost_jobs`: a running job whose lease expired goes back to `recovering`; a waiting job quiet
for FARM_REQUEUE_AFTER_SECONDS whose message is gone from the broker, or is held unacknowledged by a worker that
never claimed it, gets a new doorbell. Transitions are compare-and-set in the catalog, so any number of reapers may run.

Why a process and not a thread in the Celery worker: the prefork pool forks a fresh child after every
job (`worker_max_tasks_per_child=1`), and a thread running in the forking process may hold a lock at that moment
(an import lock, a logging lock, a connection pool's) that the child inherits held and waits on forever. So no
thread runs in a process that forks: `farm worker`'s supervisor starts this process beside its workers (and
restarts it if it dies); it forks nothing. The job webhooks' sender runs here too, as a thread: safe in
a process that never forks, and out of the reaper's way when a webhook endpoint is slow.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time

from farm.settings import FarmSettings, get_settings

log = logging.getLogger("farm.reaper")


def default_interval(settings: FarmSettings) -> float:
    """FARM_REAPER_INTERVAL_SECONDS, else a quarter of the lease (a lost worker is noticed within ~1.25 leases)."""
    if settings.reaper_interval_seconds is not None:
        return settings.reaper_interval_seconds
    return max(1.0, settings.lease_seconds / 4)


def reap_once(settings: FarmSettings) -> list[str]:
    """One round; returns the ids of the jobs rung again. Catalog or broker failures are logged, not raised."""
    from farm.service import reap_lost_jobs

    try:
        requeued = reap_lost_jobs(settings=settings)
    except Exception as exc:  # keep reaping: the catalog or the broker may be briefly unavailable
        log.warning("reaper: %s: %s", type(exc).__name__, exc)
        return []
    if requeued:
        log.warning("rang again for jobs whose worker or message was lost: %s", ", ".join(requeued))
    return requeued


class Reaper:
    """The loop; `stop()` (SIGTERM, SIGINT) ends it after the current round (and stops the webhook sender)."""

    def __init__(self, settings: FarmSettings, interval: float | None = None):
        self.settings = settings
        self.interval = interval if interval is not None else default_interval(settings)
        self._stopping = False
        self._sender_stop = threading.Event()

    def stop(self, *_args) -> None:
        self._stopping = True
        self._sender_stop.set()

    def _start_webhook_sender(self) -> None:
        try:
            from farm.automation.webhooks import sender_loop
        except ImportError:  # a farm without job webhooks
            return
        threading.Thread(target=sender_loop, args=(self._sender_stop,), kwargs={"settings": self.settings},
                         name="farm-webhooks", daemon=True).start()

    def run(self, webhooks: bool = True) -> int:
        """Reap until stopped; `webhooks` also runs the job webhooks' sender beside the rounds."""
        log.info("reaping every %.1f s (lease %d s, requeue after %.0f s)", self.interval,
                 self.settings.lease_seconds, self.settings.requeue_after_seconds)
        if webhooks:
            self._start_webhook_sender()
        next_round = time.monotonic() + self.interval
        while not self._stopping:
            now = time.monotonic()
            if now < next_round:
                time.sleep(min(0.2, next_round - now))
                continue
            reap_once(self.settings)
            next_round = time.monotonic() + self.interval
        log.info("reaper stopped")
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.reaper", description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=None, help="seconds between rounds")
    parser.add_argument("--once", action="store_true", help="run one round and exit")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [reaper] %(message)s")
    settings = get_settings()
    if args.once:
        reap_once(settings)
        return 0
    reaper = Reaper(settings, args.interval)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, reaper.stop)
    return reaper.run()


if __name__ == "__main__":
    sys.exit(main())
