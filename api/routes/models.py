"""Merged models and checkpoints: POST /v1/merges, GET /v1/jobs/{job_id}/checkpoints, and one
checkpoint's adapter folder (file list with sha256, file bytes) for `farm pull JOB@step-K` over the API."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Literal

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask
from pydantic import BaseModel, ConfigDict, Field

from api.deps import CallerDep, SettingsDep
from farm.checkpoints import CheckpointPublic, checkpoint_files, list_checkpoints
from farm.errors import ChecksumMismatch, NotFound, StoreError
from farm.limits import excerpt
from farm.merge.service import submit_merge
from farm.schemas import AdapterFilePublic, JobPublic

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


class CheckpointFilesPublic(BaseModel):
    """The adapter folder of one checkpoint: a standard PEFT adapter, each file with the catalog's sha256."""

    job_id: str
    step: int
    files: list[AdapterFilePublic]
    """Paths relative to the adapter folder; GET .../files/{path} serves each one."""


@router.get("/v1/jobs/{job_id}/checkpoints/{step}")
def checkpoint_adapter(job_id: str, step: int, settings: SettingsDep) -> CheckpointFilesPublic:
    """The files of checkpoint JOB@step-K's adapter folder with their sha256 (what `farm pull JOB@step-K` fetches
    and verifies)."""
    job, k, _prefix, files = checkpoint_files(f"{job_id}@step-{step}", settings=settings)
    return CheckpointFilesPublic(job_id=job, step=k, files=files)


@router.get("/v1/jobs/{job_id}/checkpoints/{step}/files/{path:path}", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}},
                             "description": "The file's bytes; X-Farm-Sha256 carries the catalog's sha256."}})
def checkpoint_file(job_id: str, step: int, path: str, settings: SettingsDep) -> FileResponse:
    """The bytes of one file of a checkpoint's adapter folder, checked against the catalog before they are served."""
    from farm.store import open_store

    job, k, prefix, files = checkpoint_files(f"{job_id}@step-{step}", settings=settings)
    entry = next((f for f in files if f.path == path), None)
    if entry is None:  # only paths the catalog lists reach the store
        raise NotFound(f"checkpoint {job}@step-{k} has no file {excerpt(path)}; its files are: "
                       + ", ".join(f.path for f in files))
    what = f"{entry.path} of checkpoint {job}@step-{k}"
    tmp = Path(tempfile.mkdtemp(prefix="farm-checkpoint-"))
    try:
        try:
            info = open_store(settings.store_url, settings).get_file(prefix + entry.path, tmp / "file")
        except NotFound:
            raise StoreError(f"{what} is listed in the catalog but missing from the store", field=entry.path) from None
        if info.sha256 != entry.sha256:
            raise ChecksumMismatch(f"checksum mismatch for {what}: the catalog records sha256 {entry.sha256}, the "
                                   f"store holds {info.sha256}", field=entry.path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return FileResponse(tmp / "file", filename=Path(entry.path).name, headers={"X-Farm-Sha256": entry.sha256},
                        background=BackgroundTask(shutil.rmtree, tmp, ignore_errors=True))
