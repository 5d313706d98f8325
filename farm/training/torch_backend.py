"""The one-process backend: plain PyTorch AdamW, a transformers LR schedule, global-norm clipping.

Sharding, sums and barriers are no-ops here. `loss_sum` and `SCHEDULERS` are shared with the other backends
(farm/training/deepspeed_backend.py imports them from here; this module imports no other backend).
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.json"
SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def loss_sum(model, batch):
    """Sum of the token cross-entropies of a batch (targets already shifted; -100 ignored), as a 0-dim tensor.

    A sum, not a mean: the loop divides by the target tokens of the whole accumulation window, so every token
    weighs the same however the window's micro-batches are filled.
    """
    import torch.nn.functional as F

    logits = model(**batch.model_inputs()).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch.targets.reshape(-1),
                           ignore_index=-100, reduction="sum")


class TorchBackend:
    """One process: AdamW over the trainable parameters, a transformers LR schedule, global-norm clipping."""

    is_main_process = True
    world_size = 1
    rank = 0

    def __init__(self, model, params, total_steps: int, device):
        """`params` is the spec's TrainingParams; `total_steps` sizes the LR schedule."""
        import torch
        from transformers import get_scheduler

        self.model = model
        self.device = device
        self.max_grad_norm = params.max_grad_norm
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=params.lr, weight_decay=params.weight_decay)
        self.scheduler = get_scheduler(SCHEDULERS[params.lr_scheduler], self.optimizer,
                                       num_warmup_steps=params.warmup_steps, num_training_steps=total_steps)

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    def shard(self, rows: list) -> list:
        """This process's part of a micro-batch: all of it."""
        return rows

    def loss_sum(self, batch):
        """Forward one micro-batch; the summed token loss."""
        return loss_sum(self.model, batch.to(self.device))

    def all_sum(self, tensor):
        """The sum of `tensor` over all processes: itself."""
        return tensor

    def barrier(self) -> None:
        pass

    def gathered_adapter(self, modify: bool = False):
        """The adapter weights are whole here already."""
        return nullcontext()

    def base_params_checksum(self) -> str:
        """The frozen base's checksum (farm.training.integrity)."""
        from farm.training.integrity import base_params_checksum

        return base_params_checksum(self.model)

    def describe(self) -> dict:
        """How the job was spread, for the provenance."""
        return {"processes": 1}

    def backward(self, loss) -> None:
        loss.backward()

    def step(self):
        """Clip, update, advance the schedule, clear gradients; the pre-clip gradient norm (a tensor) or None."""
        import torch

        norm = None
        if self.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def lr(self) -> float:
        """The learning rate the next step will use."""
        return self.scheduler.get_last_lr()[0]

    def save_state(self, folder: Path) -> None:
        """Optimizer moments (optimizer.pt) and schedule position (scheduler.json) into a checkpoint folder."""
        import torch

        torch.save(self.optimizer.state_dict(), folder / OPTIMIZER_FILE)
        (folder / SCHEDULER_FILE).write_text(json.dumps(self.scheduler.state_dict()))

    def load_state(self, folder: Path) -> None:
        """Restore what save_state wrote (tensors only: loaded with weights_only, no pickled code runs)."""
        import torch

        self.optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, map_location=self.device,
                                                  weights_only=True))
        self.scheduler.load_state_dict(json.loads((folder / SCHEDULER_FILE).read_text()))
