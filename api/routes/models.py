"""Merged models and checkpoints (issue 13): POST /v1/merges, GET /v1/jobs/{job_id}/checkpoints."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from api.deps import CallerDep, SettingsDep
from farm.checkpoints import CheckpointPublic, list_checkpoints
from farm.merge.service import submit_merge
from farm.schemas import JobPublic

router = APIRouter(tags=["models"])


class MergeRequest(BaseModel):
    """A merge of a published adapter into its base model."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    adapter: str = Field(min_length=1, max_length=200)
    """NAME or NAME:VERSION of the adapter to merge (the latest version when none is given)."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """dtype the base is loaded in and the merged model saved in (never 4-bit)."""
    name: str | None = Field(None, max_length=64)
    """Catalog name of the merged model; NAME-merged by default."""
    max_shard_size: str = Field("5GB", max_length=16)
    """Largest safetensors shard."""


@router.post("/v1/merges", status_code=201)
def create_merge(body: MergeRequest, caller: CallerDep, settings: SettingsDep) -> JobPublic:
    """Queue a `merge` job: its output is a standard transformers model in the catalog (kind merge), usable as
    `base_model: farm:NAME:V`. A missing adapter or an adapter whose base is gone is refused; nothing is queued."""
    return submit_merge(body.adapter, dtype=body.dtype, name=body.name, max_shard_size=body.max_shard_size,
                        submitted_by=caller, settings=settings)


@router.get("/v1/jobs/{job_id}/checkpoints")
def job_checkpoints(job_id: str, settings: SettingsDep) -> list[CheckpointPublic]:
    """A job's checkpoints still in the store: step, train and eval loss, size (pull one with `farm pull
    JOB@step-K`)."""
    return list_checkpoints(job_id, settings=settings)
