"""A merge job as the runner child process runs it: `run_merge(job, emit)`.

Order of work: hash the base weights and the adapter (lineage); load the base in 16 bits (bfloat16 by default:
never the 4-bit weights a QLoRA adapter was trained against, whose rounding would be baked into the result);
apply the adapter with stock PEFT; `merge_and_unload`; save with `save_pretrained` (sharded safetensors, config,
generation config) and the base's tokenizer; emit `done` with the provenance.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from farm.errors import ModelError

REQUIRED_JOB_KEYS = ("job_id", "spec", "base_model", "adapter", "output_dir")
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def merge_adapter(base_dir: Path, adapter_dir: Path, output_dir: Path, *, dtype: str = "bfloat16",
                  max_shard_size: str = "5GB") -> dict:
    """Merge the PEFT adapter in `adapter_dir` into the base in `base_dir`; save the merged model to `output_dir`.

    Returns facts for the provenance: dtype, parameter count, merged modules, whether a tokenizer was saved.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    if not (Path(adapter_dir) / ADAPTER_WEIGHTS).is_file():
        raise ModelError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}; not a PEFT adapter folder")
    try:
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch_dtype, low_cpu_mem_usage=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"base model {base_dir}: cannot be loaded in {dtype}: {str(exc)[:300]}") from None
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelError(f"the adapter does not fit its base model: {str(exc)[:300]}") from None
    merged = model.merge_and_unload()
    merged.eval()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(output_dir, max_shard_size=max_shard_size)
    tokenizer_saved = False
    try:
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(output_dir)
        tokenizer_saved = True
    except (OSError, ValueError):
        pass  # a base without a tokenizer: the merged model has none either (said in the card)
    return {"dtype": dtype, "parameters": sum(p.numel() for p in merged.parameters()),
            "tokenizer": tokenizer_saved, "max_shard_size": max_shard_size}


def run_merge(job: dict, emit: Callable[[dict], None]) -> None:
    """The merge job: merge job["adapter"] into job["base_model"], write job["output_dir"], emit `done`."""
    from farm.merge.spec import MergeSpec
    from farm.runner_protocol import parse_job
    from farm.training.integrity import file_sha256, weight_file_digests

    spec = parse_job(job, MergeSpec, REQUIRED_JOB_KEYS, "merge")
    base_dir, adapter_dir = Path(job["base_model"]), Path(job["adapter"])
    if not base_dir.is_dir():
        raise ModelError(f"{base_dir}: base model folder not found (job base_model)", field="base_model")
    start = time.perf_counter()
    emit({"type": "log", "message": f"hashing the base model's weight files in {base_dir}"})
    base_sha, base_files = weight_file_digests(base_dir)
    if spec.base_model_sha256 and base_sha != spec.base_model_sha256:
        raise ModelError(f"base_model: {spec.base_model} is not the model {spec.adapter} was trained on (weights "
                         f"sha256 {base_sha[:12]}…, the adapter's base had {spec.base_model_sha256[:12]}…); the "
                         "base changed since: restore it or train the adapter again", field="base_model")
    adapter_sha = file_sha256(adapter_dir / ADAPTER_WEIGHTS)
    emit({"type": "progress", "phase": "merge", "step": 0, "total_steps": 1})
    facts = merge_adapter(base_dir, adapter_dir, Path(job["output_dir"]), dtype=spec.dtype,
                          max_shard_size=spec.max_shard_size)
    emit({"type": "progress", "phase": "merge", "step": 1, "total_steps": 1})
    from farm.environment import environment

    emit({"type": "done", "metrics": {"parameters": facts["parameters"]}, "provenance": {
        "base_model_sha256": base_sha, "base_model_files": base_files,
        "merge": {**facts, "adapter": spec.adapter, "adapter_sha256": adapter_sha},
        "environment": environment(),
        "timings": {"total_seconds": round(time.perf_counter() - start, 3)},
    }})
