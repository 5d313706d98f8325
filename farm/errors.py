"""One flat hierarchy of errors a user can meet, and the retry policy, declared.

Each message says what was wrong and what to do. Each class says whether another attempt of a job can fix it
(`retryable`, as dramatiq's `throws` does) and whether it is the caller's bad input (`invalid_input`: the CLI exits
2). `next_state` is the one function that turns a failed attempt into the job's next state; the catalog's
transitions, the worker and the CLI all ask here.
"""

from __future__ import annotations

from typing import Literal


class FarmError(Exception):
    """Base of every error the farm raises on purpose. `code` is a stable machine-readable name."""

    code = "farm_error"
    retryable = True
    """Whether another attempt of the job may succeed where this one failed with this error."""
    invalid_input = False
    """The caller's input is wrong (a spec, a dataset, a model, resources): fix it and submit again."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict:
        out = {"code": self.code, "message": self.message}
        if self.field:
            out["field"] = self.field
        return out


class SpecError(FarmError):
    """The job spec is invalid: a field has a bad value, a key is unknown, or the YAML does not parse."""

    code = "invalid_spec"
    retryable, invalid_input = False, True


class DatasetError(FarmError):
    """The dataset cannot be used: missing, unreadable, or a line that does not parse or lacks its format's fields."""

    code = "invalid_dataset"
    retryable, invalid_input = False, True


class ModelError(FarmError):
    """The base (or fine-tuned) model cannot be used: unreachable, no config, or missing target modules."""

    code = "invalid_model"
    retryable, invalid_input = False, True


class SettingsError(FarmError):
    """A FARM_* environment variable holds a value the farm cannot use."""

    code = "invalid_settings"
    retryable, invalid_input = False, True


class ResourceError(FarmError):
    """The job asks for resources no worker of this farm can ever provide."""

    code = "unschedulable"
    retryable, invalid_input = False, True


class NotFound(FarmError):
    """A job, adapter or version does not exist in the catalog."""

    code = "not_found"


class StaleAttempt(FarmError):
    """A write came from a job attempt that no longer owns the job (its lease expired or was taken over)."""

    code = "stale_attempt"


class InvalidState(FarmError):
    """The job is not in a state that allows this operation (cancel a finished job, say)."""

    code = "invalid_state"


class StoreError(FarmError):
    """The object store failed or holds something unexpected."""

    code = "store_error"


class ChecksumMismatch(StoreError):
    """A downloaded file's sha256 differs from the one recorded: the artifact is corrupt; nothing was written."""

    code = "checksum_mismatch"


class JobFailed(FarmError):
    """The job ran and failed; the message carries the recorded error."""

    code = "job_failed"


class IntegrityError(FarmError):
    """Training touched what it must not: frozen base weights changed, or non-adapter parameters were trainable."""

    code = "integrity_violation"
    retryable = False


class AuthError(FarmError):
    """Missing or unknown API token."""

    code = "unauthorized"


class BundleError(FarmError):
    """An adapter bundle cannot be imported: not a tar, an unsafe member, incomplete, or its manifest does not
    match its bytes. Nothing was written."""

    code = "invalid_bundle"
    retryable, invalid_input = False, True


# ---------------------------------------------------------------- how an attempt can end badly (worker side)

class AttemptTimedOut(FarmError):
    """The runner ran past resources.timeout_minutes and was killed; another attempt would run as long."""

    code = "timeout"
    retryable = False


class WorkerStopped(FarmError):
    """The worker was stopped while running the job; the job resumes from its last checkpoint elsewhere."""

    code = "worker_stopped"


class WorkerLost(FarmError):
    """The worker stopped heartbeating (it died or lost the catalog); the reaper hands the job to another."""

    code = "worker_lost"


class InputFetchFailed(FarmError):
    """The worker could not fetch the job's inputs (a store or network hiccup)."""

    code = "input_fetch_failed"


class PublishFailed(FarmError):
    """The store or the catalog failed while publishing; the next attempt publishes again (idempotent)."""

    code = "publish_failed"


class RunnerCrashed(FarmError):
    """The runner exited non-zero without reporting an error (the message carries the end of its output)."""

    code = "runner_crashed"


class RunnerKilled(FarmError):
    """The runner was killed by a signal (the kernel's OOM killer, say)."""

    code = "runner_killed"


class EvictedForMemory(FarmError):
    """A co-training group ran out of memory and this job, its newest member, left it; the next attempt trains it
    alone (`training.cotrain` turns false in its spec, farm.automation.oom)."""

    code = "cotrain_out_of_memory"


class OutOfMemory(FarmError):
    """Training could not allocate memory (CUDA's or the CPU allocator's); the next attempt resumes with half the
    micro-batch and twice the accumulation (farm.automation.oom), until micro-batch 1."""

    code = "out_of_memory"


# ---------------------------------------------------------------- the retry policy

RECOVERING: Literal["recovering"] = "recovering"  # the catalog's job states (farm.catalog.models)
FAILED: Literal["failed"] = "failed"


def error_class(code: str) -> type[FarmError] | None:
    """The FarmError class whose `code` is `code` (None for a code no class declares)."""
    stack = [FarmError]
    while stack:
        cls = stack.pop()
        if cls.code == code:
            return cls
        stack.extend(cls.__subclasses__())
    return None


def retryable(code: str) -> bool:
    """Whether another attempt can fix a failure with this code; a code no class declares may be transient."""
    cls = error_class(code)
    return True if cls is None else cls.retryable


def is_invalid_input(code: str) -> bool:
    """Whether an error with this code is the caller's bad input (the CLI exits 2 on it)."""
    cls = error_class(code)
    return cls is not None and cls.invalid_input


def attempts_left(attempt: int, max_attempts: int) -> bool:
    """Whether a job that has used `attempt` of its `max_attempts` may be claimed once more."""
    return attempt < max_attempts


def next_state(code: str, *, attempt: int, max_attempts: int) -> Literal["recovering", "failed"]:
    """The job's state after attempt `attempt` failed with `code`: `recovering` (another attempt resumes from the
    last checkpoint) when a retry can fix the error and attempts remain, else `failed`."""
    return RECOVERING if retryable(code) and attempts_left(attempt, max_attempts) else FAILED
