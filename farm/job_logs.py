"""The runner's whole log of each attempt, kept in the store at jobs/<job_id>/logs/attempt-<n>.log.

The worker uploads it while the attempt runs (every heartbeat, when it grew) and once more when it ends, so
`farm logs JOB -f` can follow a running attempt and the log of a failed one outlives the 40-line tail in its error.
Part of the service layer (the CLI and the API read it through here).
"""

from __future__ import annotations

from farm.errors import NotFound
from farm.names import job_log_attempt, job_log_key, job_log_prefix
from farm.settings import FarmSettings, get_settings

__all__ = ["job_log_key", "log_attempts", "read_job_log"]  # job_log_key: the key layout lives in farm/names.py


def log_attempts(job_id: str, *, settings: FarmSettings | None = None) -> list[int]:
    """The attempts of a job (full id) that have a log in the store, in order."""
    from farm.store import open_store

    settings = settings or get_settings()
    attempts = []
    for key in open_store(settings.store_url, settings).list_keys(job_log_prefix(job_id)):
        attempt = job_log_attempt(key)
        if attempt is not None:
            attempts.append(attempt)
    return sorted(attempts)


def read_job_log(job_id: str, attempt: int | None = None, *, settings: FarmSettings | None = None,
                 ) -> tuple[str, int, str]:
    """(full job id, attempt, the log's text) of an attempt of a job (its latest when `attempt` is None).

    NotFound says which attempts have logs when the one asked for has none.
    """
    from farm import service
    from farm.store import open_store

    settings = settings or get_settings()
    job = service.get_job(job_id, settings=settings)
    attempts = log_attempts(job.id, settings=settings)
    if attempt is None:
        if not attempts:
            raise NotFound(f"job {job.id} has no log yet ({job.state}, attempt {job.attempt}): a log appears once "
                           "a worker runs it")
        attempt = attempts[-1]
    if attempt not in attempts:
        have = ", ".join(map(str, attempts)) or "none yet"
        raise NotFound(f"job {job.id} has no log for attempt {attempt} (attempts with a log: {have})",
                       field="attempt")
    data = open_store(settings.store_url, settings).get_bytes(job_log_key(job.id, attempt))
    return job.id, attempt, data.decode("utf-8", errors="replace")
