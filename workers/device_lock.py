"""One lock file per device so that two workers never share a device on one host.

The supervisor takes `<home>/locks/gpu<k>.lock` (or `cpu<k>.lock`) with a non-blocking `flock` before it starts
a worker and holds it while the worker lives. The worker inherits the locked descriptor too: if the supervisor
is killed outright, the lock stays held until its orphaned worker is gone as well, so nothing can start a
second worker on that device meanwhile (a restarted supervisor waits for it: see DeviceBusy.holder_gone). The file
records who holds it, for the error a latecomer gets.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from farm.errors import FarmError


class DeviceBusy(FarmError):
    """A device this supervisor was asked for is already held by another worker supervisor on this host.

    `holder_gone`: the supervisor that took it is dead and only its orphaned worker still holds the lock (it hands
    its job back and exits on its own); a new supervisor waits for the device then.
    """

    code = "device_busy"

    def __init__(self, message: str, *, field: str | None = None, holder_gone: bool = False,
                 worker_pid: int | None = None):
        super().__init__(message, field=field)
        self.holder_gone = holder_gone
        self.worker_pid = worker_pid


def _describe(kind: str, index: int) -> str:
    return f"GPU {index}" if kind == "gpu" else f"CPU slot {index}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DeviceLock:
    """A held lock on one device. `fd` is the locked descriptor (handed to the worker so it holds it too)."""

    def __init__(self, kind: str, index: int, path: Path, fd: int):
        self.kind, self.index, self.path, self.fd = kind, index, path, fd

    def record(self, **holder) -> None:
        """Write who holds the lock (supervisor pid, worker pid, node name) into the lock file."""
        data = json.dumps({"device": f"{self.kind}{self.index}", "supervisor_pid": os.getpid(),
                           "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **holder})
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (data + "\n").encode(), 0)

    def release(self) -> None:
        """Close our descriptor. The lock ends once no process (worker included) holds it any more.

        Deliberately no LOCK_UN: that would drop the lock for the inheriting worker too while it may still run.
        """
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def acquire_device_lock(lock_dir: Path, kind: str, index: int) -> DeviceLock:
    """Take the lock of one device, or raise DeviceBusy naming the device and the pid that holds it."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = (lock_dir / f"{kind}{index}.lock").resolve()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        sup, worker = holder.get("supervisor_pid"), holder.get("worker_pid")
        gone = isinstance(sup, int) and not _pid_alive(sup)
        raise DeviceBusy(_busy_message(kind, index, path, holder), field="gpus" if kind == "gpu" else "cpus",
                         holder_gone=gone, worker_pid=worker if isinstance(worker, int) else None)
    except BaseException:
        os.close(fd)
        raise
    lock = DeviceLock(kind, index, path, fd)
    lock.record()
    return lock


def acquire_device_locks(lock_dir: Path, kind: str, indexes: list[int]) -> list[DeviceLock]:
    """Take every device's lock or none: on the first busy device, release those taken and raise DeviceBusy."""
    taken: list[DeviceLock] = []
    try:
        for index in indexes:
            taken.append(acquire_device_lock(lock_dir, kind, index))
    except BaseException:
        for lock in taken:
            lock.release()
        raise
    return taken


def _read_holder(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        return json.loads(raw) if raw else {}
    except (OSError, ValueError):
        return {}


def _busy_message(kind: str, index: int, path: Path, holder: dict) -> str:
    device = _describe(kind, index)
    sup, worker, node = holder.get("supervisor_pid"), holder.get("worker_pid"), holder.get("node")
    if not isinstance(sup, int):
        return (f"{device} is already taken by another worker supervisor on this host (lock {path}, holder not "
                f"recorded yet); stop that supervisor first or choose other devices")
    if _pid_alive(sup):
        return (f"{device} is already taken by the worker supervisor with pid {sup}"
                f"{f' (worker {node})' if node else ''} (lock {path}); stop it first (kill -TERM {sup}) "
                f"or choose other devices")
    who = f"its worker {node} (pid {worker})" if node and worker else "a worker it started"
    return (f"{device} is still held: the worker supervisor with pid {sup} is gone but {who} still runs "
            f"(lock {path}); it got SIGQUIT when its supervisor died and exits once it has handed its job back "
            f"(kill -QUIT {worker if worker else '<pid>'} if it was started otherwise)")
