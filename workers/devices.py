"""The GPUs of this host, as nvidia-smi sees them, and which of them a worker may use.

Discovery never touches CUDA: the supervisor (and the Celery worker's main process) must not create a CUDA
context, so we ask `nvidia-smi` instead of torch. No nvidia-smi, or a failing one, means no GPU.
"""

from __future__ import annotations

import csv
import logging
import os
import platform
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field

from farm.errors import FarmError

log = logging.getLogger("farm.devices")

NVIDIA_SMI_QUERY = ["--query-gpu=index,name,uuid", "--format=csv,noheader"]


@dataclass(frozen=True)
class Device:
    """One GPU: its nvidia-smi index (PCI bus order), product name and UUID."""

    index: int
    name: str
    uuid: str


@dataclass(frozen=True)
class GpuProbe:
    """What discovery found: the devices, and when there are none, why (for error messages)."""

    devices: list[Device] = field(default_factory=list)
    problem: str | None = None


def parse_nvidia_smi_csv(text: str) -> list[Device]:
    """Devices from the output of `nvidia-smi --query-gpu=index,name,uuid --format=csv,noheader`."""
    devices = []
    for row in csv.reader(text.splitlines(), skipinitialspace=True):
        if not row or not row[0].strip():
            continue
        if len(row) < 3 or not row[0].strip().isdigit():
            raise ValueError(f"unexpected nvidia-smi line: {','.join(row)!r}")
        # a product name could hold a comma: the index is first and the UUID last
        devices.append(Device(int(row[0]), ", ".join(r.strip() for r in row[1:-1]), row[-1].strip()))
    return sorted(devices, key=lambda d: d.index)


def probe_gpus(nvidia_smi: str = "nvidia-smi", timeout: float = 30.0) -> GpuProbe:
    """Ask nvidia-smi for this host's GPUs; a missing or failing nvidia-smi yields none, with the reason."""
    try:
        out = subprocess.run([nvidia_smi, *NVIDIA_SMI_QUERY], capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return GpuProbe(problem=f"{nvidia_smi} not found on PATH")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return GpuProbe(problem=f"{nvidia_smi} could not run: {exc}")
    if out.returncode != 0:
        detail = (out.stderr or out.stdout).strip().splitlines()
        return GpuProbe(problem=f"{nvidia_smi} exited with code {out.returncode}: {detail[0] if detail else ''}")
    try:
        devices = parse_nvidia_smi_csv(out.stdout)
    except ValueError as exc:
        return GpuProbe(problem=str(exc))
    return GpuProbe(devices=devices, problem=None if devices else f"{nvidia_smi} lists no GPU")


def discover_gpus(nvidia_smi: str = "nvidia-smi") -> list[Device]:
    """This host's GPUs in index order; empty when there is no usable nvidia-smi (the reason is logged)."""
    probe = probe_gpus(nvidia_smi)
    if probe.problem:
        log.info("no GPU found: %s", probe.problem)
    return probe.devices


def parse_gpu_selection(text: str, available: list[Device]) -> list[int]:
    """GPU indexes from `--gpus`: "all" or a comma-separated list like "0,1,2,3" (returned sorted).

    Raises FarmError for an empty list, a token that is not an index, a duplicate, or an index this host lacks.
    """
    have = sorted(d.index for d in available)
    have_text = ", ".join(map(str, have)) if have else "none"
    text = (text or "").strip()
    if text.lower() == "all":
        if not have:
            raise FarmError("--gpus all: this host has no GPU; to run CPU workers use --cpus N (or --cpu)",
                            field="gpus")
        return have
    tokens = [t.strip() for t in text.split(",")]
    if not text or any(not t for t in tokens):
        raise FarmError(f"--gpus {text!r}: give 'all' or GPU indexes separated by commas, like 0,1 "
                        f"(GPUs on this host: {have_text})", field="gpus")
    chosen: list[int] = []
    for token in tokens:
        if not token.isdigit():
            raise FarmError(f"--gpus {text!r}: {token!r} is not a GPU index; give 'all' or indexes like 0,1 "
                            f"(GPUs on this host: {have_text})", field="gpus")
        index = int(token)
        if index in chosen:
            raise FarmError(f"--gpus {text!r}: GPU {index} is listed twice; name each GPU once", field="gpus")
        if index not in have:
            hint = "use --cpus N for CPU workers" if not have else f"GPUs on this host: {have_text}"
            raise FarmError(f"--gpus {text!r}: this host has no GPU {index} ({hint})", field="gpus")
        chosen.append(index)
    return sorted(chosen)


def visible_gpus(available: list[Device], env: Mapping[str, str] | None = None) -> list[Device]:
    """The devices a process with this environment may use, following CUDA_VISIBLE_DEVICES.

    Unset means all; "" means none; entries are indexes or UUID prefixes, and like CUDA we stop at the first
    entry that names no device. Indexes are nvidia-smi's (the farm's workers set CUDA_DEVICE_ORDER=PCI_BUS_ID).
    """
    env = os.environ if env is None else env
    spec = env.get("CUDA_VISIBLE_DEVICES")
    if spec is None:
        return list(available)
    seen: list[Device] = []
    for entry in (e.strip() for e in spec.split(",")):
        match = None
        if entry.isdigit():
            match = next((d for d in available if d.index == int(entry)), None)
        elif entry:
            match = next((d for d in available if d.uuid.startswith(entry)), None)
        if match is None:
            break
        if match not in seen:
            seen.append(match)
    return seen


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_description(env: Mapping[str, str] | None = None, available: list[Device] | None = None) -> dict:
    """The devices this process works on, for provenance: type (cuda | cpu), count and names.

    CUDA devices are those nvidia-smi lists, narrowed by CUDA_VISIBLE_DEVICES; with none, the CPU slots of the
    worker (FARM_CPU_SLOTS, default 1). Never initialises CUDA.
    """
    env = os.environ if env is None else env
    gpus = visible_gpus(discover_gpus() if available is None else available, env)
    if gpus:
        return {"type": "cuda", "count": len(gpus), "names": [d.name for d in gpus],
                "indexes": [d.index for d in gpus], "uuids": [d.uuid for d in gpus]}
    try:
        slots = max(1, int(env.get("FARM_CPU_SLOTS", "1")))
    except ValueError:
        slots = 1
    return {"type": "cpu", "count": slots, "names": [_cpu_name()] * slots, "cpu_count": os.cpu_count()}
