"""The spec of a merge job."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from farm.specs import ADAPTER_NAME_PATTERN, ResourcesSpec, _Spec


class MergeSpec(_Spec):
    """Merge a published adapter into its base model and publish the result as a standard transformers model."""

    kind: Literal["merge"] = "merge"
    """Job kind."""
    name: str = Field(pattern=ADAPTER_NAME_PATTERN)
    """Catalog name of the merged model (each success adds a version); `base_model: farm:NAME:V` uses it."""
    adapter: str = Field(min_length=1)
    """The adapter to merge, NAME:VERSION (pinned at submit)."""
    base_model: str = Field(min_length=1)
    """The adapter's base model as its training job gave it (filled in at submit from the catalog)."""
    base_revision: str | None = None
    """The Hub commit the adapter was trained on (filled in at submit), so the merge uses the same weights."""
    base_model_sha256: str | None = None
    """sha256 of the base weights the adapter was trained on (filled in at submit); other weights are refused."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """dtype the base is loaded in and the merged weights are saved in; never 4-bit."""
    max_shard_size: str = Field("5GB", pattern=r"^\d+(\.\d+)?\s*(B|KB|MB|GB|KiB|MiB|GiB)$")
    """Largest safetensors shard of the merged model (save_pretrained's max_shard_size)."""
    license: str | None = Field(None, max_length=64)
    """License for the merged model's card (defaults to the adapter's)."""
    resources: ResourcesSpec = ResourcesSpec()
    """Devices the job needs."""
