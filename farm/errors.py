"""One flat hierarchy of errors a user can meet. Each message says what was wrong and what to do."""

from __future__ import annotations


class FarmError(Exception):
    """Base of every error the farm raises on purpose. `code` is a stable machine-readable name."""

    code = "farm_error"

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


class DatasetError(FarmError):
    """The dataset cannot be used: missing, unreadable, or a line that does not parse or lacks its format's fields."""

    code = "invalid_dataset"


class ModelError(FarmError):
    """The base (or fine-tuned) model cannot be used: unreachable, no config, or missing target modules."""

    code = "invalid_model"


class ResourceError(FarmError):
    """The job asks for resources no worker of this farm can ever provide."""

    code = "unschedulable"


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


class AuthError(FarmError):
    """Missing or unknown API token."""

    code = "unauthorized"
