"""Read a model directory without torch: config.json, safetensors headers, weight hashes.

The submit-time checks (and the extraction planner) need tensor names, dtypes and shapes, never the weights
themselves. A safetensors file opens with an 8-byte little-endian header length followed by a JSON header
(name -> dtype, shape, data_offsets), so reading a 70B model's layout costs a few kilobytes per shard.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

from farm.digests import sha256_file
from farm.errors import ModelError

CONFIG_FILE = "config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Files that sit beside a model but are not its weights.
_NOT_WEIGHTS = {"adapter_model.safetensors"}
# The safetensors format itself refuses headers above 100 MB; a bigger one means a corrupt file.
_MAX_HEADER_BYTES = 100 * 1024 * 1024

# Last name component of input-embedding layers across common architectures (never LoRA "all-linear" targets).
_EMBEDDING_NAMES = {"embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings", "embed_positions",
                    "token_type_embeddings", "embed_in", "tok_embeddings", "shared"}
# Output heads: peft's "all-linear" excludes the model's output embedding layer.
_OUTPUT_NAMES = {"lm_head", "embed_out"}
_OUTPUT_FULL_NAMES = {"output"}  # Meta's original Llama layout names the head just `output`


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its safetensors header describes it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int = 0
    """Where the tensor's bytes start in the file (after the 8-byte length and the header)."""
    nbytes: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def resolve_model_dir(ref: str) -> Path | None:
    """The local directory `ref` names, or None when it is not one (s3://…, a hub id, or no such path).

    A path that exists but is a file raises ModelError: the farm wants the model's folder.
    """
    if "://" in ref:
        return None
    path = Path(ref).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise ModelError(f"{ref}: is a file; give the model's directory (the folder holding config.json and "
                         "*.safetensors)")
    return None


def read_config(model_dir: Path) -> dict:
    """config.json as a dict; ModelError naming the file when it is missing or not a JSON object."""
    path = Path(model_dir) / CONFIG_FILE
    if not Path(model_dir).is_dir():
        raise ModelError(f"{model_dir}: no such model directory")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: missing; a model directory needs its config.json (save it with "
                         "save_pretrained)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: line {exc.lineno}: not valid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _index_files(model_dir: Path) -> list[Path] | None:
    index = model_dir / SAFETENSORS_INDEX
    if not index.exists():
        return None
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ModelError(f"{index}: not a valid safetensors index (needs a `weight_map` object): {exc}") from None
    files = [model_dir / name for name in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelError(f"{index}: lists shard(s) that are not in {model_dir}: {', '.join(missing)}; the download "
                         "is incomplete")
    return files


def weight_files(model_dir: Path) -> list[Path]:
    """The model's *.safetensors files (the shards named by model.safetensors.index.json when there is one)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir}: no such model directory")
    files = _index_files(model_dir)
    if files is None:
        files = sorted(p for p in model_dir.glob("*.safetensors") if p.name not in _NOT_WEIGHTS)
    if not files:
        other = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = (f" (found {', '.join(other[:3])}: convert them with `model.save_pretrained(dir, "
                "safe_serialization=True)`)") if other else ""
        raise ModelError(f"{model_dir}: no *.safetensors weight files; the farm reads safetensors only{hint}")
    return files


def _read_header(path: Path) -> tuple[dict, int]:
    """(header, offset of the data section) of one safetensors file."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelError(f"{path}: too short to be a safetensors file ({len(head)} bytes)")
            (length,) = struct.unpack("<Q", head)
            size = path.stat().st_size
            if length > _MAX_HEADER_BYTES or 8 + length > size:
                raise ModelError(f"{path}: not a safetensors file (header length {length} does not fit a "
                                 f"{size}-byte file)")
            header = json.loads(f.read(length))
    except OSError as exc:
        raise ModelError(f"{path}: cannot read: {exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: corrupt safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: corrupt safetensors header: not a JSON object")
    return header, 8 + length


def read_tensor_index(model_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of the model (name -> dtype, shape, file, byte range), from the safetensors headers only."""
    index: dict[str, TensorInfo] = {}
    for path in weight_files(model_dir):
        header, data_start = _read_header(path)
        size = path.stat().st_size
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            try:
                begin, end = (int(o) for o in entry["data_offsets"])
                info = TensorInfo(name=name, dtype=str(entry["dtype"]), shape=tuple(int(d) for d in entry["shape"]),
                                  file=path, offset=data_start + begin, nbytes=end - begin)
            except (KeyError, TypeError, ValueError):
                raise ModelError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from None
            if begin < 0 or end < begin or data_start + end > size:
                raise ModelError(f"{path}: tensor {name} lies outside the file (truncated download?)")
            if name in index:
                raise ModelError(f"{model_dir}: tensor {name} is stored twice ({index[name].file.name} and "
                                 f"{path.name})")
            index[name] = info
    return index


def is_embedding_module(module: str) -> bool:
    """Input embeddings and output heads: never "all-linear" LoRA targets (changed ones go to modules_to_save)."""
    last = module.rsplit(".", 1)[-1]
    return last in _EMBEDDING_NAMES or last in _OUTPUT_NAMES or module in _OUTPUT_FULL_NAMES


def _matrix_modules(index: dict[str, TensorInfo]) -> list[str]:
    return [n[: -len(".weight")] for n, t in index.items() if n.endswith(".weight") and len(t.shape) == 2]


def linear_module_names(model_dir: Path, index: dict[str, TensorInfo] | None = None) -> list[str]:
    """Modules with a 2-D `.weight`, minus embeddings and the output head: what peft's "all-linear" targets."""
    index = read_tensor_index(model_dir) if index is None else index
    return [m for m in _matrix_modules(index) if not is_embedding_module(m)]


def module_suffixes(modules: list[str]) -> list[str]:
    """The distinct last name components (q_proj, k_proj, ...), sorted: what a user writes in target_modules."""
    return sorted({m.rsplit(".", 1)[-1] for m in modules})


def matches_target(module: str, target: str) -> bool:
    """peft's rule for a list of target names: the full name, or a suffix after a dot."""
    return module == target or module.endswith("." + target)


def check_target_modules(model_dir: Path, target_modules: str | list[str],
                         index: dict[str, TensorInfo] | None = None) -> list[str]:
    """The module names `target_modules` selects ("all-linear" or name suffixes); ModelError when one matches none.

    A listed name may also select an embedding or the output head (peft can target those); "all-linear" never does.
    """
    index = read_tensor_index(model_dir) if index is None else index
    linear = linear_module_names(model_dir, index)
    if target_modules == "all-linear":
        if not linear:
            raise ModelError(f"{model_dir}: no linear layers (2-D .weight tensors) besides embeddings; nothing for "
                             "LoRA to target")
        return linear
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    candidates = _matrix_modules(index)
    missing = [t for t in target_modules if not any(matches_target(m, t) for m in candidates)]
    if missing:
        raise ModelError(
            f"{model_dir}: target_modules {', '.join(repr(t) for t in missing)} match no layer of this model; "
            f"available: {', '.join(module_suffixes(linear))} (or 'all-linear')", field="target_modules")
    return [m for m in candidates if any(matches_target(m, t) for t in target_modules)]


def sha256_weights(model_dir: Path) -> tuple[str, dict[str, str]]:
    """(combined digest, {file name: sha256}) of the weight files; combined = sha256 of "name sha\\n" sorted by name.

    Each file's digest is cached by its identity (farm.hashcache): an unchanged model is read once per host.
    """
    from farm.hashcache import cached_digest

    per_file = {p.name: cached_digest(p, sha256_file) for p in weight_files(model_dir)}
    combined = hashlib.sha256("".join(f"{n} {per_file[n]}\n" for n in sorted(per_file)).encode()).hexdigest()
    return combined, per_file


def check_same_architecture(base_dir: Path, ft_dir: Path) -> None:
    """Both models share model_type, architectures, tensor names and shapes; ModelError naming the first difference."""
    base_cfg, ft_cfg = read_config(base_dir), read_config(ft_dir)
    for key in ("model_type", "architectures"):
        if base_cfg.get(key) != ft_cfg.get(key):
            raise ModelError(f"config.json `{key}` differs: base {base_dir} has {base_cfg.get(key)!r}, fine-tuned "
                             f"{ft_dir} has {ft_cfg.get(key)!r}; extraction needs the same architecture")
    base, ft = read_tensor_index(base_dir), read_tensor_index(ft_dir)
    only_base = [n for n in base if n not in ft]
    only_ft = [n for n in ft if n not in base]
    if only_base:
        raise ModelError(f"tensor {only_base[0]} is in the base model {base_dir} but not in the fine-tuned model "
                         f"{ft_dir}" + (f" (and {len(only_base) - 1} more)" if len(only_base) > 1 else ""))
    if only_ft:
        raise ModelError(f"tensor {only_ft[0]} is in the fine-tuned model {ft_dir} but not in the base model "
                         f"{base_dir}" + (f" (and {len(only_ft) - 1} more)" if len(only_ft) > 1 else ""))
    for name, info in base.items():
        if ft[name].shape != info.shape:
            raise ModelError(f"tensor {name}: shape {list(info.shape)} in the base model {base_dir} but "
                             f"{list(ft[name].shape)} in the fine-tuned model {ft_dir}; extraction needs the same "
                             "shapes")


# ---------------------------------------------------------------- Hub ids at submit (no torch, no download)

@dataclass(frozen=True)
class HubCheck:
    """What a submit-time look at a Hub id found: where it looked, the revision, and what it could not check."""

    repo_id: str
    revision: str | None
    where: str
    """"cache" (the snapshot is on this machine), "hub" (the Hub's file list), or "none" (could not look)."""
    unchecked: tuple[str, ...] = ()
    """Sentences naming what could not be checked here; the worker checks it when it fetches the model."""


def _hub_snapshot_in_cache(repo_id: str, revision: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    from farm.model_fetch import hub_cache_dir

    found = try_to_load_from_cache(repo_id, CONFIG_FILE, cache_dir=hub_cache_dir(), revision=revision or "main")
    return Path(found).parent if isinstance(found, str) else None


def check_hub_model(repo_id: str, revision: str | None, target_modules=None) -> HubCheck:
    """Check a Hub id without torch: in this machine's Hub cache when the snapshot is there (config.json and the
    target modules, from the safetensors headers), else on the Hub's file list when online (the repo, the
    revision, config.json and safetensors weights exist). ModelError on what is certainly wrong. target_modules
    None: the layers are not checked (a merge).
    """
    from farm.model_fetch import check_repo_id, hub_offline

    check_repo_id(repo_id)
    rev = revision or "main"
    snapshot = _hub_snapshot_in_cache(repo_id, revision)
    if snapshot is not None and target_modules is None:  # a merge: the model is there, its layers do not matter
        read_config(snapshot)
        return HubCheck(repo_id, snapshot.name, "cache")
    if snapshot is not None:
        read_config(snapshot)
        try:
            check_target_modules(snapshot, target_modules)
        except ModelError as exc:
            if "target_modules" in exc.message:
                raise
            return HubCheck(repo_id, snapshot.name, "cache", (
                f"{repo_id}@{rev}: the weights are not all in this machine's Hub cache, so target_modules were not "
                "checked here; the worker checks them after downloading",))
        return HubCheck(repo_id, snapshot.name, "cache")
    if hub_offline():
        return HubCheck(repo_id, revision, "none", (
            f"{repo_id}@{rev} is not in this machine's Hub cache and HF_HUB_OFFLINE is set: neither the repo, the "
            "revision nor target_modules were checked; the worker needs it in its own cache",))
    return _check_on_hub(repo_id, revision, target_modules is not None)


def _check_on_hub(repo_id: str, revision: str | None, targets: bool = True) -> HubCheck:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    rev = revision or "main"
    try:
        files = HfApi().list_repo_files(repo_id, revision=revision)  # token: HF_TOKEN, read by huggingface_hub
    except GatedRepoError:
        return HubCheck(repo_id, revision, "none", (
            f"{repo_id} is gated: its files could not be listed here; the worker needs a token (HF_TOKEN) with "
            "access",))
    except RepositoryNotFoundError:
        raise ModelError(f"base_model: no Hub repository {repo_id!r} (or it is private and no token was given)",
                         field="base_model") from None
    except RevisionNotFoundError:
        raise ModelError(f"base_revision: {rev!r} is not a branch, tag or commit of {repo_id}",
                         field="base_revision") from None
    except (HfHubHTTPError, OSError) as exc:
        return HubCheck(repo_id, revision, "none", (
            f"the Hub could not be asked about {repo_id}@{rev} ({type(exc).__name__}); nothing about it was "
            "checked here",))
    if CONFIG_FILE not in files:
        raise ModelError(f"base_model: {repo_id}@{rev} has no config.json: not a transformers model",
                         field="base_model")
    if not any(f.endswith(".safetensors") for f in files):
        raise ModelError(f"base_model: {repo_id}@{rev} has no *.safetensors weights; the farm reads safetensors "
                         "only", field="base_model")
    if not targets:
        return HubCheck(repo_id, revision, "hub")
    return HubCheck(repo_id, revision, "hub", (
        f"{repo_id}@{rev}: target_modules were not checked (the weights are not in this machine's Hub cache); the "
        "worker checks them after downloading",))
