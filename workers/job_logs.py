"""The runner's whole log of an attempt, copied to the store (farm/names.py says where) while it runs and once
more when it ends: `farm logs JOB [-f]` reads it from there, long after the worker's scratch folder is gone."""

from __future__ import annotations

import logging
from pathlib import Path

from farm.names import job_log_key
from farm.settings import FarmSettings

log = logging.getLogger("farm.worker")


class LogUploader:
    """Uploads `path` to jobs/<id>/logs/attempt-<n>.log whenever it grew since the last upload."""

    def __init__(self, settings: FarmSettings, job_id: str, attempt: int, path: Path):
        self.settings = settings
        self.key = job_log_key(job_id, attempt)
        self.path = Path(path)
        self._uploaded = -1

    def sync(self) -> None:
        """Upload the log when it changed; a failure is logged, never raised (the log must not fail the job)."""
        try:
            size = self.path.stat().st_size
        except OSError:
            return
        if size == self._uploaded:
            return
        try:
            from farm.store import open_store

            open_store(self.settings.store_url, self.settings).put_file(self.path, self.key)
            self._uploaded = size
        except Exception as exc:
            log.warning("could not upload the runner log to %s: %s", self.key, exc)
