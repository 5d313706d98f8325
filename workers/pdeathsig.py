"""Linux process-lifetime controls through prctl: a parent-death signal and child subreaping.

libc is loaded once, here, at import: the hooks below run as `preexec_fn`, between fork and exec, where loading a
library (taking the loader's locks in a forked copy of a threaded process) is not safe. Off Linux they do nothing.
"""

from __future__ import annotations

import ctypes
import signal
import sys

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _load_libc():
    if not sys.platform.startswith("linux"):
        return None  # prctl is Linux-only; elsewhere we do without parent-death signals and subreaping
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()


def set_parent_death_signal(sig: int) -> bool:
    """Ask the kernel to send `sig` to this process when its parent dies; False where that is not available."""
    return bool(_LIBC is not None and _LIBC.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0)


def become_subreaper() -> bool:
    """Adopt orphaned descendants (so none escapes to init); False where that is not available."""
    return bool(_LIBC is not None and _LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


def die_with_parent() -> None:
    """preexec_fn of a child that must not outlive its supervisor (a runner, a rank): SIGKILL on parent death."""
    set_parent_death_signal(signal.SIGKILL)


def term_with_parent() -> None:
    """preexec_fn of a child that should shut down warmly when its parent dies: SIGTERM on parent death."""
    set_parent_death_signal(signal.SIGTERM)
