"""Several LoRA adapters on one frozen base, each trained on its own rows of one batch: peft's mixed batch.

peft computes a mixed batch in `LoraLayer._mixed_batch_forward` (adapter `adapter_names[i]` on row `i`). Its
`PeftModel` refuses `adapter_names` in training mode, but the mechanism underneath is a per-layer forward
pre-hook, `peft.tuners.lora.model._adapter_names_pre_forward_hook`; `mixed_adapters` registers it on every
LoraLayer for one forward and backward (activation checkpointing recomputes under the same hooks). Each adapter
only sees its own rows, so the gradient of job j's loss reaches adapter j only: one backward of the sum of the
jobs' losses gives every adapter exactly the gradient of its solo run.

What else keeps a job's numbers equal to its solo run's:

- **Its own RNG** (`JobRng`): LoRA dropout draws from the job's torch RNG state, swapped in around each of its
  dropout calls, on the tensor shape its solo run would have (its rows padded to its own longest row, not the
  group's), so the masks are the solo masks. A recomputation under activation checkpointing replays the state.
- **Its own adapter files** (`AdapterView`): each adapter is saved alone with peft's `selected_adapters`, so the
  folder holds exactly what a solo run's `save_pretrained` writes (same keys, same config, same README).
- **Its own optimizer** (`AdapterBackend`): the solo TorchBackend over the job's adapter weights only.
- **One checksum of the shared base** (`base_checksum`), under the base's own parameter names, so adapters that
  join or leave (wrapping more or fewer layers) do not change it.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from farm.training.backend import SCHEDULERS, TorchBackend, loss_sum
from farm.training.packing import Batch, collate

ADAPTER_PREFIX = "job_"


def adapter_name(job_id: str) -> str:
    """The peft adapter name of a job (a module key: no dots)."""
    return ADAPTER_PREFIX + re.sub(r"[^0-9A-Za-z_]", "_", str(job_id))


def lora_layers(model) -> list:
    from peft.tuners.lora.layer import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@contextmanager
def mixed_adapters(model, names: list[str]):
    """Within the block, every LoraLayer applies adapter names[i] to batch row i (training mode included)."""
    from peft.tuners.lora.model import _adapter_names_pre_forward_hook

    hook = partial(_adapter_names_pre_forward_hook, adapter_names=list(names))
    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in lora_layers(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def adapter_params(model, name: str) -> list:
    """The adapter's parameters in module order (the order a solo run's optimizer sees them)."""
    marker = f".{name}."
    return [p for n, p in model.named_parameters() if marker in n]


def mark_trainable(model, names) -> None:
    """Exactly the named adapters' weights require grad (peft leaves only its active adapter trainable)."""
    markers = tuple(f".{name}." for name in names)
    for n, p in model.named_parameters():
        p.requires_grad_(any(m in n for m in markers))


# ------------------------------------------------------------------------------------------ per-job RNG


def _get_rng(device):
    import torch

    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng(device, state) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class JobRng:
    """A job's own torch RNG stream on the training device, and the shape its solo run gives this micro-batch."""

    def __init__(self, device):
        self.device = device
        self.state = _get_rng(device)  # taken right after the job's adapter init, as in its solo run
        self.length: int | None = None  # the job's own padded length in the current micro-batch
        self.tick = 0  # bumped per forward; a second dropout call in one tick is a recomputation

    def capture(self) -> None:
        """Take the global RNG state as this job's (after a checkpoint restored it)."""
        self.state = _get_rng(self.device)

    @contextmanager
    def active(self, replay=None):
        """The job's stream (or a replayed earlier state) is the global one within the block."""
        outer = _get_rng(self.device)
        _set_rng(self.device, self.state if replay is None else replay)
        try:
            yield
        finally:
            if replay is None:
                self.state = _get_rng(self.device)
            _set_rng(self.device, outer)


def _job_dropout_class():
    import torch
    from torch import nn

    class JobDropout(nn.Module):
        """A job's LoRA dropout with its solo masks: its RNG, its own padded length; replayed on recomputation."""

        def __init__(self, inner: nn.Module, rng: JobRng):
            super().__init__()
            self.inner = inner
            self.rng = rng
            self._drawn: tuple[int, object] | None = None

        def forward(self, x):
            if not self.training:
                return self.inner(x)
            length = self.rng.length
            cut = length is not None and x.dim() == 3 and x.shape[1] > length
            head = x[:, :length].contiguous() if cut else x
            if self._drawn is not None and self._drawn[0] == self.rng.tick:
                with self.rng.active(replay=self._drawn[1]):
                    out = self.inner(head)
            else:
                self._drawn = (self.rng.tick, self.rng.state)
                with self.rng.active():
                    out = self.inner(head)
            # Positions past the job's own length are padding: no real token reads them, no loss counts them.
            return torch.cat([out, x[:, length:]], dim=1) if cut else out

    return JobDropout


def use_job_rng(model, name: str, rng: JobRng) -> None:
    """Route adapter `name`'s dropout through the job's RNG (no-op where its dropout is off)."""
    from torch import nn

    cls = _job_dropout_class()
    for layer in lora_layers(model):
        dropout = layer.lora_dropout[name] if name in layer.lora_dropout else None
        if isinstance(dropout, nn.Dropout):
            layer.lora_dropout[name] = cls(dropout, rng)


# ------------------------------------------------------------------------------------------ batches


def row_length(rows: list) -> int:
    """The padded length collate gives these rows alone (no flattening)."""
    return max(sum(len(ex) for ex in row) for row in rows)


def collate_group(parts: list[list], pad_id: int, packed: list[bool]) -> tuple[Batch, list[slice]]:
    """One batch of every job's micro-batch rows, in order, and each job's row slice.

    When any job packs, all rows carry restarting position_ids (an unpacked row is a one-example packed row), since
    one forward takes either position ids or an attention mask.
    """
    rows, slices = [], []
    for part in parts:
        slices.append(slice(len(rows), len(rows) + len(part)))
        rows.extend(part)
    return collate(rows, pad_id, packed=any(packed)), slices


def job_loss_sum(logits, targets, rows: slice, length: int):
    """The job's summed token loss from its rows of the group's logits (its own length: as in its solo run)."""
    import torch.nn.functional as F

    lg = logits[rows, :length]
    return F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), targets[rows, :length].reshape(-1),
                           ignore_index=-100, reduction="sum")


# ------------------------------------------------------------------------------------------ saving


class AdapterView:
    """One adapter of a multi-adapter PeftModel, as the solo code's savers see a model: `save_pretrained(path)`
    writes exactly what a solo run's `save_pretrained` writes (adapter at the folder's top, README alongside)."""

    def __init__(self, model, name: str):
        self.model = model
        self.name = name

    def save_pretrained(self, path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
            self.model.save_pretrained(tmp, selected_adapters=[self.name])
            # peft puts a non-default adapter in <dir>/<name>/ and the model card at <dir>/.
            for item in [*Path(tmp, self.name).iterdir(), *(p for p in Path(tmp).iterdir() if p.is_file())]:
                target = path / item.name
                if target.exists():
                    target.unlink()
                shutil.move(str(item), target)


# ------------------------------------------------------------------------------------------ one job's view


class AdapterBackend(TorchBackend):
    """TorchBackend over one adapter of the shared model: AdamW and schedule on its weights only (in module order,
    as a solo run's optimizer sees them); eval forwards run that adapter alone."""

    def __init__(self, model, name: str, params, total_steps: int, device):
        import torch
        from transformers import get_scheduler

        self.model, self.name, self.device = model, name, device
        self.max_grad_norm = params.max_grad_norm
        self.trainable = adapter_params(model, name)
        self.optimizer = torch.optim.AdamW(self.trainable, lr=params.lr, weight_decay=params.weight_decay)
        self.scheduler = get_scheduler(SCHEDULERS[params.lr_scheduler], self.optimizer,
                                       num_warmup_steps=params.warmup_steps, num_training_steps=total_steps)

    def loss_sum(self, batch):
        batch = batch.to(self.device)
        with mixed_adapters(self.model, [self.name] * batch.input_ids.shape[0]):
            return loss_sum(self.model, batch)

    def describe(self) -> dict:
        return {"processes": 1, "cotrained": True}


class _BaseNames:
    """The model's parameters under the base model's own names: adapters that join or leave wrap or unwrap layers
    (`q_proj.weight` becomes `q_proj.base_layer.weight`), which must not change the base's checksum."""

    def __init__(self, model):
        self.model = model

    def named_parameters(self):
        for name, param in self.model.named_parameters():
            name = name.replace(".base_layer.", ".")
            yield (name[len("base_model.model."):] if name.startswith("base_model.model.") else name), param


def base_checksum(model) -> str:
    """farm.training.integrity's checksum of the frozen base, taken once for the group, whatever adapters it holds."""
    from farm.training.integrity import base_params_checksum

    return base_params_checksum(_BaseNames(model))
