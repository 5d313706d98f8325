"""The multi-process backend: DeepSpeed ZeRO (stage 2 or 3) behind the same seam as `TorchBackend`.

Every process of the job (started by workers/distributed.py with RANK, WORLD_SIZE, MASTER_ADDR/PORT) runs the whole
runner; this backend is where they meet. Choices, and why:

- **Data.** A step sees the same global batch as one process with `micro_batch_size x processes`: the loop's plan
  is built on global micro-batches and each process trains on its own contiguous slice of each (`shard`). A process
  whose slice is empty (the last, short batch of an epoch) trains on a loss-free stand-in row, because every
  process must run each forward and backward (ZeRO's collectives). The loss is the sum over the whole window's
  target tokens divided by their count, as in one process; DeepSpeed averages gradients over processes, so each
  process's backward is scaled by the process count to make the average a sum.
- **Accumulation.** The loop calls backward once per micro-batch and step once per window, so DeepSpeed runs with
  `managed_gradient_accumulation: false`: `step()` is the boundary, whatever the window's length.
- **Precision.** The DeepSpeed engine runs in fp32. Only the LoRA weights train and peft keeps them in fp32 (as in
  one process); the frozen base computes in `quantization.compute_dtype` through bitsandbytes or its load dtype.
  DeepSpeed's bf16 mode would cast every parameter, the frozen fp32 norms of a k-bit model included: the base
  would change under the integrity check and the numbers would differ from a one-process run for no memory gain.
- **Optimizer and schedule.** The same torch AdamW and transformers schedule as `TorchBackend`, handed to
  `deepspeed.initialize` (the schedule is stepped by the engine, once per optimizer step).
- **Checkpoints.** Each process writes its own ZeRO optimizer partition (`optimizer-rank<r>-of<n>.pt`, plain
  tensors and numbers, loaded with `weights_only`; DeepSpeed's own checkpoint files are pickles, read with
  `weights_only=False`) and its RNG state; the main process writes the gathered adapter and the schedule. A
  checkpoint resumes with the same number of processes.
- **ZeRO-3.** Parameters are partitioned: the adapter is gathered (`GatheredParameters`) to save or load it, and
  the base checksum gathers one parameter at a time.

Tried on this CPU machine (deepspeed 0.19.8, bitsandbytes 0.50.2, 2 processes, gloo): ZeRO-2 and ZeRO-3 train a
4-bit base (bnb_4bit_quant_storage = compute dtype, farm.training.model) and a 16-bit one; with the 4-bit base
both give the losses of one process on the global batch, and ZeRO-3 partitions the 4-bit weights and gathers them
back intact (the base checksum holds).
ZeRO-3 + 4-bit + offload_params and 8-bit bases with ZeRO-2/3 also ran here, but only because on the CPU
offloading moves nothing and int8 stays put; unverified on GPUs, the spec still refuses them (farm/specs.py).
DeepSpeed's bf16 mode changed the base checksum (see Precision above).
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

from farm.errors import ResourceError, StoreError
from farm.training.torch_backend import SCHEDULER_FILE, SCHEDULERS, loss_sum  # shared; light (no torch at import)

SHARD_FILE = "optimizer-rank{rank}-of{world}.pt"


def deepspeed_config(spec, world_size: int, on_gpu: bool = False) -> dict:
    """The DeepSpeed config for a TrainSpec run by `world_size` processes (pure data: no torch, no deepspeed)."""
    params, ds = spec.training, spec.deepspeed
    zero: dict = {"stage": ds.stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    return {
        "train_micro_batch_size_per_gpu": params.micro_batch_size,
        "gradient_accumulation_steps": params.grad_accum,
        "train_batch_size": params.micro_batch_size * params.grad_accum * world_size,
        # The loop owns the accumulation window: step() is the boundary (see the module docstring).
        "managed_gradient_accumulation": False,
        "gradient_clipping": params.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        # torch AdamW, the one-process optimizer, also under offload (DeepSpeedCPUAdam needs a compiled op).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": None,  # no step reports: the loop's progress events say it, once
        "wall_clock_breakdown": False,
    }


def shard_rows(rows: list, rank: int, world_size: int) -> list:
    """This process's contiguous slice of a global micro-batch; a loss-free stand-in when the slice is empty."""
    from farm.training.data import IGNORE_INDEX, Example

    per = math.ceil(len(rows) / world_size)
    mine = rows[rank * per:(rank + 1) * per]
    if mine:
        return mine
    # Every process must run the forward and backward (ZeRO's hooks are collectives); this one adds no loss.
    return [[Example(ex.input_ids, [IGNORE_INDEX] * len(ex)) for ex in rows[0]]]


def streamed_base_checksum(model, gather=lambda param: nullcontext()) -> str:
    """farm.training.integrity.base_params_checksum, reading one parameter at a time inside `gather(param)`.

    Under ZeRO-3 `gather` makes a partitioned parameter whole for the moment it is hashed; the digest is the same
    as integrity's on an unpartitioned model (tests/test_deepspeed.py checks that).
    """
    from farm.training.integrity import base_params_checksum

    return base_params_checksum(model, gather)


def _plain(value) -> bool:
    """True for what torch.load(weights_only=True) reads back: tensors, numbers, strings and containers of them."""
    import torch

    # Exact types: an IntEnum (DeepSpeed's ZeroStageEnum) is an int but pickles as its class.
    if value is None or type(value) in (bool, int, float, str) or isinstance(value, torch.Tensor):
        return True
    if type(value) in (list, tuple):
        return all(_plain(v) for v in value)
    if type(value) is dict:
        return all(type(k) in (int, str) and _plain(v) for k, v in value.items())
    return False


def _quiet_deepspeed() -> None:
    """DeepSpeed logs at INFO to stdout on every process; keep the runner's output to what a person needs."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    try:
        from deepspeed.utils import logger

        logger.setLevel(logging.WARNING)
    except ImportError:
        pass
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*all_gather_into_tensor.*")


def _init_process_group(on_gpu: bool) -> None:
    import deepspeed

    # The CPU accelerator JIT-compiles a shared-memory all-reduce op (about 90 s, and it needs a C++ compiler) for
    # inference kernels only; training collectives go through the process group.
    try:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except (AttributeError, TypeError):
        pass
    backend = os.environ.get("FARM_DIST_BACKEND") or ("nccl" if on_gpu else "gloo")
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


class DeepSpeedBackend:
    """ZeRO stage 2 or 3 over the processes of one job (see the module docstring for the choices made)."""

    def __init__(self, model, spec, total_steps: int, device):
        """`spec` is the TrainSpec (its deepspeed section set); `total_steps` sizes the LR schedule."""
        try:
            import deepspeed
        except ImportError as exc:
            raise ResourceError(f"this job needs DeepSpeed on the worker ({exc}); install deepspeed or run it on "
                                "one device") from None
        import torch
        import torch.distributed as dist
        from transformers import get_scheduler

        _quiet_deepspeed()
        on_gpu = device.type == "cuda"
        _init_process_group(on_gpu)
        params = spec.training
        self.model = model
        self.device = device
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.is_main_process = self.rank == 0
        self.stage = spec.deepspeed.stage
        self.clipping = params.max_grad_norm is not None
        self.comm_backend = dist.get_backend()
        self.config = deepspeed_config(spec, self.world_size, on_gpu)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.trainable, lr=params.lr, weight_decay=params.weight_decay)

        def schedule(opt):
            return get_scheduler(SCHEDULERS[params.lr_scheduler], opt, num_warmup_steps=params.warmup_steps,
                                 num_training_steps=total_steps)

        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=self.config)

    # ------------------------------------------------------------------ the loop's seam

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    def shard(self, rows: list) -> list:
        """This process's part of a global micro-batch."""
        return shard_rows(rows, self.rank, self.world_size)

    def loss_sum(self, batch):
        """Forward this process's micro-batch through the engine; the summed token loss."""
        return loss_sum(self.engine, batch.to(self.device))

    def backward(self, loss) -> None:
        # DeepSpeed averages gradients over processes; the loop's loss is a share of a sum over all of them.
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)

    def step(self):
        """Reduce, clip, update, advance the schedule; the pre-clip global gradient norm (a tensor) or None."""
        import torch

        self.engine.step()
        if not self.clipping:
            return None
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else torch.as_tensor(norm, dtype=torch.float32)

    @property
    def lr(self) -> float:
        """The learning rate the next step will use."""
        return self.scheduler.get_last_lr()[0]

    def all_sum(self, tensor):
        """The sum of `tensor` over all processes (every process gets it)."""
        import torch.distributed as dist

        total = tensor.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    @contextmanager
    def gathered_adapter(self, modify: bool = False):
        """The LoRA weights whole inside the block (ZeRO-3 partitions them). Every process must enter it.

        modify: the block changes them (loading a checkpoint); the main process's values are kept.
        """
        if self.stage < 3:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(self.trainable, modifier_rank=0 if modify else None):
            yield

    def base_params_checksum(self) -> str:
        """The frozen base's checksum (integrity), gathering ZeRO-3 partitions one parameter at a time."""
        if self.stage < 3:
            from farm.training.integrity import base_params_checksum

            return base_params_checksum(self.model)
        import deepspeed

        return streamed_base_checksum(self.model, lambda param: deepspeed.zero.GatheredParameters([param]))

    def describe(self) -> dict:
        """How the job was spread, for the provenance."""
        zero = self.config["zero_optimization"]
        return {"processes": self.world_size, "comm_backend": self.comm_backend, "zero_stage": self.stage,
                "offload_optimizer": "offload_optimizer" in zero, "offload_params": "offload_param" in zero,
                "micro_batch_size_per_process": self.config["train_micro_batch_size_per_gpu"],
                "launcher": "workers.distributed"}

    # ------------------------------------------------------------------ checkpoints

    def _shard_path(self, folder: Path) -> Path:
        return folder / SHARD_FILE.format(rank=self.rank, world=self.world_size)

    def save_state(self, folder: Path) -> None:
        """Every process: its ZeRO optimizer partition and RNG state; the main process: the schedule too."""
        import torch

        state = self.optimizer.state_dict()
        # Objects that are not plain data (the fp32 loss scaler, DeepSpeed's slice maps) follow from the config;
        # load_state takes them from the live optimizer.
        plain = {k: v for k, v in state.items() if _plain(v)}
        torch.save({"optimizer": plain, "torch_rng": torch.get_rng_state()}, self._shard_path(folder))
        if self.is_main_process:
            (folder / SCHEDULER_FILE).write_text(json.dumps(self.scheduler.state_dict()))

    def load_state(self, folder: Path) -> None:
        """Restore what save_state wrote; the checkpoint must come from as many processes as this run has."""
        import torch

        path = self._shard_path(folder)
        if not path.is_file():
            found = sorted(p.name for p in folder.glob("optimizer-rank*.pt")) or ["none"]
            raise StoreError(f"{folder}: no optimizer partition for process {self.rank} of {self.world_size} "
                             f"(found: {', '.join(found)}); a checkpoint resumes with the number of processes that "
                             "wrote it: set resources back or start the job again")
        saved = torch.load(path, map_location=self.device, weights_only=True)
        state = {**self.optimizer.state_dict(), **saved["optimizer"]}
        world = self.world_size
        self.optimizer.load_state_dict([state] * world, load_optimizer_states=True, load_from_fp32_weights=True)
        self.scheduler.load_state_dict(json.loads((folder / SCHEDULER_FILE).read_text()))
        torch.set_rng_state(saved["torch_rng"])
