"""Routing and sharing: which adapter fits a query, and an adapter version as a bundle for another farm."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from api.deps import CallerDep, SettingsDep
from farm.bundles import ImportResult, export_adapter, import_bundle
from farm.errors import BundleError
from farm.profiles import RouteAnswer, route

router = APIRouter(tags=["routing and sharing"])


@router.get("/v1/route")
def route_query(settings: SettingsDep,
                q: Annotated[str, Query(max_length=2000, description="The request to route.")],
                base: Annotated[str | None, Query(description="Only adapters of this base model.")] = None,
                top: Annotated[int, Query(ge=1, le=50, description="How many candidates to return.")] = 3,
                threshold: Annotated[float | None, Query(ge=0, le=1, description=(
                    "Confidence below which nothing fits (default: FARM_ROUTER_THRESHOLD, else the ranker's)."))]
                = None,
                ) -> RouteAnswer:
    """Rank the adapters for a query: the best one (`choice`), or none when no adapter reaches the threshold
    (then answer with the base model alone), with scores and the words that matched."""
    return route(q, base=base, top=top, threshold=threshold, settings=settings)


@router.get("/v1/adapters/{name}/{version}/bundle", response_class=FileResponse,
            responses={200: {"content": {"application/x-tar": {}},
                             "description": "The adapter version as a bundle (`farm import FILE.tar`)."}})
def adapter_bundle(name: str, version: str, settings: SettingsDep) -> FileResponse:
    """An adapter version as a bundle: its files (verified against the catalog first), checksums.json, the
    catalog's provenance and lineage, and a manifest with every sha256. What `farm import REMOTE/NAME` fetches."""
    tmp = Path(tempfile.mkdtemp(prefix="farm-bundle-"))
    try:
        result = export_adapter(f"{name}:{version}", tmp / "bundle.tar", settings=settings)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    filename = result.adapter.replace(":", "-v") + ".tar"
    return FileResponse(tmp / "bundle.tar", media_type="application/x-tar", filename=filename,
                        headers={"X-Farm-Bundle-Sha256": result.sha256},
                        background=BackgroundTask(shutil.rmtree, tmp, ignore_errors=True))


@router.post("/v1/bundles", status_code=201,
             openapi_extra={"requestBody": {"required": True, "content": {"application/x-tar": {}}}})
async def upload_bundle(request: Request, caller: CallerDep, settings: SettingsDep,
                        as_name: Annotated[str | None, Query(max_length=64, description=(
                            "Record it under this adapter name (default: the bundle's own)."))] = None,
                        ) -> ImportResult:
    """Import a bundle (the body, a tar as `farm export` writes it): every byte is verified against its manifest
    before anything is written; a name clash makes a new version. A body over FARM_API_MAX_UPLOAD_BYTES or
    FARM_BUNDLE_MAX_BYTES is refused (413 / bundle_invalid), a tampered bundle leaves nothing."""
    from starlette.concurrency import run_in_threadpool

    from api.errors import PayloadTooLarge

    tmp = Path(tempfile.mkdtemp(prefix="farm-upload-bundle-"))
    try:
        size = 0
        with open(tmp / "bundle.tar", "wb") as fh:
            async for chunk in request.stream():
                size += len(chunk)
                if size > settings.bundle_max_bytes:
                    raise PayloadTooLarge(f"the bundle is larger than this farm's limit of {settings.bundle_max_bytes}"
                                          " bytes (FARM_BUNDLE_MAX_BYTES)")
                fh.write(chunk)
        if size == 0:
            raise BundleError("the request carried no bundle: send the tar file as the body", field="file")
        return await run_in_threadpool(import_bundle, tmp / "bundle.tar", as_name=as_name, settings=settings,
                                       source=f"upload by {caller}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
