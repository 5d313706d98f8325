"""Process plumbing of the worker supervisor (workers/supervisor.py): signal a process group, list our live
children from /proc (the orphans a child subreaper adopts), and say how a process ended.

Linux only where it reads /proc; elsewhere `child_pids` answers None and the supervisor skips orphan handling.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def signal_group(pgid: int, sig: int) -> bool:
    """Signal a process group; False when it has no member left. Never our own group."""
    if pgid <= 1 or pgid == os.getpgrp():
        return False
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def child_pids() -> list[int] | None:
    """Our live direct children, from /proc (None where /proc is missing)."""
    fast = _child_pids_from_task_lists()
    if fast is not None:
        return fast
    me, out = os.getpid(), []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: fields resume after the last ')'
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 1 and fields[0] != b"Z" and int(fields[1]) == me:
            out.append(int(entry))
    return out


def _child_pids_from_task_lists() -> list[int] | None:
    # /proc/<pid>/task/<tid>/children (CONFIG_PROC_CHILDREN) spares reading every process's stat
    try:
        tids = os.listdir("/proc/self/task")
        pids = [int(pid) for tid in tids for pid in Path(f"/proc/self/task/{tid}/children").read_text().split()]
    except OSError:
        return None
    return [pid for pid in pids if not _is_zombie(pid)]


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return True  # gone already
    return stat[stat.rfind(b")") + 2:].split()[0] == b"Z"


def exit_text(code: int) -> str:
    """How a process ended, for a log line: "exited with code N" or "was killed by SIGKILL"."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
