"""The runner child process: `python -m workers.runner JOB_JSON_PATH`.

Reads the job file the supervisor wrote (farm/runner_protocol.py), runs the job by its spec's kind, and reports
through JSON-line events on stdout. Exit status 0 after a `done` event; 1 after an `error` event: a FarmError
keeps its code and message, anything else becomes `runner_crashed` with the end of the traceback (so the
supervisor may try another attempt).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

from farm.errors import FarmError, SpecError
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


def read_job(path: str | Path) -> dict:
    """The job file as a dict; SpecError when it is missing, not JSON, or has no spec kind."""
    path = Path(path)
    try:
        job = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"{path}: job file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(f"{path}: unreadable job file: {exc}") from None
    kind = job.get("spec", {}).get("kind") if isinstance(job, dict) and isinstance(job.get("spec"), dict) else None
    if kind not in ("train", "extract"):
        raise SpecError(f"{path}: spec.kind must be 'train' or 'extract', got {kind!r}", field="kind")
    return job


def run_job(job: dict) -> None:
    """Dispatch on spec.kind; heavy modules are imported only for the kind that runs."""
    limit_threads()
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # progress bars would flood the supervisor's log tail
    except ImportError:
        pass
    if job["spec"]["kind"] == "train":
        from farm.training.run import run_training

        run_training(job, emit)
    else:
        from farm.extraction.run import run_extraction

        run_extraction(job, emit)


def main(argv: list[str] | None = None) -> int:
    """Run the job named on the command line; return the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m workers.runner JOB_JSON_PATH", file=sys.stderr)
        return 2
    try:
        run_job(read_job(argv[0]))
    except FarmError as exc:
        emit({"type": "error", "code": exc.code, "message": exc.message})
        return 1
    except Exception:
        lines = traceback.format_exc().rstrip().splitlines()[-TRACEBACK_LINES:]
        emit({"type": "error", "code": "runner_crashed", "message": "\n".join(lines)})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
