"""Celery task bodies. The message carries a job id only; the catalog decides who runs it."""

from __future__ import annotations

import logging
import os
import socket
import threading

import signal

from celery.signals import worker_ready, worker_shutting_down

from farm.catalog import repository as repo
from farm.catalog.session import session_scope
from farm.queue import PROGRESS_EVENT, RUN_JOB_TASK, celery_app
from farm.settings import get_settings

log = logging.getLogger("farm.worker")
app = celery_app


def worker_name(task=None) -> str:
    hostname = getattr(getattr(task, "request", None), "hostname", None) or socket.gethostname()
    return f"{hostname}/pid{os.getpid()}"


@celery_app.task(name=RUN_JOB_TASK, bind=True, acks_late=True)
def run_job(self, job_id: str) -> dict:
    """Claim the job in the catalog (a duplicate delivery loses and returns) and supervise one attempt of it."""
    from workers.job_run import JobRun

    settings = get_settings()
    with session_scope(settings.database_url) as session:
        claim = repo.claim_job(session, job_id, worker_name(self), settings.lease_seconds)
    if claim is None:
        log.info("job %s: not claimable (already taken, finished or cancelled); skipping", job_id)
        return {"job_id": job_id, "skipped": True}

    # Progress arrives on the runner-reader thread, where Celery's task request (thread-local) is not set, so the
    # event dispatcher is opened here with the request's id and hostname and used only by that thread.
    request_id, hostname = self.request.id, self.request.hostname
    connection = self.app.connection_for_write()
    dispatcher = self.app.events.Dispatcher(connection, hostname=hostname, enabled=True)

    def relay(progress: dict) -> None:
        try:
            dispatcher.send(PROGRESS_EVENT, uuid=request_id, job_id=job_id, attempt=claim.attempt, **progress)
        except Exception as exc:  # progress on the bus is a courtesy; the catalog has it anyway
            log.debug("progress event not sent: %s", exc)

    global _current_run
    _current_run = JobRun(claim, settings, on_progress=relay)
    # billiard resets signal handlers after worker_process_init, so the handler goes in here, around the job.
    previous = signal.signal(signal.SIGTERM, _stop_current_run)
    try:
        state = _current_run.run()
    finally:
        _current_run = None
        signal.signal(signal.SIGTERM, previous)
        dispatcher.close()
        connection.release()
    log.info("job %s attempt %d ended %s", job_id, claim.attempt, state)
    return {"job_id": job_id, "attempt": claim.attempt, "state": state}


_current_run = None


def _stop_current_run(signum, frame):
    """SIGTERM in a pool process (the supervisor stops its workers): stop the runner's group, hand the job back."""
    run = _current_run
    if run is None:
        raise SystemExit(0)
    run.stop_requested.set()


def _reaper_loop(stop: threading.Event) -> None:
    from farm.service import reap_lost_jobs

    settings = get_settings()
    interval = max(1.0, settings.lease_seconds / 4)
    while not stop.wait(interval):
        try:
            requeued = reap_lost_jobs(settings=settings)
            if requeued:
                log.warning("requeued jobs whose worker vanished: %s", ", ".join(requeued))
        except Exception as exc:  # keep reaping; the catalog may be briefly unavailable
            log.warning("reaper: %s", exc)


_reaper_stop = threading.Event()


@worker_ready.connect
def _start_reaper(**_):
    """Every worker also reaps expired leases (transitions are compare-and-set, so several reapers are safe)."""
    threading.Thread(target=_reaper_loop, args=(_reaper_stop,), name="farm-reaper", daemon=True).start()


@worker_shutting_down.connect
def _stop_reaper(**_):
    _reaper_stop.set()
