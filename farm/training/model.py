"""The model being trained: the base in 4, 8 or 16 bit, with a LoRA adapter on top (fresh or continued)."""

from __future__ import annotations

import logging
import os
import random
import warnings
from contextlib import contextmanager
from pathlib import Path

from farm.errors import ModelError


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (every device): the same seed gives the same LoRA init, dropout and loss curve."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def training_device():
    """The device this process trains on: its GPU (LOCAL_RANK under a launcher; a pinned worker sees one), or CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def load_tokenizer(base_dir: str | Path):
    """The base model's tokenizer, right-padded, with a pad token (eos when the model defines none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
    except Exception as exc:
        raise ModelError(f"{base_dir}: cannot load the tokenizer: {exc}", field="base_model") from None
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelError(f"{base_dir}: the tokenizer has neither a pad nor an eos token; add one to its "
                             "tokenizer_config.json", field="base_model")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_model_config(base_dir: str | Path) -> None:
    """Raise ModelError unless base_dir holds a config transformers can read as a causal LM."""
    from transformers import AutoConfig

    path = Path(base_dir)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: no config.json; base_model must be a saved transformers model folder",
                         field="base_model")
    try:
        AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise ModelError(f"{path}/config.json: transformers cannot read it: {exc}", field="base_model") from None


def quantization_config(spec):
    """The BitsAndBytesConfig for spec.quantization (None for 16 bit)."""
    import torch
    from transformers import BitsAndBytesConfig

    q = spec.quantization
    compute = getattr(torch, q.compute_dtype)
    if q.bits == 4:
        extra = {}
        if spec.deepspeed is not None:
            # ZeRO shards parameters by dtype: 4-bit weights stored as the compute dtype can be sharded and gathered.
            extra["bnb_4bit_quant_storage"] = compute
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.type,
                                  bnb_4bit_use_double_quant=q.double_quant, bnb_4bit_compute_dtype=compute, **extra)
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_base_model(base_dir: str | Path, spec, device=None):
    """The frozen base model per spec.quantization, ready for an adapter (k-bit preparation, checkpointing)."""
    import torch
    from transformers import AutoModelForCausalLM

    device = device or training_device()
    q = spec.quantization
    kwargs = {"dtype": getattr(torch, q.compute_dtype)}
    qconfig = quantization_config(spec)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    if device.type != "cpu":
        kwargs["device_map"] = {"": device}
    check_model_config(base_dir)
    # Failures past the config (a truncated weight file, out of memory) are left to propagate: they may be
    # transient (a disk or fetch fault), so the runner reports a crash and the job gets another attempt.
    model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    model.config.use_cache = False
    if q.bits == 4 and device.type == "cpu":
        _keep_cpu_4bit_layout(model)
    if q.bits == 8:
        _quiet_int8_cast_warning()
    checkpointing = spec.training.gradient_checkpointing
    if qconfig is not None:
        from peft import prepare_model_for_kbit_training

        with _quiet_renamed_api_warnings():
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        for param in model.parameters():
            param.requires_grad_(False)
        if checkpointing:
            with _quiet_renamed_api_warnings():
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _keep_cpu_4bit_layout(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference when the model runs in eval mode.

    bitsandbytes 0.50 on an AVX512-BF16 CPU converts a Linear4bit's weight to an inference-only layout on the
    first forward in eval mode, and keeps it: the weights change (the integrity checksum sees it) and later
    training forwards go through `gemv_4bit`, which has no autograd kernel, so gradients into earlier layers are
    silently wrong. Evaluation during training must not do that.
    """
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


@contextmanager
def _quiet_renamed_api_warnings():
    """transformers 5 renamed gradient checkpointing to activation checkpointing; peft still calls the old names.
    The FutureWarnings say nothing a job's owner can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*gradient_checkpointing.*deprecated")
        yield


class _DropInt8CastWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


_INT8_CAST_FILTER = _DropInt8CastWarning()


def _quiet_int8_cast_warning() -> None:
    """bitsandbytes logs this on every int8 matmul (k-bit preparation keeps activations in float32): one line per
    layer per step would bury the runner's log."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if _INT8_CAST_FILTER not in logger.filters:
        logger.addFilter(_INT8_CAST_FILTER)


def lora_config(spec):
    """peft LoraConfig from spec.lora."""
    from peft import LoraConfig

    lora = spec.lora
    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                      task_type="CAUSAL_LM")


def attach_adapter(base, spec, continue_from: str | Path | None = None):
    """Wrap the base with a trainable LoRA adapter: fresh from spec.lora, or the weights of `continue_from`.

    A continued adapter keeps its own shape (its adapter_config.json), since its weights only fit that.
    """
    from peft import PeftModel, get_peft_model

    if continue_from is not None:
        path = Path(continue_from)
        if not (path / "adapter_config.json").is_file():
            raise ModelError(f"{path}: no adapter_config.json; continue_from must be an adapter saved by the farm "
                             "or by peft's save_pretrained", field="continue_from")
        try:
            return PeftModel.from_pretrained(base, str(path), is_trainable=True)
        except Exception as exc:
            raise ModelError(f"{path}: this adapter does not fit the base model: {exc}",
                             field="continue_from") from None
    try:
        return get_peft_model(base, lora_config(spec))
    except ValueError as exc:
        raise ModelError(f"lora.target_modules {spec.lora.target_modules!r} do not fit the base model: {exc}",
                         field="lora.target_modules") from None


def build_model(base_dir: str | Path, spec, continue_from: str | Path | None = None, device=None):
    """Base + adapter, seeded with training.seed right before the adapter's random init."""
    base = load_base_model(base_dir, spec, device)
    seed_everything(spec.training.seed)
    return attach_adapter(base, spec, continue_from)
