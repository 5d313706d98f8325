"""Celery task bodies. The message carries a job id only; the catalog decides who runs it."""

from __future__ import annotations

import logging
import os
import signal
import socket

from celery.signals import worker_process_init

from farm.catalog import repository as repo
from farm.catalog.session import session_scope
from farm.errors import JobFailed
from farm.queue import PROGRESS_EVENT, RUN_JOB_TASK, celery_app
from farm.settings import get_settings

log = logging.getLogger("farm.worker")
app = celery_app


def worker_name(task=None) -> str:
    hostname = getattr(getattr(task, "request", None), "hostname", None) or socket.gethostname()
    return f"{hostname}/pid{os.getpid()}"


# throws: a failed job's task is a FAILURE logged in one line, without a traceback (see _end_task_as_job)
@celery_app.task(name=RUN_JOB_TASK, bind=True, acks_late=True, throws=(JobFailed,))
def run_job(self, job_id: str) -> dict:
    """Claim the job in the catalog (a duplicate delivery loses and returns) and supervise one attempt of it."""
    from workers.job_run import JobRun

    settings = get_settings()
    if settings.cotrain_max > 1:  # compatible waiting jobs are claimed with it, to train together
        from workers.cotrain_run import claim_group

        claims = claim_group(job_id, worker_name(self), settings)
    else:
        with session_scope(settings.database_url) as session:
            claims = [repo.claim_job(session, job_id, worker_name(self), settings.lease_seconds)]
    claim = claims[0] if claims else None
    if claim is None:
        log.info("job %s: not claimable (already taken, finished or cancelled); skipping", job_id)
        _end_skipped_task_as_job(self, job_id, settings)
        return {"job_id": job_id, "skipped": True}

    # Progress arrives on the runner-reader thread, where Celery's task request (thread-local) is not set, so the
    # event dispatcher is opened here with the request's id and hostname and used only by that thread.
    request_id, hostname = self.request.id, self.request.hostname
    connection = self.app.connection_for_write()
    dispatcher = self.app.events.Dispatcher(connection, hostname=hostname, enabled=True)

    def relay(progress: dict, job: str = job_id, attempt: int = claim.attempt) -> None:
        try:
            dispatcher.send(PROGRESS_EVENT, uuid=request_id, job_id=job, attempt=attempt, **progress)
        except Exception as exc:  # progress on the bus is a courtesy; the catalog has it anyway
            log.debug("progress event not sent: %s", exc)

    global _current_run
    if len(claims) > 1:  # one runner for the group; each job keeps its own attempt and outcome
        from workers.cotrain_run import GroupRun

        _current_run = GroupRun(claims, settings, on_progress=lambda job, attempt, event: relay(event, job, attempt))
    else:
        _current_run = JobRun(claim, settings, on_progress=relay)
    # billiard resets signal handlers after worker_process_init, so the handler goes in here, around the job.
    previous = signal.signal(signal.SIGTERM, _stop_current_run)
    try:
        state = _current_run.run()
        if isinstance(state, dict):  # a co-trained group: this message's own job decides the task's state
            state = state.get(job_id, "succeeded")
        _end_task_as_job(dispatcher, request_id, job_id, state, settings)
    finally:
        _current_run = None
        signal.signal(signal.SIGTERM, previous)
        dispatcher.close()
        connection.release()
        from farm.model_fetch import release_pins

        release_pins()  # the attempt's cached base models may be evicted again
    log.info("job %s attempt %d ended %s", job_id, claim.attempt, state)
    return {"job_id": job_id, "attempt": claim.attempt, "state": state}


_current_run = None


def _end_skipped_task_as_job(task, job_id: str, settings) -> None:
    """A message whose job already ended (cancelled while waiting, or trained in another task's co-training
    group) ends in the job's state too: a cancelled job's task is CANCELLED in Flower, not SUCCESS."""
    from farm.catalog.models import CANCELLED, FAILED, Job

    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        state = job.state if job is not None else None
    if state not in (CANCELLED, FAILED):
        return
    with task.app.connection_for_write() as connection:
        dispatcher = task.app.events.Dispatcher(connection, hostname=task.request.hostname, enabled=True)
        try:
            _end_task_as_job(dispatcher, task.request.id, job_id, state, settings)
        finally:
            dispatcher.close()


def _end_task_as_job(dispatcher, request_id: str, job_id: str, state: str, settings) -> None:
    """The Celery task ends in the state that matches the job's, so Flower tells the truth.

    succeeded -> SUCCESS (return normally); failed -> FAILURE (JobFailed, one line in the log, no traceback);
    cancelled -> CANCELLED and handed back / lost -> RETRY (the event Flower reads, then Ignore: the message is
    acknowledged and no task-succeeded follows).
    """
    from celery.exceptions import Ignore

    if state == "failed":
        with session_scope(settings.database_url) as session:
            job = repo.get_job(session, job_id)
            first = (job.error_message or "").splitlines()[0][:300] if job.error_message else ""
        raise JobFailed(f"job {job_id} failed ({job.error_code}: {first})")
    if state == "succeeded":
        return
    try:
        if state == "cancelled":
            # A custom event, not task-revoked: once a task-progress event has been seen, Celery's event state (and
            # so Flower) ranks REVOKED below the custom PROGRESS state and would keep showing PROGRESS.
            dispatcher.send("task-cancelled", uuid=request_id, job_id=job_id)
        else:
            dispatcher.send("task-retried", uuid=request_id, exception=f"job {job_id} is {state}: another attempt "
                            "will resume it", traceback="")
    except Exception as exc:  # Flower's view is a courtesy
        log.debug("task state event not sent: %s", exc)
    raise Ignore()


def _stop_current_run(signum, frame):
    """SIGTERM in a pool process (the supervisor stops its workers): stop the runner's group, hand the job back."""
    run = _current_run
    if run is None:
        raise SystemExit(0)
    run.stop_requested.set()


# No thread runs in this process. The prefork pool forks its children from it, and a thread holding a lock at that
# moment (an import lock, a logging lock) leaves the child blocked on it for good. The lease reaper and the webhook
# sender run in the reaper process (workers/reaper.py) that `farm worker` starts beside its workers.


@worker_process_init.connect
def _start_zygote(**_):
    """The pool process (kept between jobs) starts its zygote now, so the imports of torch, transformers
    and peft happen while the worker waits for work, not when a job arrives (workers/launch.py)."""
    from workers.launch import Zygote

    if os.environ.get("FARM_WARM_START", "1").strip().lower() not in ("0", "false", "no", "off"):
        Zygote.for_this_process()

