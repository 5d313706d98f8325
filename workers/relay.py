"""Relaying the runner's output: its events to the catalog (and the event bus), its other lines to a log tail.

The runner speaks farm/runner_protocol.py on stdout. `EventRelay.read` runs on its own thread for the whole
attempt: progress, eval and log events become job events, a checkpoint is uploaded to the store and recorded,
`done` and `error` are kept for the outcome. A write refused as stale (another attempt owns the job now) kills
the runner's group: nothing it does can count any more.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections import deque
from pathlib import Path
from typing import Callable

from farm.catalog import repository as repo
from farm.errors import StaleAttempt
from farm.names import checkpoint_prefix
from farm.runner_protocol import parse_line
from farm.settings import FarmSettings
from workers.child import kill_group

log = logging.getLogger("farm.worker")
LOG_TAIL_LINES = 40

Write = Callable[..., object]
"""Runs a repository function fenced by the attempt's claim: write(repo_fn, *args) (workers/job_run.py)."""


class EventRelay:
    """What the runner said during one attempt: `done` and `error` events, and the last lines of its log."""

    def __init__(self, job_id: str, settings: FarmSettings, write: Write,
                 on_progress: Callable[[dict], None]):
        self.job_id = job_id
        self.settings = settings
        self.write = write
        self.on_progress = on_progress
        self.done: dict | None = None
        self.error: dict | None = None
        self.log_tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self.log_file: Path | None = None
        """Where the attempt's whole log is kept (uploaded to the store by workers/job_logs.py)."""

    def read(self, proc: subprocess.Popen) -> None:
        """Relay every line the runner writes until it closes its stdout."""
        assert proc.stdout is not None
        keep = self.log_file.open("a", encoding="utf-8") if self.log_file is not None else None
        try:
            self._read(proc, keep)
        finally:
            if keep is not None:
                keep.close()

    def _read(self, proc: subprocess.Popen, keep) -> None:
        for line in proc.stdout:
            event = parse_line(line)
            if keep is not None and (event is None or event.get("type") == "log"):
                keep.write(line if event is None else f"{event.get('message', '')}\n")
                keep.flush()
            if event is None:
                self.log_tail.append(line.rstrip())
                log.debug("runner: %s", line.rstrip())
                continue
            try:
                self.handle(event)
            except StaleAttempt:
                log.warning("job %s: stale attempt; killing runner", self.job_id)
                kill_group(proc, grace=1)
            except Exception:
                log.exception("job %s: could not handle runner event %s", self.job_id, event.get("type"))

    def handle(self, event: dict) -> None:
        """Act on one event (farm/runner_protocol.py lists them)."""
        kind = event.pop("type")
        if kind == "progress":
            self.write(repo.record_progress, event)
            self.on_progress(event)
        elif kind in ("eval", "log"):
            self.write(repo.record_progress, event, event_type=kind)
        elif kind == "checkpoint":
            self.upload_checkpoint(int(event["step"]), Path(event["path"]),
                                   {"loss": event.get("loss"), "eval_loss": event.get("eval_loss")})
        elif kind == "done":
            self.done = event
        elif kind == "error":
            self.error = event

    def upload_checkpoint(self, step: int, path: Path, metrics: dict | None = None) -> None:
        """Upload a checkpoint folder (checksums.json last), record it, then free the local copy; older ones beyond
        training.keep_checkpoints leave the store."""
        from farm.store import open_store
        from farm.store.transfer import upload_tree

        prefix = checkpoint_prefix(self.job_id, step)
        files = upload_tree(open_store(self.settings.store_url, self.settings), path, prefix)
        self.write(repo.record_checkpoint, step, prefix, files, metrics)
        shutil.rmtree(path, ignore_errors=True)
        from farm.checkpoints import prune_as_training_goes

        prune_as_training_goes(self.job_id, settings=self.settings)

    def tail(self) -> str:
        """The runner's last log lines, for a failure's message."""
        return "\n".join(self.log_tail)
