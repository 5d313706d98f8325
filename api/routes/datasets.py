"""Datasets: upload a JSONL file; it is validated line by line and stored content-addressed."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from api.errors import ErrorBody
from api.deps import SettingsDep
from farm import service
from farm.errors import DatasetError
from farm.schemas import DatasetPublic
from farm.specs import DatasetFormat

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

_UPLOAD_DOC = {
    "requestBody": {
        "required": True,
        "description": "The JSONL file itself as the raw body (curl --data-binary @train.jsonl).",
        "content": {
            "application/x-ndjson": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.post("", status_code=201, openapi_extra=_UPLOAD_DOC,
             responses={422: {"model": ErrorBody,
                              "description": "A line does not parse or lacks its format's fields; nothing stored."}})
async def upload_dataset(
    request: Request,
    settings: SettingsDep,
    format: Annotated[DatasetFormat, Query(description="The dataset's format, as in dataset.format.")] = "chat",
    filename: Annotated[str | None, Query(max_length=255,
                                         description="Name used in error messages (the client's path).")] = None,
) -> DatasetPublic:
    """Store a dataset for remote jobs: every line is checked exactly as `farm submit` checks a local file, and
    the file is kept as datasets/<sha256>.jsonl. Use the returned `uri` as dataset.path (or eval_path).
    Uploads over FARM_API_MAX_UPLOAD_BYTES get 413 and leave nothing behind."""
    # Streamed to disk under the scratch folder (FARM_WORK_DIR): a dataset may be larger than memory or /tmp.
    scratch = Path(settings.work_dir).expanduser() / "uploads"
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="farm-upload-", dir=scratch) as tmp:
        path = Path(tmp) / "upload.jsonl"
        with open(path, "wb") as fh:
            async for chunk in request.stream():
                fh.write(chunk)
        try:
            return await run_in_threadpool(service.store_dataset, path, format, settings=settings)
        except DatasetError as exc:
            raise _named(exc, str(path), _printable(filename) or "uploaded dataset") from None


def _printable(name: str | None) -> str | None:
    """The client's file name for messages: control characters (NUL, newlines) dropped."""
    return "".join(ch for ch in name if ch.isprintable()) if name else name


def _named(exc: DatasetError, temp_path: str, name: str) -> DatasetError:
    """The same error, naming the client's file instead of the server's temp file."""
    return DatasetError(exc.message.replace(temp_path, name), field=exc.field)
