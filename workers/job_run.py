"""One claimed attempt of a job, from inputs to outcome. Heavy work never happens here: this runs in a Celery pool
process that only watches the runner.

The attempt in order, one module per concern:

1. fetch the inputs the job's kind declares and write the runner's job file (workers/inputs.py);
2. start the runner in its own process group and watch it: heartbeat, cancel, time limit, worker stop
   (workers/child.py), while a thread relays its events to the catalog (workers/relay.py);
3. decide the outcome and record it: publish (workers/publish.py), or fail through the retry policy
   (workers/outcome.py, farm.errors.next_state).

Every catalog write is fenced by the claim: once another attempt owns the job, this one is `lost` and stops.
"""

from __future__ import annotations

import logging
import shutil
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from farm.catalog import repository as repo
from farm.catalog.models import CANCELLING
from farm.catalog.repository import Claim
from farm.catalog.session import session_scope
from farm.errors import FarmError, InputFetchFailed, PublishFailed, StaleAttempt
from farm.kinds import JobKind, require_kind
from farm.settings import FarmSettings
from workers import inputs
from workers.child import CANCELLED, LOST, watch
from workers.launch import WarmRunner, start_runner
from workers.outcome import Outcome, decide, record_failure
from workers.job_logs import LogUploader
from workers.relay import EventRelay

log = logging.getLogger("farm.worker")


@dataclass(frozen=True)
class JobInfo:
    """The job's catalog facts that an attempt needs and its provenance records."""

    id: str
    attempt: int
    queue: str
    worker: str
    submitted_by: str | None
    spec_hash: str
    created_at: str
    started_at: str | None


class JobRun:
    """Runs one claimed attempt to its end. `on_progress` relays progress (a Celery event) besides the catalog."""

    def __init__(self, claim: Claim, settings: FarmSettings, on_progress: Callable[[dict], None] | None = None):
        self.claim = claim
        self.settings = settings
        self.dir = Path(settings.work_dir).resolve() / claim.job_id / f"attempt-{claim.attempt}"
        self.lost = False
        self.relay = EventRelay(claim.job_id, settings, self.write, on_progress or (lambda event: None))
        # the runner's whole log, kept in the store (`farm logs`)
        self.logs = LogUploader(settings, claim.job_id, claim.attempt, self.dir / "runner.log")
        self.relay.log_file = self.logs.path
        self._db_lock = threading.Lock()
        self.stop_requested = threading.Event()  # set by the pool process's SIGTERM handler

    def write(self, fn, *args, **kwargs):
        """Run repository write `fn(session, claim, *args, **kwargs)` fenced by the claim (serialised: the relay
        thread writes too); StaleAttempt (the attempt was taken over) marks this run lost and propagates."""
        try:
            with self._db_lock, session_scope(self.settings.database_url) as session:
                return fn(session, self.claim, *args, **kwargs)
        except StaleAttempt:
            self.lost = True
            raise

    # ------------------------------------------------------------ the attempt

    def run(self) -> str:
        """Returns the job's final state for this attempt: succeeded, failed, cancelled, recovering or lost."""
        info, spec, checkpoint = self.load()
        try:
            kind = require_kind(spec.get("kind"))
            job_file, job_doc = inputs.write_job_file(self.dir, self.claim.job_id, self.claim.attempt, spec,
                                                      checkpoint, self.settings)
        except FarmError as exc:
            return self.fail(Outcome.failed(exc))
        except Exception as exc:  # a store or network hiccup: another attempt may do better
            return self.fail(Outcome.failed(InputFetchFailed(f"{type(exc).__name__}: {exc}")))
        timeout_minutes = spec.get("resources", {}).get("timeout_minutes")
        child = self._supervise(job_file, spec, timeout_minutes)
        self.logs.sync()  # the attempt's last lines, before its outcome is recorded
        outcome = decide(child, self.relay, lost=self.lost, timeout_minutes=timeout_minutes)
        if outcome.kind == "lost":
            return "lost"
        if outcome.kind == "cancelled":
            self.write(repo.mark_cancelled)
            return "cancelled"
        if outcome.kind == "failed":
            return self.fail(outcome)
        return self.publish(kind, spec, info, job_doc)

    def load(self) -> tuple[JobInfo, dict, tuple[str, int] | None]:
        """(what the artifact records about the job, its spec, its latest checkpoint's (prefix, step) or None)."""
        with session_scope(self.settings.database_url) as session:
            job = repo.get_job(session, self.claim.job_id)
            info = JobInfo(id=job.id, attempt=self.claim.attempt, queue=job.queue, worker=self.claim.worker,
                           submitted_by=job.submitted_by, spec_hash=job.spec_hash,
                           created_at=job.created_at.isoformat(),
                           started_at=job.started_at and job.started_at.isoformat())
            ckpt = repo.latest_checkpoint(session, job.id)
            return info, dict(job.spec), (ckpt.prefix, ckpt.step) if ckpt else None

    def _supervise(self, job_file: Path, spec: dict, timeout_minutes: float | None):
        proc = start_runner(job_file, spec, self.dir,  # forked warm from the zygote when it can be
                            keep_alive=(self._heartbeat, self.settings.heartbeat_seconds))
        log.info("job %s attempt %d: runner pid %d (%s): %s", self.claim.job_id, self.claim.attempt, proc.pid,
                 "warm" if isinstance(proc, WarmRunner) else "cold", " ".join(map(str, proc.args)))
        reader = threading.Thread(target=self.relay.read, args=(proc,), daemon=True)
        reader.start()
        return watch(proc, reader, heartbeat=self._heartbeat, heartbeat_seconds=self.settings.heartbeat_seconds,
                     timeout_minutes=timeout_minutes, stop_requested=self.stop_requested, lost=lambda: self.lost,
                     cancel_check=self._cancel_requested)

    def _cancel_requested(self) -> bool:
        """Whether the job is being cancelled, read between heartbeats (one indexed SELECT), so a cancel
        stops the runner within about a second instead of at the next heartbeat."""
        from sqlalchemy import select

        from farm.catalog.models import Job

        try:
            with session_scope(self.settings.database_url) as session:
                return session.scalar(select(Job.state).where(Job.id == self.claim.job_id)) == CANCELLING
        except Exception:  # the catalog blinked: the heartbeat notices the cancel anyway
            return False

    def _heartbeat(self) -> str | None:
        """Renew the lease; a reason to stop the runner when the job is being cancelled or was taken over."""
        self.logs.sync()  # `farm logs -f` follows the attempt as it runs
        try:
            if self.write(repo.renew_lease, self.settings.lease_seconds) == CANCELLING:
                return CANCELLED
        except StaleAttempt:
            log.warning("job %s attempt %d lost its lease; stopping", self.claim.job_id, self.claim.attempt)
            return LOST
        except Exception as exc:  # the catalog blinked; the lease has slack for a few misses
            log.warning("heartbeat failed: %s", exc)
        return None

    def fail(self, outcome: Outcome) -> str:
        """Record a failed outcome through the retry policy (workers/outcome.py record_failure); the job's state:
        "recovering" (re-enqueued), "failed" or "lost"."""
        return record_failure(self.write, self.settings, self.claim.job_id, outcome.code, outcome.message)

    def publish(self, kind: JobKind, spec: dict, info: JobInfo, job_doc: dict) -> str:
        """Publish the runner's output (workers/publish.py), then drop the scratch folder and the job's checkpoints:
        "succeeded", "lost" when the attempt was taken over, or the state a failed publish leaves the job in."""
        from workers.publish import RunnerOutput, publish

        out = RunnerOutput(kind=kind, spec=spec, job_info=asdict(info), job_doc=job_doc, done=self.relay.done or {},
                           output_dir=self.dir / "output")
        try:
            published = publish(self.settings, self.claim, out)
        except StaleAttempt:
            return "lost"
        except Exception as exc:  # the store or catalog failed mid-publish: the next attempt republishes
            log.exception("job %s: publishing failed", self.claim.job_id)
            return self.fail(Outcome.failed(PublishFailed(f"{type(exc).__name__}: {exc}")))
        log.info("job %s published %s", self.claim.job_id, published)
        shutil.rmtree(self.dir, ignore_errors=True)
        try:  # the job's checkpoints go after publishing unless training.keep_checkpoints_after_publish
            from farm.checkpoints import prune_after_publish

            prune_after_publish(self.claim.job_id, settings=self.settings)
        except Exception:  # the adapter is published; leftover checkpoints are only storage
            log.exception("job %s: could not delete its checkpoints", self.claim.job_id)
        return "succeeded"
