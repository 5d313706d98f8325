"""Integrity: what the base model was (file digests), and proof that training touched only the adapter.

Three checks, each raising farm.errors.IntegrityError with the offending names:

- `weight_file_digests`: sha256 of each weight file of the base model folder, and one digest over all of them.
- `check_only_adapter_trainable`: every parameter that requires grad is a LoRA weight.
- `base_params_checksum` before and after training, compared by `verify_base_unchanged`.
"""

from __future__ import annotations

import hashlib
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Callable

from farm.errors import IntegrityError, ModelError

# Names peft gives adapter weights (LoRA A/B, embedding variants, DoRA magnitudes).
ADAPTER_MARKERS = ("lora_",)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (the store's streaming digest, so every part of the farm hashes alike), cached by
    the file's identity (farm.hashcache): a dataset or weight file already hashed on this host is not read again."""
    from farm.hashcache import file_sha256 as cached_file_sha256

    return cached_file_sha256(path)


def weight_file_digests(model_dir: str | Path) -> tuple[str, dict[str, str]]:
    """(one digest over all weight files, {name: sha256}) for a model folder: the base model's hash in provenance.

    Safetensors models are hashed by farm.model_files.sha256_weights, the same function extraction jobs use, so a
    base model has one hash whatever the job. Legacy *.bin checkpoints are hashed the same way (sorted
    "name sha256" lines).
    """
    from farm import model_files

    model_dir = Path(model_dir)
    if any(model_dir.glob("*.safetensors")):
        return model_files.sha256_weights(model_dir)
    files = sorted(p for p in model_dir.glob("*.bin") if p.is_file())
    if not files:
        raise ModelError(f"{model_dir}: no weight files (*.safetensors or *.bin) in the base model folder",
                         field="base_model")
    per_file = {p.name: file_sha256(p) for p in files}
    listing = "".join(f"{name} {sha}\n" for name, sha in sorted(per_file.items()))
    return hashlib.sha256(listing.encode()).hexdigest(), per_file


def is_adapter_param(name: str) -> bool:
    return any(marker in name for marker in ADAPTER_MARKERS)


def check_only_adapter_trainable(model) -> tuple[int, int]:
    """Raise IntegrityError unless the trainable parameters are exactly LoRA weights; return (trainable, total)."""
    wrong, trainable, total = [], 0, 0
    for name, param in model.named_parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
            if not is_adapter_param(name):
                wrong.append(name)
    if wrong:
        shown = ", ".join(wrong[:5]) + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else "")
        raise IntegrityError(
            f"{len(wrong)} non-adapter parameter(s) would be trained: {shown}. The farm trains LoRA weights only; "
            "if you continue from an adapter, make sure it has no modules_to_save")
    if trainable == 0:
        raise IntegrityError("no trainable LoRA parameter: check lora.target_modules against the model's layers")
    return trainable, total


def base_params_checksum(model, gather: Callable[[Any], AbstractContextManager] | None = None) -> str:
    """sha256 over the name, dtype, shape and bytes of every frozen (non-adapter) parameter, in name order.

    Quantized weights are hashed as stored (packed 4-bit bytes, int8), which is what an update would change.
    `gather(param)`, when given, makes a partitioned parameter whole while it is hashed (ZeRO-3: one parameter at a
    time); the digest is the same as on an unpartitioned model.
    """
    import torch

    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if is_adapter_param(name):
            continue
        with gather(param) if gather is not None else nullcontext():
            # A plain-tensor view: bitsandbytes' parameter subclasses override .to()/.cpu() with (de)quantizing.
            data = param.detach().as_subclass(torch.Tensor)
            digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}\n".encode())
            flat = data.reshape(-1).contiguous().cpu()
            # A view as bytes hashes any dtype (bfloat16 has no numpy type) without another copy.
            digest.update(flat.view(torch.uint8).numpy().data if flat.numel() else b"")
    return digest.hexdigest()


def verify_base_unchanged(before: str, after: str) -> None:
    """Raise IntegrityError if the frozen base parameters' checksum changed during training."""
    if before != after:
        raise IntegrityError(
            f"the frozen base weights changed during training (checksum {before[:16]}… before, {after[:16]}… "
            "after); the adapter is not published. This is a bug in the training code or a library: report it "
            "with the job id")
