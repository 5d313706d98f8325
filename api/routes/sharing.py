"""Routing and sharing (issue 15): which adapter fits a query, and an adapter version as a bundle for another farm."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from api.deps import SettingsDep
from farm.bundles import export_adapter
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
