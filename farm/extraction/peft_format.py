"""Write extracted factors as a stock peft LoRA adapter, and check its keys against what peft will expect.

Key layout (peft 0.21, `PeftModel.from_pretrained`): `base_model.model.<module>.lora_A.weight` (r × in),
`...lora_B.weight` (out × r), `...lora_B.bias` when `lora_bias=True` (every targeted layer then has one), and
`base_model.model.<module>.<param>` for each module in `modules_to_save` (full weights). With tied embeddings
and `ensure_weight_tying=True`, peft also expects the head's key, which holds the same tensor as the embedding.

Ranks vary per layer through `rank_pattern`, with `alpha_pattern` equal to the rank so the scaling is 1 and
base + B·A is exactly the fine-tuned weight's approximation.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections import Counter
from pathlib import Path

from farm.errors import FarmError, ModelError

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def lora_key(module: str, part: str) -> str:
    """The saved key of one LoRA tensor: part is lora_A.weight, lora_B.weight or lora_B.bias."""
    return f"{PEFT_PREFIX}{module}.{part}"


def saved_key(tensor_name: str) -> str:
    """The saved key of a modules_to_save tensor (its checkpoint name under the peft prefix)."""
    return f"{PEFT_PREFIX}{tensor_name}"


def build_lora_config(*, base_ref: str, ranks: dict[str, int], lora_bias: bool, modules_to_save: list[str],
                      tie_embeddings: bool, architectures: list[str] | None):
    """A peft LoraConfig for these per-layer ranks (scaling 1 everywhere)."""
    from peft import LoraConfig

    default = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {m: r for m, r in ranks.items() if r != default}
    arch = (architectures or [""])[0]
    return LoraConfig(
        r=default, lora_alpha=default, lora_dropout=0.0, bias="none", target_modules=sorted(ranks),
        rank_pattern=pattern, alpha_pattern=dict(pattern), lora_bias=lora_bias,
        modules_to_save=list(modules_to_save) or None,
        ensure_weight_tying=bool(tie_embeddings and modules_to_save),
        task_type="CAUSAL_LM" if arch.endswith("ForCausalLM") else None,
        base_model_name_or_path=base_ref,
    )


def expected_keys(base_dir: Path, lora_config) -> dict[str, tuple[int, ...]]:
    """The adapter keys and shapes peft expects for this config on this architecture.

    Built on the meta device (no memory, no weights read): the model class from config.json's architectures,
    wrapped by get_peft_model, then peft's own get_peft_model_state_dict. Raises ModelError when the
    architecture cannot be built here.
    """
    import torch
    import transformers
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict

    try:
        config = transformers.AutoConfig.from_pretrained(str(base_dir))
    except Exception as exc:  # noqa: BLE001 - any failure means: this config cannot be built here
        raise ModelError(f"{base_dir}: transformers cannot read config.json to check the adapter's keys "
                         f"({type(exc).__name__}: {exc})") from None
    arch = (getattr(config, "architectures", None) or [None])[0]
    # The class config.json names; without one, the causal LM (whose names match most checkpoints), then the bare
    # model. The first whose module names the adapter targets wins.
    builders = [lambda: getattr(transformers, arch)(config)] if arch and hasattr(transformers, arch) else []
    builders += [lambda: transformers.AutoModelForCausalLM.from_config(config),
                 lambda: transformers.AutoModel.from_config(config)]
    failures = []
    for build in builders:
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                peft_model = get_peft_model(build(), copy.deepcopy(lora_config))
                state = get_peft_model_state_dict(peft_model)
            break
        except Exception as exc:  # noqa: BLE001 - try the next class; all failures are reported together
            failures.append(f"{type(exc).__name__}: {str(exc)[:300]}")
    else:
        raise ModelError(f"{base_dir}: cannot build the architecture on the meta device to check the adapter's "
                         f"keys ({'; '.join(failures)})")
    return {k: tuple(v.shape) for k, v in state.items()}


def check_keys(tensors: dict, expected: dict[str, tuple[int, ...]]) -> None:
    """The adapter's keys and shapes are exactly what peft will load: no missing, no unexpected, no mismatched."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{k}: {tuple(tensors[k].shape)} != {expected[k]}" for k in sorted(set(tensors) & set(expected))
             if tuple(tensors[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}" + (f" (+{len(missing) - 5})" if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}" + (f" (+{len(unexpected) - 5})" if len(unexpected) > 5 else ""))
        if wrong:
            parts.append(f"wrong shapes {wrong[:5]}")
        raise ModelError("the extracted adapter does not match the keys peft expects for this model: "
                        + "; ".join(parts) + ". This architecture's layout is not supported by extraction yet.")


def save_adapter(output_dir: Path, lora_config, tensors: dict) -> list[Path]:
    """adapter_config.json + adapter_model.safetensors in output_dir (the weights written first, the config last)."""
    from safetensors.torch import save_file

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    weights = output_dir / ADAPTER_WEIGHTS
    # safetensors refuses tensors that share storage (a tied head is the embedding): give each its own.
    seen: set[int] = set()
    clean = {}
    for key, t in tensors.items():
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr()
        clean[key] = t.clone() if ptr in seen else t
        seen.add(ptr)
    try:
        save_file(clean, str(weights), metadata={"format": "pt"})
        # peft's own writer (config.save_pretrained) lists sets in hash order; sorted lists keep the file reproducible
        config = {k: sorted(v) if isinstance(v, set) else v for k, v in lora_config.to_dict().items()}
        (output_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    except OSError as exc:
        raise FarmError(f"{output_dir}: cannot write the adapter: {exc}") from None
    return [weights, output_dir / ADAPTER_CONFIG]
