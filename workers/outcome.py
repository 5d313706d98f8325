"""Deciding how an attempt ended, and recording a failure as the retry policy says.

`decide` reads what the runner did (its exit, its `done` or `error` event, why it was stopped) and names the
outcome; it writes nothing. `record_failure` ends a failed attempt through the one retry policy
(farm.errors.next_state, applied in the catalog by repository.end_failed_attempt) and rings the doorbell again
when the job goes back to `recovering`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from farm.catalog import repository as repo
from farm.catalog.models import RECOVERING
from farm.catalog.session import session_scope
from farm.errors import (
    AttemptTimedOut,
    EvictedForMemory,
    FarmError,
    OutOfMemory,
    RunnerCrashed,
    RunnerKilled,
    StaleAttempt,
    WorkerStopped,
)
from farm.settings import FarmSettings
from workers.child import CANCELLED, TIMEOUT, WORKER_STOPPING, ChildExit
from workers.relay import EventRelay, Write

RUNNER_ERROR = "runner_error"  # an `error` event without a code


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended: `publish` its output, it was `cancelled`, it was `lost` to another, or it `failed`."""

    kind: Literal["publish", "cancelled", "lost", "failed"]
    code: str = ""
    message: str = ""

    @classmethod
    def failed(cls, error: FarmError) -> Outcome:
        return cls("failed", error.code, error.message)


def decide(child: ChildExit, relay: EventRelay, *, lost: bool, timeout_minutes: float | None) -> Outcome:
    """The outcome of an attempt whose runner has ended (or was stopped)."""
    if lost:
        return Outcome("lost")
    if child.reason == CANCELLED:
        return Outcome("cancelled")
    if child.reason == WORKER_STOPPING:  # the worker is shutting down: hand the job back, it resumes elsewhere
        return Outcome.failed(WorkerStopped("the worker was stopped; the job resumes from its last checkpoint on "
                                            "another worker"))
    if child.reason == TIMEOUT:
        return Outcome.failed(AttemptTimedOut(f"killed after resources.timeout_minutes={timeout_minutes}"))
    if child.returncode == 0 and relay.done is not None:
        return Outcome("publish")
    if relay.error:
        return Outcome("failed", relay.error.get("code", RUNNER_ERROR), relay.error.get("message", ""))
    rc = child.returncode
    if rc is not None and rc < 0:
        return Outcome.failed(RunnerKilled(f"runner killed by signal {-rc}\n{relay.tail()}"))
    return Outcome.failed(RunnerCrashed(f"runner exited with status {rc}\n{relay.tail()}"))


def record_failure(write: Write, settings: FarmSettings, job_id: str, code: str, message: str) -> str:
    """End the attempt failed with `code`; returns the job's state: recovering (re-enqueued), failed, or lost."""
    from farm.queue import ring_doorbell

    try:
        if code == OutOfMemory.code:  # again with half the micro-batch, or fail saying what to change
            from farm.automation.oom import shrink_after_oom

            state = write(shrink_after_oom, message)
        elif code == EvictedForMemory.code:  # again, alone
            from farm.automation.oom import solo_after_group_oom

            state = write(solo_after_group_oom, message)
        else:
            state = write(repo.end_failed_attempt, code, message)
    except StaleAttempt:
        return "lost"
    if state == RECOVERING:
        with session_scope(settings.database_url) as session:
            queue = repo.get_job(session, job_id).queue
        ring_doorbell(job_id, queue, settings=settings, countdown=2)
    return state
