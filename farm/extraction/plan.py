"""What an extraction will read and factor, decided from config.json and safetensors headers only (no torch).

Every 2-D `.weight` tensor of a targeted linear layer is factored as a LoRA (with its bias, when it has one).
Embeddings and the output head are compared whole and, when changed, saved through peft's `modules_to_save`;
so are other small modules (norms) whose weights changed, because a LoRA cannot express them and the logits
would drift without them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from farm import model_files
from farm.errors import ModelError
from farm.model_files import TensorInfo

HEAD_NAMES = ("lm_head", "embed_out")


@dataclass(frozen=True)
class LinearLayer:
    """One targeted linear layer: `module.weight` (out × in) and maybe `module.bias`."""

    module: str
    weight: str
    bias: str | None
    shape: tuple[int, int]


@dataclass
class ExtractionPlan:
    """The layers to factor and the tensors to compare whole."""

    layers: list[LinearLayer]
    untargeted: list[str]
    """Linear layers that the target_modules leave out (reported when they changed)."""
    whole_modules: dict[str, list[str]]
    """Module -> its tensor names, for embeddings, the head and other parameter-only modules (norms)."""
    input_embedding: str | None
    """Module name of the input token embedding (the one a tied head shares)."""
    tied_embeddings: bool
    heads: list[str] = field(default_factory=list)
    """Output-head modules stored in the checkpoint (none when a tied head is left out of it)."""
    config: dict = field(default_factory=dict)


def _is_head(module: str) -> bool:
    return module.rsplit(".", 1)[-1] in HEAD_NAMES or module == "output"


def _input_embedding(index: dict[str, TensorInfo], config: dict) -> str | None:
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    matrices = [n.removesuffix(".weight") for n, t in index.items() if n.endswith(".weight") and len(t.shape) == 2]
    candidates = [m for m in matrices if model_files.is_embedding_module(m) and not _is_head(m)]
    if vocab:
        sized = [c for c in candidates if index[c + ".weight"].shape[0] == vocab]
        candidates = sized or candidates
    return candidates[0] if candidates else None


def _whole_modules(index: dict[str, TensorInfo], linear: set[str]) -> dict[str, list[str]]:
    """Modules that own only direct parameters (no sub-modules) and are not linear layers: norms, embeddings."""
    by_module: dict[str, list[str]] = {}
    for name in index:
        module, _, _ = name.rpartition(".")
        if module and module not in linear:
            by_module.setdefault(module, []).append(name)
    # A module with children would drag its whole subtree into modules_to_save: leave those out.
    parents = {m.rpartition(".")[0] for m in list(by_module) + list(linear)}
    return {m: names for m, names in by_module.items() if m not in parents}


def plan_extraction(base_dir: Path, target_modules: str | list[str],
                    index: dict[str, TensorInfo] | None = None) -> ExtractionPlan:
    """The extraction plan for a base model and the spec's target_modules; ModelError when nothing can be targeted."""
    config = model_files.read_config(base_dir)
    index = model_files.read_tensor_index(base_dir) if index is None else index
    linear = model_files.linear_module_names(base_dir, index)
    selected = set(model_files.check_target_modules(base_dir, target_modules, index))
    targeted = [m for m in linear if m in selected]
    if not targeted:
        raise ModelError(f"{base_dir}: target_modules {target_modules!r} select no linear layer (only embeddings or "
                         f"the output head); available: {', '.join(model_files.module_suffixes(linear))}",
                         field="target_modules")
    not_float = [f"{m}.weight ({index[f'{m}.weight'].dtype})" for m in targeted
                 if not index[f"{m}.weight"].dtype.startswith(("F", "BF"))]
    if not_float:
        raise ModelError(f"{base_dir}: tensor {not_float[0]} is not floating point: extraction needs unquantized "
                         "weights (use the full-precision checkpoint)", field="base_model")
    layers = [LinearLayer(module=m, weight=f"{m}.weight",
                          bias=f"{m}.bias" if f"{m}.bias" in index else None,
                          shape=tuple(index[f"{m}.weight"].shape)) for m in targeted]
    # Older configs leave tie_word_embeddings out when it is the (tied) default; a missing head tensor is the tell.
    heads = [n.removesuffix(".weight") for n in index if n.endswith(".weight") and _is_head(n.removesuffix(".weight"))]
    text_config = config.get("text_config") or {}
    tied = bool(config.get("tie_word_embeddings", text_config.get("tie_word_embeddings", not heads)))
    return ExtractionPlan(layers=layers, untargeted=[m for m in linear if m not in selected],
                          whole_modules=_whole_modules(index, set(linear)),
                          input_embedding=_input_embedding(index, config),
                          tied_embeddings=tied, config=config, heads=heads)


def check_rank_fits(rank: int | None, plan: ExtractionPlan) -> None:
    """A fixed rank must fit every targeted layer: ModelError naming the first layer it does not fit."""
    if rank is None:
        return
    for layer in plan.layers:
        if rank > min(layer.shape):
            raise ModelError(f"rank: {rank} is larger than layer {layer.module}'s min(out, in) = {min(layer.shape)} "
                             f"(shape {list(layer.shape)}); lower rank, or use energy with max_rank", field="rank")
