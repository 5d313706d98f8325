"""Worker slots: which devices one Celery worker owns, and the command line that starts it pinned to them.

A slot is one GPU (or one CPU slot), or a group of N for N-device jobs. Its worker serves the queue for jobs of
exactly that size (farm/specs.py queue_for) and sees only its devices (CUDA_VISIBLE_DEVICES).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

from pydantic import SecretStr

from farm.errors import FarmError
from farm.names import queue_name
from farm.settings import FarmSettings


@dataclass(frozen=True)
class Slot:
    """The devices one worker owns: kind "gpu" or "cpu" and their indexes (CPU slots are numbered 0..N-1)."""

    kind: str
    indexes: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.indexes)

    @property
    def name(self) -> str:
        """gpu0, gpu0-3 for a consecutive group, gpu0_2 otherwise (cpu… likewise): the worker's node name."""
        first, last = self.indexes[0], self.indexes[-1]
        if self.size == 1:
            return f"{self.kind}{first}"
        if list(self.indexes) == list(range(first, last + 1)):
            return f"{self.kind}{first}-{last}"
        return self.kind + "_".join(map(str, self.indexes))

    @property
    def queue(self) -> str:
        """The queue of jobs needing exactly this many devices (farm/specs.py queue_for)."""
        if self.kind == "gpu":
            return queue_name(gpus=self.size)
        return queue_name(cpu_slots=self.size)

    @property
    def device_list(self) -> str:
        return ",".join(map(str, self.indexes))

    def describe(self) -> str:
        what = "GPU" if self.kind == "gpu" else "CPU slot"
        return f"{what}{'s' if self.size > 1 else ''} {self.device_list}"


def plan_slots(kind: str, indexes: list[int], group: int) -> list[Slot]:
    """Split devices into worker slots of `group` consecutive devices (in the order given).

    Raises FarmError when the kind is unknown, no device is given, group < 1, or group does not divide the count.
    """
    if kind not in ("gpu", "cpu"):
        raise FarmError(f"device kind {kind!r} is unknown: use 'gpu' or 'cpu'", field="kind")
    what = "GPU" if kind == "gpu" else "CPU slot"
    if group < 1:
        raise FarmError(f"--group {group}: a worker needs at least one device; use --group 1 or more",
                        field="group")
    if not indexes:
        raise FarmError(f"no {what} selected: nothing to run", field=f"{kind}s")
    if len(set(indexes)) != len(indexes):
        raise FarmError(f"{what}s {','.join(map(str, indexes))}: a device is listed twice", field=f"{kind}s")
    if len(indexes) % group:
        raise FarmError(f"--group {group} does not divide the {len(indexes)} {what}s selected "
                        f"({','.join(map(str, indexes))}): each worker owns exactly {group}; select a multiple "
                        f"of {group} devices or change --group", field="group")
    return [Slot(kind, tuple(indexes[i:i + group])) for i in range(0, len(indexes), group)]


def settings_env(settings: FarmSettings) -> dict[str, str]:
    """The settings as FARM_* variables, so a worker sees what its supervisor was given (secrets left out)."""
    env = {}
    dumped = settings.model_dump(mode="json")
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        # workers need no API secrets; one set in the environment reaches them with it anyway
        if value is None or isinstance(value, SecretStr):
            continue
        if isinstance(value, dict) and any(isinstance(v, SecretStr) for v in value.values()):
            continue
        raw = dumped[name]
        env[f"FARM_{name.upper()}"] = json.dumps(raw) if isinstance(raw, (dict, list)) else str(raw)
    return env


def worker_command(slot: Slot, hostname: str, settings: FarmSettings,
                   app: str = "workers.tasks") -> tuple[list[str], dict[str, str]]:
    """argv and environment of the Celery worker serving `slot`, pinned to its devices."""
    node = f"{slot.name}@{hostname}"
    argv = [sys.executable, "-m", "celery", "-A", app, "worker", "-P", "prefork", "--concurrency", "1",
            "-Q", slot.queue, "-n", node, "--loglevel", "INFO", "-E"]
    env = dict(os.environ)
    env.update(settings_env(settings))
    env.update(FARM_WORKER_KIND=slot.kind, FARM_WORKER_DEVICES=slot.device_list, FARM_WORKER_NODE=node)
    # Celery retitles its processes with setproctitle when installed, which by default writes over the memory of
    # /proc/<pid>/environ; keep that readable (which devices does this worker see?) for operators and drills.
    env["SPT_NOENV"] = "1"
    if slot.kind == "gpu":
        # nvidia-smi numbers GPUs in PCI bus order; CUDA's default order (fastest first) may differ
        env.update(CUDA_VISIBLE_DEVICES=slot.device_list, CUDA_DEVICE_ORDER="PCI_BUS_ID")
        env.pop("FARM_CPU_SLOTS", None)
    else:
        env.update(CUDA_VISIBLE_DEVICES="", FARM_CPU_SLOTS=str(slot.size))
    return argv, env
