"""Adapters: list, provenance with file checksums and download URLs, and file downloads for any store."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from api.deps import SettingsDep
from farm import service
from farm.errors import ChecksumMismatch, NotFound, StoreError
from farm.limits import excerpt
from farm.names import adapter_file_key
from farm.schemas import AdapterPublic
from farm.store import open_store

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])

ExpiresQuery = Annotated[int, Query(ge=1, le=7 * 24 * 3600,
                                    description="Lifetime of the download URLs (S3 stores), in seconds.")]


@router.get("")
def list_adapters(settings: SettingsDep, name: str | None = None) -> list[AdapterPublic]:
    """Published adapter versions, newest version first per name (`?name=` lists one adapter's versions)."""
    return service.list_adapters(name, settings=settings)


@router.get("/{name}")
def get_latest_adapter(name: str, settings: SettingsDep, url_expires_s: ExpiresQuery = 3600) -> AdapterPublic:
    """The latest version of an adapter: provenance, files with sha256, and download URLs on S3 stores."""
    return service.get_adapter(name, settings=settings, with_urls=True, url_expires_s=url_expires_s)


@router.get("/{name}/{version}")
def get_adapter_version(name: str, version: str, settings: SettingsDep,
                        url_expires_s: ExpiresQuery = 3600) -> AdapterPublic:
    """One adapter version (`3` or `v3`): provenance, files with sha256, and time-limited download URLs on S3
    stores (`files[].url`; null on file:// stores, where GET .../files/{path} serves the bytes)."""
    return service.get_adapter(f"{name}:{version}", settings=settings, with_urls=True, url_expires_s=url_expires_s)


@router.get("/{name}/{version}/files/{path:path}", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}},
                             "description": "The file's bytes; X-Farm-Sha256 carries the catalog's sha256."}})
def download_adapter_file(name: str, version: str, path: str, settings: SettingsDep) -> FileResponse:
    """The bytes of one file of a published adapter version, from whatever store the farm uses."""
    view = service.get_adapter(f"{name}:{version}", settings=settings)
    entry = next((f for f in view.files if f.path == path), None)
    if entry is None:
        names = ", ".join(f.path for f in view.files)
        raise NotFound(f"adapter {view.name}:{view.version} has no file {excerpt(path)}; its files are: {names}")
    # Only paths the catalog lists reach the store: a crafted path cannot name another object.
    key = adapter_file_key(view.name, view.version, entry.path)
    headers = {"X-Farm-Sha256": entry.sha256}
    store = open_store(settings.store_url, settings)
    filename = Path(entry.path).name
    # Every store, file:// too: copy to a temp file, checked against the catalog before a byte is served.
    tmp = Path(tempfile.mkdtemp(prefix="farm-download-"))
    what = f"{entry.path} of adapter {view.name}:{view.version}"
    try:
        try:
            info = store.get_file(key, tmp / "file")
        except NotFound:
            raise StoreError(f"{what} is listed in the catalog but missing from the store: the stored artifact is "
                             "damaged; re-publish it (retrain, or restore the store from a backup)",
                             field=entry.path) from None
        if info.sha256 != entry.sha256:
            raise ChecksumMismatch(
                f"checksum mismatch for {what}: the catalog records sha256 {entry.sha256}, the store holds "
                f"{info.sha256}; the stored artifact is corrupt", field=entry.path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return FileResponse(tmp / "file", filename=filename, headers=headers,
                        background=BackgroundTask(shutil.rmtree, tmp, ignore_errors=True))
