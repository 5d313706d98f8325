"""The training backend: the one seam between the loop and how gradients become updates, and the choice of one.

`Backend` declares the seam. The loop (farm.training.loop) only calls `shard`, `loss_sum`, `backward`, `step`,
`all_sum`, `lr`, `train`/`eval`; the checkpoint code calls `save_state`/`load_state` (optimizer and schedule, in the
backend's own layout), `gathered_adapter` and `barrier`; both ask `is_main_process` before writing what one
process writes. The backends, one a file, each a plain class of those methods:

- `farm.training.torch_backend.TorchBackend`: plain PyTorch in one process.
- `farm.training.deepspeed_backend.DeepSpeedBackend`: a `deepspeed.initialize` engine (ZeRO 2/3) for a job of
  several processes; `is_main_process` for rank 0 only.

`make_backend` chooses one, here and nowhere else; no backend imports this module.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from farm.errors import ResourceError
from farm.training.torch_backend import (  # noqa: F401 (importable from here, as before the split)
    OPTIMIZER_FILE,
    SCHEDULER_FILE,
    SCHEDULERS,
    TorchBackend,
    loss_sum,
)


class Backend(Protocol):
    """What a training backend provides: the loop's seam, the checkpoint's state, the provenance's description."""

    is_main_process: bool
    """Whether this process writes what one process writes (events, the adapter, the schedule)."""
    world_size: int
    """How many processes run the job."""
    rank: int
    """This process's index among them."""

    def train(self) -> None:
        """Put the model in training mode."""

    def eval(self) -> None:
        """Put the model in evaluation mode."""

    def shard(self, rows: list) -> list:
        """This process's part of a global micro-batch."""

    def loss_sum(self, batch) -> Any:
        """Forward one micro-batch; the summed token loss (a 0-dim tensor)."""

    def backward(self, loss) -> None:
        """Accumulate the gradients of `loss`."""

    def step(self) -> Any:
        """Clip, update, advance the schedule, clear gradients; the pre-clip gradient norm (a tensor) or None."""

    @property
    def lr(self) -> float:
        """The learning rate the next step will use."""

    def all_sum(self, tensor) -> Any:
        """The sum of `tensor` over all processes."""

    def barrier(self) -> None:
        """Wait until every process gets here."""

    def gathered_adapter(self, modify: bool = False) -> AbstractContextManager:
        """The adapter weights whole inside the block; every process must enter it."""

    def base_params_checksum(self) -> str:
        """The frozen base's checksum (farm.training.integrity)."""

    def describe(self) -> dict:
        """How the job was spread, for the provenance."""

    def save_state(self, folder: Path) -> None:
        """Optimizer and schedule state into a checkpoint folder."""

    def load_state(self, folder: Path) -> None:
        """Restore what save_state wrote."""


def process_count() -> int:
    """How many processes run this job (WORLD_SIZE, set by the multi-process launcher; 1 without one)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise ResourceError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; the launcher sets it "
                            "(workers/distributed.py)") from None


def make_backend(model, spec, total_steps: int, device) -> Backend:
    """The backend for this process: plain PyTorch in one process, DeepSpeed ZeRO across several."""
    world_size = process_count()
    if world_size == 1:
        return TorchBackend(model, spec.training, total_steps, device)
    if spec.deepspeed is None:
        raise ResourceError(
            f"this runner was started as one of {world_size} processes, but the spec has no `deepspeed:` section; "
            "add one (stage 2 or 3) or set resources to one device")
    from farm.training.deepspeed_backend import DeepSpeedBackend

    return DeepSpeedBackend(model, spec, total_steps, device)
