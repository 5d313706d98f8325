"""Supervising the runner child process: start it in its own process group (the command from workers/launch.py),
watch it, stop its whole group.

`watch` is the loop of one attempt: it waits for the runner while it renews the lease on a heartbeat, and stops
the runner's group when the job is cancelled, runs past its time limit, loses its lease, or the worker is being
stopped. It knows nothing of the catalog: the heartbeat is a callable that says why to stop, if it should.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from workers.pdeathsig import die_with_parent

# Why the watch loop stopped the runner (None: the runner exited on its own).
CANCELLED, TIMEOUT, WORKER_STOPPING, LOST = "cancelled", "timeout", "worker_stopping", "lost"


@dataclass(frozen=True)
class ChildExit:
    """How the runner child ended: its exit status and why it was stopped, if it was."""

    returncode: int | None
    reason: str | None


def start_child(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """Start the runner in its own session (process group), killed by the kernel if this process dies."""
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, preexec_fn=die_with_parent, env=env, cwd=cwd, text=True,
                            bufsize=1)


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


CANCEL_POLL_SECONDS = 0.5
"""How often `watch` asks `cancel_check` between heartbeats: cancel is paced by the request, not the heartbeat."""
CANCEL_GRACE_SECONDS = 1.0
"""A cancelled runner's group gets SIGKILL this long after SIGTERM (nothing of a cancelled job is kept)."""


def watch(proc: subprocess.Popen, reader: threading.Thread, *, heartbeat: Callable[[], str | None],
          heartbeat_seconds: float, timeout_minutes: float | None, stop_requested: threading.Event,
          lost: Callable[[], bool], cancel_check: Callable[[], bool] | None = None) -> ChildExit:
    """Wait for the runner; every `heartbeat_seconds` call `heartbeat`, which returns a reason to stop (or None),
    and every CANCEL_POLL_SECONDS `cancel_check` (a cheap read: True once the job is being cancelled).

    On leaving, for whatever reason, the runner's group is killed if it still runs (a cancelled one with a short
    grace), and the `reader` thread (relaying its output) gets up to 30 s to drain what the runner wrote.
    """
    deadline = time.monotonic() + timeout_minutes * 60 if timeout_minutes else None
    reason = None
    next_beat = time.monotonic() + heartbeat_seconds
    next_cancel_check = time.monotonic() + CANCEL_POLL_SECONDS
    try:
        while True:
            try:
                proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            if stop_requested.is_set():
                reason = WORKER_STOPPING
                break
            if deadline is not None and time.monotonic() > deadline:
                reason = TIMEOUT
                break
            if lost():
                break
            if cancel_check is not None and time.monotonic() >= next_cancel_check:
                next_cancel_check = time.monotonic() + CANCEL_POLL_SECONDS
                if cancel_check():
                    reason = CANCELLED
                    break
            if time.monotonic() < next_beat:
                continue
            next_beat = time.monotonic() + heartbeat_seconds
            reason = heartbeat()
            if reason is not None:
                break
    finally:
        if proc.poll() is None:
            kill_group(proc, grace=CANCEL_GRACE_SECONDS if reason == CANCELLED else 5.0)
        reader.join(timeout=30)
    return ChildExit(proc.returncode, reason)
