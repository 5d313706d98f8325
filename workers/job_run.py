"""One claimed attempt of a job, supervised: fetch inputs, start the runner in its own process group, relay its
progress, renew the lease, enforce cancel and time limits, then publish or record the failure.

Heavy work never happens here: this runs in a Celery pool process that only watches the runner.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

from farm.catalog import repository as repo
from farm.catalog.models import CANCELLING
from farm.catalog.repository import Claim
from farm.catalog.session import session_scope
from farm.errors import FarmError, StaleAttempt
from farm.runner_protocol import parse_line
from farm.settings import FarmSettings
from workers import inputs
from workers.launch import runner_command

log = logging.getLogger("farm.worker")

# Errors that another attempt cannot fix: the job fails at once.
PERMANENT_ERRORS = {"invalid_spec", "invalid_dataset", "invalid_model", "integrity_violation", "unschedulable"}
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the runner child: get SIGKILL if the supervising worker process dies (no orphaned training)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def kill_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the runner's whole process group (every rank), then SIGKILL what is left after `grace` seconds."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            # ranks may outlive the launcher: make sure the group is empty
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
        return


class JobRun:
    """Runs one claimed attempt to its end. `on_progress` relays progress (a Celery event) besides the catalog."""

    def __init__(self, claim: Claim, settings: FarmSettings, on_progress: Callable[[dict], None] | None = None):
        self.claim = claim
        self.settings = settings
        self.on_progress = on_progress or (lambda event: None)
        self.dir = Path(settings.work_dir).resolve() / claim.job_id / f"attempt-{claim.attempt}"
        self.done: dict | None = None
        self.error: dict | None = None
        self.lost = False
        self.log_tail: deque[str] = deque(maxlen=40)
        self._db_lock = threading.Lock()
        self.stop_requested = threading.Event()  # set by the pool process's SIGTERM handler

    # ------------------------------------------------------------ catalog helpers (fenced by the claim)

    def _write(self, fn, *args, **kwargs):
        try:
            with self._db_lock, session_scope(self.settings.database_url) as session:
                return fn(session, self.claim, *args, **kwargs)
        except StaleAttempt:
            self.lost = True
            raise

    # ------------------------------------------------------------ the attempt

    def run(self) -> str:
        """Returns the job's final state for this attempt: succeeded, failed, cancelled, recovering or lost."""
        with session_scope(self.settings.database_url) as session:
            job = repo.get_job(session, self.claim.job_id)
            spec, job_info = dict(job.spec), {
                "id": job.id, "attempt": self.claim.attempt, "queue": job.queue, "worker": self.claim.worker,
                "submitted_by": job.submitted_by, "spec_hash": job.spec_hash,
                "created_at": job.created_at.isoformat(), "started_at": job.started_at and job.started_at.isoformat(),
            }
            ckpt = repo.latest_checkpoint(session, job.id)
            ckpt = (ckpt.prefix, ckpt.step) if ckpt else None
        try:
            job_file, job_doc = self._prepare(spec, ckpt)
        except FarmError as exc:
            return self._finish_failed(exc.code, exc.message)
        except Exception as exc:  # a store or network hiccup: another attempt may do better
            return self._finish_failed("input_fetch_failed", f"{type(exc).__name__}: {exc}")
        rc, reason = self._supervise(job_file, spec)
        if self.lost:
            return "lost"
        if reason == "cancelled":
            self._write(repo.mark_cancelled)
            return "cancelled"
        if reason == "worker_stopping":  # the worker is shutting down: hand the job back, it resumes elsewhere
            return self._finish_failed("worker_stopped", "the worker was stopped; the job resumes from its last "
                                                         "checkpoint on another worker", retry=True)
        if reason == "timeout":
            return self._finish_failed("timeout", f"killed after resources.timeout_minutes="
                                                  f"{spec['resources'].get('timeout_minutes')}", retry=False)
        if rc == 0 and self.done is not None:
            from workers.publish import publish_artifact

            try:
                adapter = publish_artifact(self, spec, job_info, job_doc)
            except StaleAttempt:
                return "lost"
            except Exception as exc:  # the store or catalog failed mid-publish: the next attempt republishes
                log.exception("job %s: publishing failed", self.claim.job_id)
                return self._finish_failed("publish_failed", f"{type(exc).__name__}: {exc}", retry=True)
            log.info("job %s published %s", self.claim.job_id, adapter)
            shutil.rmtree(self.dir, ignore_errors=True)
            return "succeeded"
        if self.error:
            return self._finish_failed(self.error.get("code", "runner_error"), self.error.get("message", ""))
        tail = "\n".join(self.log_tail)
        if rc is not None and rc < 0:
            return self._finish_failed("runner_killed", f"runner killed by signal {-rc}\n{tail}")
        return self._finish_failed("runner_crashed", f"runner exited with status {rc}\n{tail}")

    def _finish_failed(self, code: str, message: str, retry: bool | None = None) -> str:
        retry = code not in PERMANENT_ERRORS if retry is None else retry
        try:
            if retry:
                requeue = self._write(repo.release_for_retry, code, message)
                if requeue:
                    from farm.queue import ring_doorbell

                    with session_scope(self.settings.database_url) as session:
                        queue = repo.get_job(session, self.claim.job_id).queue
                    ring_doorbell(self.claim.job_id, queue, settings=self.settings, countdown=2)
                    return "recovering"
                return "failed"
            self._write(repo.fail_job, code, message)
        except StaleAttempt:
            return "lost"
        return "failed"

    def _prepare(self, spec: dict, ckpt: tuple[str, int] | None) -> tuple[Path, dict]:
        s = self.settings
        if self.dir.exists():
            shutil.rmtree(self.dir)
        (self.dir / "output").mkdir(parents=True)
        (self.dir / "checkpoints").mkdir()
        doc = {
            "job_id": self.claim.job_id, "attempt": self.claim.attempt, "spec": spec,
            "base_model": inputs.fetch_model(spec["base_model"], s),
            "finetuned_model": inputs.fetch_model(spec["finetuned_model"], s) if spec.get("finetuned_model") else None,
            "dataset": None, "eval_dataset": None, "continue_from": None, "resume_from": None, "resume_step": None,
            "output_dir": str(self.dir / "output"), "checkpoint_dir": str(self.dir / "checkpoints"),
        }
        if spec["kind"] == "train":
            doc["dataset"] = inputs.fetch_dataset(spec["dataset"]["path"], s)
            if spec["dataset"].get("eval_path"):
                doc["eval_dataset"] = inputs.fetch_dataset(spec["dataset"]["eval_path"], s)
            if spec.get("continue_from"):
                doc["continue_from"] = str(inputs.fetch_adapter(spec["continue_from"], self.dir / "parent", s))
        if ckpt is not None:
            prefix, step = ckpt
            doc["resume_from"] = str(inputs.fetch_checkpoint(prefix, self.dir / "resume" / f"step-{step}", s))
            doc["resume_step"] = step
        job_file = self.dir / "job.json"
        job_file.write_text(json.dumps(doc, indent=2))
        return job_file, doc

    def _supervise(self, job_file: Path, spec: dict) -> tuple[int | None, str | None]:
        argv, env = runner_command(job_file, spec)
        log.info("job %s attempt %d: %s", self.claim.job_id, self.claim.attempt, " ".join(argv))
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_die_with_parent, env=env, cwd=self.dir,
                                text=True, bufsize=1)
        reader = threading.Thread(target=self._relay, args=(proc,), daemon=True)
        reader.start()
        timeout_min = spec.get("resources", {}).get("timeout_minutes")
        deadline = time.monotonic() + timeout_min * 60 if timeout_min else None
        reason = None
        next_beat = time.monotonic() + self.settings.heartbeat_seconds
        try:
            while True:
                try:
                    proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if self.stop_requested.is_set():
                    reason = "worker_stopping"
                    break
                if deadline is not None and time.monotonic() > deadline:
                    reason = "timeout"
                    break
                if self.lost:
                    break
                if time.monotonic() < next_beat:
                    continue
                next_beat = time.monotonic() + self.settings.heartbeat_seconds
                try:
                    if self._write(repo.renew_lease, self.settings.lease_seconds) == CANCELLING:
                        reason = "cancelled"
                        break
                except StaleAttempt:
                    log.warning("job %s attempt %d lost its lease; stopping", self.claim.job_id, self.claim.attempt)
                    break
                except Exception as exc:  # the catalog blinked; the lease has slack for a few misses
                    log.warning("heartbeat failed: %s", exc)
        finally:
            if proc.poll() is None:
                kill_group(proc)
            reader.join(timeout=30)
        return proc.returncode, reason

    def _relay(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            event = parse_line(line)
            if event is None:
                self.log_tail.append(line.rstrip())
                log.debug("runner: %s", line.rstrip())
                continue
            try:
                self._handle(event)
            except StaleAttempt:
                log.warning("job %s: stale attempt; killing runner", self.claim.job_id)
                kill_group(proc, grace=1)
            except Exception:
                log.exception("job %s: could not handle runner event %s", self.claim.job_id, event.get("type"))

    def _handle(self, event: dict) -> None:
        kind = event.pop("type")
        if kind == "progress":
            self._write(repo.record_progress, event)
            self.on_progress(event)
        elif kind in ("eval", "log"):
            self._write(repo.record_progress, event, event_type=kind)
        elif kind == "checkpoint":
            self._upload_checkpoint(int(event["step"]), Path(event["path"]))
        elif kind == "done":
            self.done = event
        elif kind == "error":
            self.error = event

    def _upload_checkpoint(self, step: int, path: Path) -> None:
        from farm.store import open_store
        from farm.store.transfer import upload_tree

        prefix = f"jobs/{self.claim.job_id}/checkpoints/step-{step}/"
        files = upload_tree(open_store(self.settings.store_url, self.settings), path, prefix)
        self._write(repo.record_checkpoint, step, prefix, files)
        shutil.rmtree(path, ignore_errors=True)
