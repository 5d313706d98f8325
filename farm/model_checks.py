"""Submit-time checks of base models that are not a folder on the producer's machine, without torch.

Each returns the sentences naming what could not be checked here (the worker checks it when it fetches the
model), and raises ModelError on what is certainly wrong.
"""

from __future__ import annotations

from farm.errors import ModelError, StoreError
from farm.settings import FarmSettings


def check_remote_base_model(ref: str, revision: str | None, target_modules, settings: FarmSettings) -> list[str]:
    """A Hub id, an s3:// prefix or a farm:NAME:V merged model, checked as far as this machine can see.

    target_modules None: the model's layers are not checked nor mentioned (a merge needs the model only)."""
    from farm import model_fetch
    from farm.model_files import check_hub_model

    kind = model_fetch.classify(ref)
    if kind == "hub":
        return list(check_hub_model(ref, revision, target_modules).unchecked)
    if revision is not None:
        raise ModelError(f"base_revision: only a Hub id has revisions; {ref[:120]} is not one: remove base_revision",
                         field="base_revision")
    if kind == "s3":
        try:
            model_fetch._s3_listing(ref, settings)
        except StoreError as exc:
            return [f"{ref}: the s3 prefix could not be listed from here ({exc.message[:160]}); the worker lists it"]
        return [] if target_modules is None else [
            f"{ref}: config.json is there; target_modules are checked by the worker after downloading"]
    if kind == "farm":
        model_fetch.farm_model_entry(ref, settings)
        return [] if target_modules is None else [
            f"{ref}: target_modules are checked by the worker after downloading the merged model"]
    raise ModelError(f"base_model: {ref[:120]}: unsupported reference; give a local folder, a Hub id (org/name), "
                     "s3://bucket/prefix or farm:NAME:VERSION", field="base_model")
