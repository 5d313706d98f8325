"""Where and with what a job ran: library versions, host, devices (recorded in the adapter's provenance)."""

from __future__ import annotations

import platform
import socket
import subprocess
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


def git_commit() -> str | None:
    """The farm checkout's commit when it runs from a git working tree (None for an installed wheel)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


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
        "farm": package_version("lora-farm"),
        "farm_git_commit": git_commit(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "device": device_info(),
    }
