"""The trust boundary of a remote caller (the HTTP API): what a spec may name when it does not come from the host.

A local operator (the CLI on a farm host) may name local paths. A remote caller may not make the server read its
own files: its datasets are uploads or `store:` references, a local model path is accepted only under
FARM_MODEL_ROOTS, and no message about a server path says whether it exists (DESIGN.md "Trust boundary").
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from farm.errors import DatasetError, ModelError
from farm.limits import excerpt
from farm.names import is_store_ref, store_key
from farm.settings import FarmSettings

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_REMOTE_MODEL_SCHEMES = ("s3://",)


def check_store_ref(ref: str, field: str) -> str:
    """The store key of a `store:` dataset reference; DatasetError (a bad request, not a store failure) when the
    key could escape the store (`..`, absolute, empty parts, NUL)."""
    from farm.errors import StoreError
    from farm.store.base import validate_key

    key = store_key(ref)
    try:
        validate_key(key)
    except StoreError:
        raise DatasetError(f"{field}: {excerpt(ref)} is not a valid store reference: give the "
                           "store:datasets/<sha256>.jsonl that POST /v1/datasets returned (no '..', no leading "
                           "'/', no empty parts)", field=field) from None
    return key


def _under(path: str, roots: list[Path]) -> bool:
    """Whether `path` (absolute, normalized) lies under one of `roots`, symlinks resolved on both sides."""
    real = os.path.realpath(path)
    for root in roots:
        root_real = os.path.realpath(Path(root).expanduser())
        if os.path.commonpath([real, root_real]) == root_real:
            return True
    return False


def check_remote_model(ref: str, field: str, settings: FarmSettings) -> None:
    """A model reference a remote caller may give: a hub id, an s3:// URI, or an absolute path under
    FARM_MODEL_ROOTS. Anything else is refused with the same message whether the path exists or not."""
    if any(ref.startswith(scheme) for scheme in _REMOTE_MODEL_SCHEMES):
        return
    roots = [Path(r).expanduser() for r in settings.model_roots]
    refuse = ModelError(
        f"{field}: {excerpt(ref)}: over the API a model is a hub id (org/name), an s3:// URI or a local path under "
        "the server's FARM_MODEL_ROOTS" + ("" if roots else " (none configured here)") + "; the server's other "
        "files are not reachable from the API", field=field)
    if "://" in ref:
        raise refuse
    local_looking = ref.startswith(("/", ".", "~")) or "\\" in ref or not _HUB_ID.match(ref) or ".." in ref
    if not local_looking:
        # a hub id, unless the server would read it as a folder relative to its working directory
        if not os.path.lexists(ref):
            return
        ref = os.path.abspath(ref)
    if not os.path.isabs(ref) or os.path.normpath(ref) != ref.rstrip("/") or not _under(ref, roots):
        raise refuse


def check_remote_spec(spec, settings: FarmSettings) -> None:
    """Refuse, for a remote caller, any dataset that is not a `store:` reference and any model outside the
    allowed kinds (see check_remote_model). Raises DatasetError or ModelError (422); reads no server path outside
    FARM_MODEL_ROOTS."""
    dataset = getattr(spec, "dataset", None)
    if dataset is not None:
        for field, ref in (("dataset.path", dataset.path), ("dataset.eval_path", dataset.eval_path)):
            if ref is None:
                continue
            if not is_store_ref(ref):
                raise DatasetError(
                    f"{field}: {excerpt(ref)}: over the API a dataset must be uploaded first (POST /v1/datasets, or "
                    "`farm submit` with FARM_API_URL does it for you) and given as the store:datasets/<sha256>.jsonl "
                    "it returns; the server's files are not reachable from the API", field=field)
            check_store_ref(ref, field)
    for field in ("base_model", "finetuned_model"):
        ref = getattr(spec, field, None)
        if ref is not None:
            check_remote_model(ref, field, settings)
