"""Submit-time checks of an extraction spec, without torch: config.json and safetensors headers only.

Both models must be readable local folders with the same architecture and tensor shapes, the target modules
must exist, and a fixed rank must fit every targeted layer. Models given as s3:// or hub ids are checked by
the worker that fetches them; the summary says so.
"""

from __future__ import annotations

from pathlib import Path

from farm import model_files
from farm.errors import ModelError
from farm.extraction.plan import check_rank_fits, plan_extraction
from farm.specs import ExtractSpec


def _local_dir(ref: str, field: str) -> Path | None:
    try:
        path = model_files.resolve_model_dir(ref)
    except ModelError as exc:
        raise _with_field(exc, field) from None
    if path is None and (ref.startswith((".", "/", "~")) or Path(ref).is_absolute()):
        raise ModelError(f"{field}: {ref}: no such model directory", field=field)
    return path


def _with_field(exc: ModelError, field: str) -> ModelError:
    return ModelError(f"{field}: {exc.message}", field=exc.field or field)


def _check_readable(path: Path, field: str) -> dict:
    try:
        model_files.read_config(path)
        return model_files.read_tensor_index(path)
    except ModelError as exc:
        raise _with_field(exc, field) from None


def validate_extract_spec(spec: ExtractSpec) -> dict:
    """Check an ExtractSpec's models before the job is queued; return a small summary (layers, shapes, notes).

    Raises ModelError naming the field and the file, tensor or layer at fault.
    """
    base_dir = _local_dir(spec.base_model, "base_model")
    ft_dir = _local_dir(spec.finetuned_model, "finetuned_model")
    notes = [f"{field}: {ref} is not a local directory; the worker checks it after fetching it"
             for field, ref, path in (("base_model", spec.base_model, base_dir),
                                      ("finetuned_model", spec.finetuned_model, ft_dir)) if path is None]
    summary: dict = {"layers": None, "shapes": {}, "notes": notes}
    indexes = {}
    if base_dir is not None:
        indexes["base_model"] = _check_readable(base_dir, "base_model")
    if ft_dir is not None:
        indexes["finetuned_model"] = _check_readable(ft_dir, "finetuned_model")
    if base_dir is not None and ft_dir is not None:
        try:
            model_files.check_same_architecture(base_dir, ft_dir)
        except ModelError as exc:
            raise _with_field(exc, "finetuned_model") from None
    model_field, model_dir = (("base_model", base_dir) if base_dir is not None else ("finetuned_model", ft_dir))
    if model_dir is None:
        return summary
    try:
        plan = plan_extraction(model_dir, spec.target_modules, indexes[model_field])
    except ModelError as exc:
        field = exc.field or "target_modules"
        raise ModelError(f"{field}: {exc.message}", field=field) from None
    check_rank_fits(spec.rank, plan)
    shapes: dict[str, list[int]] = {}
    for layer in plan.layers:
        shapes.setdefault(layer.module.rsplit(".", 1)[-1], list(layer.shape))
    summary.update(layers=len(plan.layers), shapes=shapes)
    return summary
