"""Resumable checkpoints: `<checkpoint_dir>/step-<k>/` holds all a run needs to continue at step k+1.

Layout::

    step-<k>/adapter/                 adapter_config.json + adapter_model.safetensors (peft save_pretrained)
    step-<k>/optimizer.pt, scheduler.json   the backend's state (farm.training.backend); with several processes,
                                      one optimizer-rank<r>-of<n>.pt per process (farm.training.deepspeed_backend)
    step-<k>/rng_state.safetensors    torch RNG states (CPU and each GPU)
    step-<k>/trainer_state.json       step, data position (epoch, step and batch index in it), counters,
                                      metrics history, python and numpy RNG states, dataset sha256

A checkpoint is written to `step-<k>.tmp/` and renamed into place, so a process killed mid-write never leaves a
folder that looks complete. Nothing is pickled except the optimizer's tensors, loaded with `weights_only`.
With several processes every one of them calls save_checkpoint: each writes its optimizer partition, the main
process the rest, and the folder is renamed (then announced) only after all have written.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from farm.errors import DatasetError, StoreError
from farm.training.loop import TrainState

FORMAT_VERSION = 1
STATE_FILE = "trainer_state.json"
RNG_FILE = "rng_state.safetensors"
ADAPTER_DIR = "adapter"


def capture_rng() -> tuple[dict, dict]:
    """(python and numpy states as JSON data, torch states as tensors)."""
    import numpy as np
    import torch

    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    json_part = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    return json_part, tensors


def restore_rng(json_part: dict, tensors: dict) -> None:
    """Put back what capture_rng took."""
    import numpy as np
    import torch

    version, state, gauss = json_part["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = json_part["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(checkpoint_dir: str | Path, model, backend, state: TrainState, extra: dict | None = None) -> Path:
    """Write step-<state.step>/ under checkpoint_dir (atomically); return its path. Every process calls it."""
    from safetensors.torch import save_file

    final = Path(checkpoint_dir) / f"step-{state.step}"
    tmp = final.with_name(final.name + ".tmp")
    main = backend.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    backend.barrier()  # the folder exists before anyone writes into it
    with backend.gathered_adapter():
        if main:
            model.save_pretrained(tmp / ADAPTER_DIR)
    if main and (extra or {}).get("base_model_ref"):
        from farm.artifacts import set_base_model_reference

        # A pulled checkpoint is a standard adapter naming the base the user gave, not this worker's scratch path.
        set_base_model_reference(tmp / ADAPTER_DIR, extra["base_model_ref"])
    backend.save_state(tmp)
    if main:
        rng_json, rng_tensors = capture_rng()
        save_file({k: v.contiguous() for k, v in rng_tensors.items()}, str(tmp / RNG_FILE))
        doc = {
            "format_version": FORMAT_VERSION,
            # The position of the next micro-batch, for people reading the file; resume uses the state below.
            "batch_index": state.step_in_epoch * (extra or {}).get("grad_accum", 1),
            "processes": backend.world_size,
            "state": state.to_dict(),
            "rng": rng_json,
            **(extra or {}),
        }
        (tmp / STATE_FILE).write_text(json.dumps(doc, indent=1))
    backend.barrier()  # every process's part is on disk before the folder looks complete
    if main:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    return final


def read_checkpoint(path: str | Path) -> dict:
    """The trainer_state.json of a checkpoint folder, checked for completeness; raise StoreError if unusable."""
    path = Path(path)
    missing = [name for name in (STATE_FILE, RNG_FILE, f"{ADAPTER_DIR}/adapter_model.safetensors")
               if not (path / name).is_file()]
    if missing:
        raise StoreError(f"{path}: not a complete training checkpoint (missing {', '.join(missing)}); resume from "
                         "another checkpoint or start the job again")
    try:
        doc = json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"{path / STATE_FILE}: unreadable checkpoint state: {exc}") from None
    if doc.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{path}: checkpoint format {doc.get('format_version')!r}, this farm reads "
                         f"{FORMAT_VERSION}; start the job again")
    return doc


def load_checkpoint(path: str | Path, model, backend, *, dataset_sha256: str, steps_per_epoch: int,
                    adapter_name: str = "default") -> TrainState:
    """Restore adapter weights, optimizer, schedule and RNG from a checkpoint; return the loop state to go on from.

    `adapter_name`: the adapter the weights go into (a co-trained job's, farm.training.cotrain).

    Refuses (DatasetError) a checkpoint made on other data: its data position would point at other examples.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    doc = read_checkpoint(path)
    saved_by = doc.get("processes", 1)
    if saved_by != backend.world_size:
        raise StoreError(f"{path}: the checkpoint was written by {saved_by} process(es) and this run has "
                         f"{backend.world_size}; resume with the job's own resources or start the job again")
    if doc.get("dataset_sha256") != dataset_sha256 or doc.get("steps_per_epoch") != steps_per_epoch:
        raise DatasetError(
            f"{path}: the checkpoint was made on other data (dataset sha256 {str(doc.get('dataset_sha256'))[:12]}…, "
            f"{doc.get('steps_per_epoch')} steps per epoch; now {dataset_sha256[:12]}…, {steps_per_epoch}); "
            "resume only with the job's own dataset and batch settings", field="dataset.path")
    weights = load_file(str(path / ADAPTER_DIR / "adapter_model.safetensors"))
    with backend.gathered_adapter(modify=True):
        result = set_peft_model_state_dict(model, weights, adapter_name=adapter_name)
    if getattr(result, "unexpected_keys", None):
        raise StoreError(f"{path}: checkpoint adapter weights do not fit this model "
                         f"(unexpected: {', '.join(result.unexpected_keys[:5])})")
    restore_rng(doc["rng"], load_file(str(path / RNG_FILE)))
    # After the shared RNG: a multi-process backend puts back each process's own torch RNG state.
    backend.load_state(path)
    return TrainState.from_dict(doc["state"])
