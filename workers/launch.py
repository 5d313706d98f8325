"""The command line that starts a job's runner: one process, or N ranks for a multi-device DeepSpeed job."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def runner_command(job_file: Path, spec: dict) -> tuple[list[str], dict[str, str]]:
    """argv and environment of the runner child process for this job."""
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    resources = spec.get("resources", {})
    ranks = resources.get("gpus") or resources.get("cpu_slots") or 1
    if ranks > 1:
        from workers.distributed import distributed_command  # DeepSpeed / torchrun launcher

        return distributed_command(job_file, spec, ranks, env)
    return [sys.executable, "-m", "workers.runner", str(job_file)], env
