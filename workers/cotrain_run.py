"""A co-training group's attempt: several claimed jobs, one runner process (workers/cotrain_runner.py).

Each job keeps its own `JobRun` (workers/job_run.py): its inputs and job file, its claim-fenced catalog writes,
its event relay (progress, evals, checkpoints), its outcome and publish. This module adds what a group needs:

- one runner for all, started in its own session; its events carry a `job_id` and go to that job's relay;
- one heartbeat renews every lease (repository.renew_leases); a job whose claim went stale is told to leave;
- a job being cancelled (checked every second) or past its own time limit is told to leave on the runner's
  control channel (its stdin); the runner drops it at the next step, its neighbours go on;
- a job that reports `done` is published at once, while the others train; one that reports `error` fails alone;
- when the runner dies (or the worker stops), every job still in it ends its attempt as a crashed runner would:
  back to `recovering` by the retry policy, to resume from its own latest checkpoint, in a new group or alone.
"""

from __future__ import annotations

import json
import logging
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

from farm.catalog import repository as repo
from farm.catalog.models import CANCELLING, Job
from farm.catalog.repository import Claim
from farm.catalog.session import session_scope
from farm.errors import (
    AttemptTimedOut,
    EvictedForMemory,
    FarmError,
    InputFetchFailed,
    RunnerCrashed,
    RunnerKilled,
    WorkerStopped,
)
from farm.runner_protocol import parse_line
from farm.settings import FarmSettings
from workers import inputs
from workers.child import kill_group
from workers.job_run import JobRun
from workers.outcome import Outcome

log = logging.getLogger("farm.worker")
CANCEL_POLL_S = 0.5  # how often the group looks for cancelled jobs (cancel of one job must take <= 3 s)
TERMINAL_EVENTS = ("done", "error", "left")


def cotrain_key(spec: dict):
    """farm.training.cotrain.cotrain_key without importing the training package's heavy parts."""
    from farm.training.cotrain import cotrain_key as key

    return key(spec)


def claim_group(job_id: str, worker: str, settings: FarmSettings) -> list[Claim]:
    """Claim the job and up to FARM_COTRAIN_MAX - 1 compatible waiting jobs in one transaction."""
    with session_scope(settings.database_url) as session:
        return repo.claim_cotrain_group(session, job_id, worker, settings.lease_seconds, settings.cotrain_max,
                                        cotrain_key)


class GroupRun:
    """Runs one attempt of each claimed job, together, to their ends; `run()` returns {job_id: final state}."""

    def __init__(self, claims: list[Claim], settings: FarmSettings,
                 on_progress: Callable[[str, int, dict], None] | None = None):
        """`on_progress(job_id, attempt, event)` relays progress (a Celery event) besides the catalog."""
        self.settings = settings
        self.report = on_progress or (lambda job_id, attempt, event: None)
        self.runs = {c.job_id: self._job_run(c) for c in claims}
        first = claims[0]
        self.dir = Path(settings.work_dir).resolve() / "groups" / f"{first.job_id}-{first.attempt}"
        self.stop_requested = threading.Event()  # set by the pool process's SIGTERM handler
        self.states: dict[str, str] = {}
        self.active: dict[str, dict] = {}  # job_id -> {info, spec, doc, kind, deadline}
        self.ended: queue.Queue = queue.Queue()  # (job_id, event) of done / error / left
        self.proc: subprocess.Popen | None = None
        self._stdin_lock = threading.Lock()

    def _job_run(self, claim: Claim) -> JobRun:
        return JobRun(claim, self.settings, on_progress=lambda e: self.report(claim.job_id, claim.attempt, e))

    # ------------------------------------------------------------------ the attempt

    def run(self) -> dict[str, str]:
        for job_id, run in self.runs.items():
            self._prepare(job_id, run)
        if self.active:
            first = next(iter(self.active.values()))
            self.queue, self.key = first["info"].queue, cotrain_key(first["spec"])
            self._supervise()
        return self.states

    def _prepare(self, job_id: str, run: JobRun) -> bool:
        """Fetch the job's inputs and write its job file; a failure ends its attempt alone."""
        from farm.kinds import require_kind

        info, spec, checkpoint = run.load()
        try:
            kind = require_kind(spec.get("kind"))
            _, doc = inputs.write_job_file(run.dir, job_id, run.claim.attempt, spec, checkpoint, self.settings)
        except FarmError as exc:
            self.states[job_id] = run.fail(Outcome.failed(exc))
            return False
        except Exception as exc:  # a store or network hiccup: another attempt may do better
            self.states[job_id] = run.fail(Outcome.failed(InputFetchFailed(f"{type(exc).__name__}: {exc}")))
            return False
        timeout = spec.get("resources", {}).get("timeout_minutes")
        self.active[job_id] = {"info": info, "spec": spec, "doc": doc, "kind": kind, "timeout": timeout,
                               "deadline": time.monotonic() + timeout * 60 if timeout else None}
        return True

    def _grow(self) -> None:
        """Continuous batching: claim compatible jobs that started waiting meanwhile; they join between steps."""
        room = self.settings.cotrain_max - len(self.active)
        if room <= 0 or self.key is None:
            return
        worker = next(iter(self.runs.values())).claim.worker
        try:
            with session_scope(self.settings.database_url) as session:
                claims = repo.claim_cotrain_partners(session, kind="train", queue=self.queue, wanted=self.key,
                                                     worker=worker, lease_seconds=self.settings.lease_seconds,
                                                     limit=room, key=cotrain_key)
        except Exception as exc:  # the catalog blinked; try at the next heartbeat
            log.warning("group claim of joining jobs failed: %s", exc)
            return
        for claim in claims:
            run = self.runs[claim.job_id] = self._job_run(claim)
            if self._prepare(claim.job_id, run):
                log.info("job %s joins the co-training group", claim.job_id)
                self._send({"op": "join", "job": self.active[claim.job_id]["doc"]})

    def _start(self) -> subprocess.Popen:
        from workers.launch import WarmRunner, start_group_runner

        self.dir.mkdir(parents=True, exist_ok=True)
        group_file = self.dir / "group.json"
        group_file.write_text(json.dumps({"jobs": [a["doc"] for a in self.active.values()]}, indent=1))
        first = next(iter(self.active.values()))
        # forked warm from the worker's zygote when it can be, with the slot's CPU share
        proc = start_group_runner(group_file, first["spec"], self.dir,
                                  keep_alive=(self._heartbeat, self.settings.heartbeat_seconds))
        log.info("co-training group %s: runner pid %d (%s): %s", ", ".join(self.active), proc.pid,
                 "warm" if isinstance(proc, WarmRunner) else "cold", " ".join(map(str, proc.args)))
        return proc

    def _supervise(self) -> None:
        self.proc = proc = self._start()
        reader = threading.Thread(target=self._read, args=(proc,), daemon=True)
        reader.start()
        next_beat = next_cancel_check = time.monotonic()
        try:
            while self.active:
                self._settle_ended()
                if proc.poll() is not None or self.stop_requested.is_set():
                    break
                now = time.monotonic()
                for job_id, a in list(self.active.items()):
                    if a["deadline"] is not None and now > a["deadline"] and not a.get("leaving"):
                        self._tell_leave(job_id, "timeout")
                if now >= next_cancel_check:
                    next_cancel_check = now + CANCEL_POLL_S
                    self._check_cancels()
                if now >= next_beat:
                    next_beat = now + self.settings.heartbeat_seconds
                    self._heartbeat()
                    self._grow()
                time.sleep(0.2)
        finally:
            stopping = self.stop_requested.is_set()
            if proc.poll() is None and (stopping or not self.active):
                self._close_stdin()
                try:
                    proc.wait(timeout=0 if stopping else 30)
                except subprocess.TimeoutExpired:
                    pass
            if proc.poll() is None:
                kill_group(proc)
            reader.join(timeout=30)
            self._settle_ended()
            self._end_orphans(proc.returncode, stopping)
            shutil.rmtree(self.dir, ignore_errors=True)  # the group file; each job's folder is its JobRun's

    # ------------------------------------------------------------------ runner I/O

    def _read(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            event = parse_line(line)
            job_id = event.pop("job_id", None) if event else None
            run = self.runs.get(str(job_id)) if job_id is not None else None
            if run is None:  # the group's own lines (a traceback, a library's warning): every job's log keeps them
                for job in list(self.active):
                    self.runs[job].relay.log_tail.append(line.rstrip())
                    self._keep_log(self.runs[job], line)
                continue
            if event["type"] == "log":
                self._keep_log(run, f"{event.get('message', '')}\n")
            if event["type"] in TERMINAL_EVENTS:
                self.ended.put((str(job_id), dict(event)))
            if event["type"] == "left":
                continue
            try:
                run.relay.handle(event)
            except Exception:
                log.exception("job %s: could not handle runner event %s", job_id, event.get("type"))

    @staticmethod
    def _keep_log(run: JobRun, text: str) -> None:
        """Append to the job's own runner log, which `farm logs` reads from the store (workers/job_logs.py)."""
        try:
            with run.logs.path.open("a", encoding="utf-8") as fh:
                fh.write(text if text.endswith("\n") else text + "\n")
        except OSError:  # the job's folder is gone (it was published): nothing left to keep
            pass

    def _tell_leave(self, job_id: str, reason: str) -> None:
        self.active[job_id]["leaving"] = reason
        self._send({"op": "leave", "job_id": job_id, "reason": reason})

    def _send(self, message: dict) -> None:
        """A control message to the runner (its stdin)."""
        try:
            with self._stdin_lock:
                self.proc.stdin.write(json.dumps(message) + "\n")
                self.proc.stdin.flush()
        except (OSError, ValueError):  # the runner is gone; the orphan handling ends the job
            pass

    def _close_stdin(self) -> None:
        try:
            with self._stdin_lock:
                self.proc.stdin.close()
        except (OSError, ValueError):
            pass

    # ------------------------------------------------------------------ catalog

    def _check_cancels(self) -> None:
        ids = [j for j, a in self.active.items() if not a.get("leaving")]
        if not ids:
            return
        try:
            with session_scope(self.settings.database_url) as session:
                rows = session.query(Job.id, Job.state, Job.attempt).filter(Job.id.in_(ids)).all()
        except Exception as exc:  # the catalog blinked; next second
            log.warning("cancel check failed: %s", exc)
            return
        for job_id, state, attempt in rows:
            if state == CANCELLING:
                self._tell_leave(job_id, "cancelled")
            elif attempt != self.runs[job_id].claim.attempt:
                self.runs[job_id].lost = True
                self._tell_leave(job_id, "lost")

    def _heartbeat(self) -> None:
        for job_id in list(self.active):  # `farm logs -f` follows each job of the group as it runs
            self.runs[job_id].logs.sync()
        claims = [self.runs[j].claim for j in self.active]
        try:
            with session_scope(self.settings.database_url) as session:
                states = repo.renew_leases(session, claims, self.settings.lease_seconds)
        except Exception as exc:  # the lease has slack for a few misses
            log.warning("group heartbeat failed: %s", exc)
            return
        if self.proc is None:  # renewed while the runner starts; a stale claim is told to leave once it runs
            return
        for job_id, state in states.items():
            if state is None and job_id in self.active and not self.active[job_id].get("leaving"):
                log.warning("job %s lost its lease; it leaves the group", job_id)
                self.runs[job_id].lost = True
                self._tell_leave(job_id, "lost")

    # ------------------------------------------------------------------ outcomes

    def _settle_ended(self) -> None:
        while True:
            try:
                job_id, event = self.ended.get_nowait()
            except queue.Empty:
                return
            a = self.active.pop(job_id, None)
            if a is None:
                continue
            self.states[job_id] = self._outcome(job_id, a, event)
            log.info("job %s left the group: %s", job_id, self.states[job_id])

    def _outcome(self, job_id: str, a: dict, event: dict) -> str:
        run = self.runs[job_id]
        run.logs.sync()  # the attempt's last lines, before its outcome is recorded
        if run.lost:
            return "lost"
        kind = event["type"]
        if kind == "done":
            return run.publish(a["kind"], a["spec"], a["info"], a["doc"])
        if kind == "error":
            return run.fail(Outcome("failed", event.get("code") or "runner_error", event.get("message", "")))
        reason = event.get("reason")
        if reason == "cancelled":
            run.write(repo.mark_cancelled)
            return "cancelled"
        if reason == "timeout":
            return run.fail(Outcome.failed(AttemptTimedOut(
                f"killed after resources.timeout_minutes={a['timeout']}")))
        if reason == "out_of_memory":  # its next attempt trains alone, from its checkpoint
            return run.fail(Outcome.failed(EvictedForMemory("evicted from its co-training group to fit in memory")))
        # incompatible: another attempt trains it elsewhere, from its checkpoint
        return run.fail(Outcome.failed(RunnerCrashed(f"left its co-training group: {reason}")))

    def _end_orphans(self, returncode: int | None, stopping: bool) -> None:
        """Jobs still in the group when its runner ended: each fails its attempt (and recovers) on its own."""
        for job_id, a in list(self.active.items()):
            run = self.runs[job_id]
            run.logs.sync()
            tail = run.relay.tail()
            if run.lost:
                self.states[job_id] = "lost"
            elif stopping:
                self.states[job_id] = run.fail(Outcome.failed(WorkerStopped(
                    "the worker was stopped; the job resumes from its last checkpoint on another worker")))
            elif returncode is not None and returncode < 0:
                self.states[job_id] = run.fail(Outcome.failed(RunnerKilled(
                    f"co-training runner killed by signal {-returncode}\n{tail}")))
            else:
                self.states[job_id] = run.fail(Outcome.failed(RunnerCrashed(
                    f"co-training runner exited with status {returncode}\n{tail}")))
            del self.active[job_id]

