"""The runner child process: `python -m workers.runner JOB_JSON_PATH`.

Reads the job file the supervisor wrote (farm/runner_protocol.py), runs the runner its spec's kind registers
(farm/kinds.py), and reports through JSON-line events on stdout. Exit status 0 after a `done` event; 1 after an
`error` event: a FarmError keeps its code and message, anything else becomes `runner_crashed` with the end of the
traceback (so the supervisor may try another attempt).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

from farm.errors import FarmError, SpecError
from farm.kinds import require_kind
from farm.runner_protocol import emit

TRACEBACK_LINES = 15


def limit_threads() -> int:
    """Use the CPUs this process may run on (a pinned worker's share), unless OMP_NUM_THREADS says otherwise.

    torch reads OMP_NUM_THREADS itself; without it, it sizes its pool by the machine's cores, which oversubscribes
    a worker restricted to a few of them (taskset, cgroup cpusets).
    """
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    torch.set_num_threads(max(1, cpus))
    return torch.get_num_threads()


def limit_memory() -> None:
    """Cap this runner's address space at FARM_RUNNER_MEMORY_LIMIT_MB (RLIMIT_AS) when set: a job that
    needs more fails to allocate, and is retried with a smaller micro-batch. For CPU runners: CUDA reserves more
    address space than any sensible cap, and a GPU's own memory is its limit."""
    from farm.settings import get_settings

    limit_mb = get_settings().runner_memory_limit_mb
    if limit_mb:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit_mb * 2**20, limit_mb * 2**20))
        emit({"type": "log", "message": f"address space capped at {limit_mb} MiB (FARM_RUNNER_MEMORY_LIMIT_MB)"})


def read_json_file(path: str | Path, what: str = "job file"):
    """The JSON content of a file the supervisor wrote; SpecError naming `what` when it is missing or not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(f"{path}: unreadable {what}: {exc}") from None


def read_job(path: str | Path) -> dict:
    """The job file as a dict; SpecError when it is missing, not JSON, or has no spec kind."""
    job = read_json_file(path)
    kind = job.get("spec", {}).get("kind") if isinstance(job, dict) and isinstance(job.get("spec"), dict) else None
    require_kind(kind, f"{path}: spec")
    return job


def run_job(job: dict) -> None:
    """Run the job's kind's runner; heavy modules are imported only for the kind that runs."""
    limit_threads()
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # progress bars would flood the supervisor's log tail
    except ImportError:
        pass
    require_kind(job["spec"]["kind"]).runner_function()(job, emit)


def main(argv: list[str] | None = None) -> int:
    """Run the job named on the command line; return the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m workers.runner JOB_JSON_PATH", file=sys.stderr)
        return 2
    try:
        limit_memory()
        run_job(read_job(argv[0]))
    except FarmError as exc:
        emit({"type": "error", "code": exc.code, "message": exc.message})
        return 1
    except Exception as exc:
        from farm.automation.oom import OOM_CODE, is_out_of_memory  # retried with a smaller micro-batch

        lines = traceback.format_exc().rstrip().splitlines()[-TRACEBACK_LINES:]
        code = OOM_CODE if is_out_of_memory(exc) else "runner_crashed"
        emit({"type": "error", "code": code, "message": "\n".join(lines)})
        return 1
    return 0


def exit_now(status: int) -> None:
    """Leave as soon as the output is flushed: every file is closed and `done` or `error` is sent by
    now, and the interpreter's teardown (finalising torch, threads, modules) cost seconds after a job. One process
    only: the ranks of a multi-process job leave the ordinary way, after their collectives."""
    sys.stdout.flush()
    sys.stderr.flush()
    if os.environ.get("WORLD_SIZE", "1") == "1":
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    exit_now(main())
