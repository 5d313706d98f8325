"""Where and with what a job ran: library versions, host, devices (recorded in the adapter's provenance).

One record, one shape, whatever the job's kind: every runner (training, extraction, merge) calls `environment()`.
The farm's own version and git commit are added by the publisher (farm.artifacts.build_metadata). Imports torch
only inside `device_info`, in the runner.
"""

from __future__ import annotations

import platform
import socket
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "deepspeed", "accelerate", "tokenizers", "safetensors")


def package_version(name: str) -> str | None:
    """Installed version of a distribution, or None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info() -> dict:
    """{type: cuda | cpu, count, names}."""
    import torch

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        return {"type": "cuda", "count": count, "names": [torch.cuda.get_device_name(i) for i in range(count)]}
    return {"type": "cpu", "count": 1, "names": [_cpu_name()], "threads": torch.get_num_threads()}


def environment() -> dict:
    """The provenance's environment record."""
    versions = {name: package_version(name) for name in PACKAGES}
    return {
        "python": sys.version.split()[0],
        **versions,
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "device": device_info(),
    }
