"""Stream two models tensor by tensor, factor each changed target layer's delta, write a peft adapter.

Memory: one layer at a time. A layer's two weights are read from their safetensors shards, their float32
difference is kept and they are dropped, so the peak is near the largest tensor pair (plus the SVD's work
space) and the factors collected so far, plus the full tensors of changed embeddings (modules_to_save).
"""

from __future__ import annotations

import json
import math
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from farm import model_files
from farm.errors import ModelError
from farm.extraction import peft_format, svd
from farm.extraction.plan import ExtractionPlan, LinearLayer, check_rank_fits, plan_extraction
from farm.specs import ExtractSpec

METRICS_FILE = "training_metrics.json"
# ||dW||_F / ||W_base||_F below this is float round-off (bf16 resolves 4e-3): the layer counts as unchanged.
NEGLIGIBLE_RELATIVE_CHANGE = 1e-6


@dataclass
class LayerReport:
    """One targeted layer: how it was factored and how good that is (training_metrics.json's per-layer rows)."""

    module: str
    shape: list[int]
    rank: int = 0
    retained_energy: float = 1.0
    relative_error: float = 0.0
    rho: float = 1.0
    seconds: float = 0.0
    method: str = ""
    delta_relative_norm: float = 0.0
    bias_changed: bool = False
    skipped: str | None = None
    """Why the layer is not in the adapter ("unchanged"), or None."""


@dataclass
class ExtractionResult:
    """What the extraction did: per-layer rows, saved modules, notes and timings."""

    layers: list[LayerReport]
    modules_to_save: list[str]
    changed_untargeted: list[str]
    lora_bias: bool
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def extracted(self) -> list[LayerReport]:
        return [r for r in self.layers if r.skipped is None]

    def summary(self) -> dict:
        """Flat metrics for the catalog and the model card."""
        done = [r for r in self.extracted if r.method]  # bias-only layers carry no factorization
        rhos = [r.rho for r in done]
        return {
            "layers": len(self.extracted),
            "skipped": len(self.layers) - len(self.extracted),
            "mean_rho": sum(rhos) / len(rhos) if rhos else None,
            "max_rho": max(rhos) if rhos else None,
            "mean_rank": sum(r.rank for r in done) / len(done) if done else 0.0,
            "max_relative_error": max((r.relative_error for r in done), default=0.0),
            "exact_fallbacks": sum(r.method == "exact-fallback" for r in done),
            "modules_to_save": len(self.modules_to_save),
            "changed_untargeted": len(self.changed_untargeted),
            "lora_bias": self.lora_bias,
            "seconds": round(self.seconds, 3),
        }


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class _Reader:
    """Tensors by name from a model's safetensors shards, one tensor at a time.

    A tensor's bytes are read straight from its byte range (the header's data_offsets) into a fresh buffer. Going
    through `safe_open` instead maps the shard: the weights then arrive by page faults on first touch (3-4x
    slower here, worse with several threads) and every page read stays mapped, counted in the RSS, while the shard
    is open. Dtypes this reader does not know (float8 and the like) still go through `safe_open`.
    """

    def __init__(self, index: dict[str, model_files.TensorInfo]):
        self.index = index

    def get(self, name: str) -> torch.Tensor:
        info = self.index[name]
        dtype = _DTYPES.get(info.dtype)
        if dtype is None:
            from safetensors import safe_open

            with safe_open(str(info.file), framework="pt") as f:
                return f.get_tensor(name)
        raw = torch.empty(info.nbytes, dtype=torch.uint8)
        with open(info.file, "rb", buffering=0) as f:
            f.seek(info.offset)
            got = f.readinto(memoryview(raw.numpy()))
        if got != info.nbytes:
            raise ModelError(f"{info.file}: tensor {name} is truncated ({got} of {info.nbytes} bytes)")
        return raw.view(dtype).reshape(info.shape)


def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    if torch.equal(a, b):
        return False
    a, b = a.float(), b.float()
    return float(torch.linalg.vector_norm(b - a)) > NEGLIGIBLE_RELATIVE_CHANGE * float(torch.linalg.vector_norm(a))


def _factor(spec: ExtractSpec, delta: torch.Tensor, total: float, seed: int) -> svd.LowRank:
    kwargs = dict(rank=spec.rank, energy=spec.energy, max_rank=min(spec.max_rank, min(delta.shape)), total=total)
    if spec.svd == "exact":
        return svd.factor_exact(delta, **kwargs)
    return svd.factor_randomized(delta, seed=seed, **kwargs)


@dataclass
class _Collected:
    """The adapter under construction."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    bias_deltas: dict[str, torch.Tensor] = field(default_factory=dict)


def _extract_layer(spec: ExtractSpec, layer: LinearLayer, base: _Reader, ft: _Reader, out: _Collected) -> LayerReport:
    t0 = time.perf_counter()
    report = LayerReport(module=layer.module, shape=list(layer.shape))
    w_base, w_ft = base.get(layer.weight), ft.get(layer.weight)
    save_dtype = w_ft.dtype  # factors are saved in the fine-tuned weights' dtype
    # in place, casting on the fly: the peak stays at the two weights (plus one float32 copy for 16-bit models)
    delta = w_ft.float().sub_(w_base)
    base_norm_sq = float(torch.linalg.vector_norm(w_base, dtype=torch.float32)) ** 2
    del w_base, w_ft
    total = svd.frobenius_sq(delta)
    report.delta_relative_norm = math.sqrt(total / base_norm_sq) if base_norm_sq > 0 else math.inf
    if layer.bias is not None:
        b_base, b_ft = base.get(layer.bias), ft.get(layer.bias)
        if _differs(b_base, b_ft):
            out.bias_deltas[layer.module] = (b_ft.float() - b_base.float()).to(b_ft.dtype)
            report.bias_changed = True
    if total == 0 or report.delta_relative_norm <= NEGLIGIBLE_RELATIVE_CHANGE:
        report.skipped = "unchanged"
    else:
        low = _factor(spec, delta, total, seed=zlib.crc32(layer.module.encode()))
        out.tensors[peft_format.lora_key(layer.module, "lora_A.weight")] = low.A.to(save_dtype)
        out.tensors[peft_format.lora_key(layer.module, "lora_B.weight")] = low.B.to(save_dtype)
        out.ranks[layer.module] = low.rank
        report.rank, report.rho, report.method = low.rank, low.rho, low.method
        report.retained_energy, report.relative_error = low.retained_energy, low.relative_error
    report.seconds = round(time.perf_counter() - t0, 4)
    return report


def _add_lora_biases(plan: ExtractionPlan, reports: list[LayerReport], out: _Collected) -> None:
    """lora_bias=True gives every targeted layer a lora_B.bias: the bias delta, or zeros where it did not change."""
    for layer, report in zip(plan.layers, reports):
        if layer.module not in out.ranks:
            if layer.module not in out.bias_deltas:
                continue
            # the bias changed but the weight did not: a zero rank-1 LoRA carries the bias
            dtype = out.bias_deltas[layer.module].dtype
            out.ranks[layer.module] = 1
            out.tensors[peft_format.lora_key(layer.module, "lora_A.weight")] = torch.zeros(1, layer.shape[1],
                                                                                           dtype=dtype)
            out.tensors[peft_format.lora_key(layer.module, "lora_B.weight")] = torch.zeros(layer.shape[0], 1,
                                                                                           dtype=dtype)
            report.skipped, report.rank = None, 1
        dtype = out.tensors[peft_format.lora_key(layer.module, "lora_B.weight")].dtype
        delta = out.bias_deltas.get(layer.module)
        out.tensors[peft_format.lora_key(layer.module, "lora_B.bias")] = (
            delta.to(dtype) if delta is not None else torch.zeros(layer.shape[0], dtype=dtype))


def _whole_modules(plan: ExtractionPlan, base: _Reader, ft: _Reader, out: _Collected) -> tuple[list[str], bool]:
    """Changed embeddings, head and norms go to modules_to_save with their full fine-tuned tensors.

    Returns (modules_to_save, tie) where tie means the embedding is saved and the head is tied to it.
    """
    saved = []
    for module, names in plan.whole_modules.items():
        if plan.tied_embeddings and module in plan.heads:
            continue  # a tied head is the embedding: saved (and re-tied by peft) through it
        tuned = {t: ft.get(t) for t in names}
        if any(_differs(base.get(t), tuned[t]) for t in names):
            saved.append(module)
            out.tensors.update({peft_format.saved_key(t): tensor for t, tensor in tuned.items()})
        del tuned
    tie = plan.tied_embeddings and plan.input_embedding in saved
    if tie:
        # peft's ensure_weight_tying expects the head's key as well; it holds the embedding.
        embedding = out.tensors[peft_format.saved_key(f"{plan.input_embedding}.weight")]
        head = plan.heads[0] if plan.heads else "lm_head"  # a tied head is usually left out of the checkpoint
        out.tensors[peft_format.saved_key(f"{head}.weight")] = embedding
    return saved, tie


def extract_adapter(spec: ExtractSpec, base_dir: Path, ft_dir: Path, output_dir: Path,
                    on_layer: Callable[[int, int, str, float], None] | None = None,
                    log: Callable[[str], None] | None = None, verify_keys: bool = True) -> ExtractionResult:
    """Factor the fine-tuned model's changes into a stock peft LoRA adapter (+ training_metrics.json) in output_dir.

    on_layer(done, total, module, eta_s) is called after each targeted layer, log(message) with notes. With
    verify_keys the adapter's keys are checked against what peft builds for this architecture (meta device)
    before anything is written.
    """
    log = log or (lambda message: None)
    start = time.perf_counter()
    base_dir, ft_dir, output_dir = Path(base_dir), Path(ft_dir), Path(output_dir)
    model_files.check_same_architecture(base_dir, ft_dir)
    base_index, ft_index = model_files.read_tensor_index(base_dir), model_files.read_tensor_index(ft_dir)
    plan = plan_extraction(base_dir, spec.target_modules, base_index)
    check_rank_fits(spec.rank, plan)
    base, ft = _Reader(base_index), _Reader(ft_index)
    out = _Collected()

    reports = []
    total_elements = sum(o * i for o, i in (layer.shape for layer in plan.layers))
    done_elements = 0
    for n, layer in enumerate(plan.layers, 1):
        reports.append(_extract_layer(spec, layer, base, ft, out))
        done_elements += layer.shape[0] * layer.shape[1]
        elapsed = time.perf_counter() - start
        if on_layer is not None:
            on_layer(n, len(plan.layers), layer.module, round(elapsed * (total_elements / done_elements - 1), 1))

    changed_untargeted = [m for m in plan.untargeted
                          if any(_differs(base.get(t), ft.get(t)) for t in (f"{m}.weight", f"{m}.bias")
                                 if t in base_index)]
    modules_to_save, tie = _whole_modules(plan, base, ft, out)
    lora_bias = bool(out.bias_deltas)
    if lora_bias:
        _add_lora_biases(plan, reports, out)

    if not out.ranks:
        if not modules_to_save:
            raise ModelError(f"the fine-tuned model {ft_dir} equals the base model {base_dir} on every targeted "
                             "layer: nothing to extract (check that finetuned_model points at the fine-tuned "
                             "weights)", field="finetuned_model")
        raise ModelError(f"no targeted linear layer changed between {base_dir} and {ft_dir} (only "
                         f"{', '.join(modules_to_save[:3])} did): a LoRA cannot carry that; target other modules",
                         field="target_modules")
    notes = []
    if changed_untargeted:
        notes.append(f"{len(changed_untargeted)} linear layer(s) changed but are not in target_modules; their "
                     f"change is not in the adapter (first: {changed_untargeted[0]})")
    no_bias = [layer.module for layer in plan.layers if layer.bias is None and layer.module in out.ranks]
    if lora_bias and no_bias:
        notes.append(f"lora_bias=True: peft cannot merge this adapter into {len(no_bias)} layer(s) without a base "
                     f"bias (first: {no_bias[0]}); loading and inference work")
    for note in notes:
        log(note)

    config = peft_format.build_lora_config(
        base_ref=spec.base_model, ranks=out.ranks, lora_bias=lora_bias, modules_to_save=modules_to_save,
        tie_embeddings=tie, architectures=plan.config.get("architectures"))
    if verify_keys:
        peft_format.check_keys(out.tensors, peft_format.expected_keys(base_dir, config))
    peft_format.save_adapter(output_dir, config, out.tensors)
    result = ExtractionResult(layers=reports, modules_to_save=modules_to_save, changed_untargeted=changed_untargeted,
                              lora_bias=lora_bias, notes=notes, seconds=time.perf_counter() - start)
    write_metrics(output_dir, spec, result)
    return result


def write_metrics(output_dir: Path, spec: ExtractSpec, result: ExtractionResult) -> Path:
    """training_metrics.json: the summary, the notes and one row per targeted layer."""
    path = Path(output_dir) / METRICS_FILE
    doc = {"summary": result.summary(), "notes": result.notes, "modules_to_save": result.modules_to_save,
           "changed_untargeted": result.changed_untargeted,
           "settings": {"rank": spec.rank, "energy": spec.energy, "max_rank": spec.max_rank, "svd": spec.svd,
                        "rho_target": svd.RHO_TARGET},
           "layers": [asdict(r) for r in result.layers]}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path
