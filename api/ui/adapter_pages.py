"""The console's adapter and worker pages: /ui/adapters, /ui/adapters/{name}, /ui/adapters/{name}/{version} (model
card, provenance, files with download links, lineage picture), /ui/workers (workers alive, queue depths)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse
from starlette.concurrency import run_in_threadpool

from api.deps import SettingsDep
from api.routes.adapters import download_adapter_file
from api.ui.pages import CallerUI, page
from api.ui.views import lineage_svg
from farm import console, service
from farm.errors import FarmError
from farm.names import adapter_file_key
from farm.stats import collect_stats

router = APIRouter(prefix="/ui", include_in_schema=False)

MODEL_CARD = "README.md"
MAX_CARD_BYTES = 512 * 1024
FLOWER_PORT = 5555


@router.get("/adapters", response_class=HTMLResponse)
def adapters_page(request: Request, caller: CallerUI, settings: SettingsDep, name: str | None = None):
    adapters = service.list_adapters((name or "").strip() or None, settings=settings)
    return page(request, "adapters.html", caller, settings, adapters=adapters, name=name or "", single=None)


@router.get("/adapters/{name}", response_class=HTMLResponse)
def adapter_versions_page(request: Request, name: str, caller: CallerUI, settings: SettingsDep):
    adapters = service.list_adapters(name, settings=settings)
    if not adapters:
        service.get_adapter(name, settings=settings)  # raises the NotFound the 404 page shows
    return page(request, "adapters.html", caller, settings, adapters=adapters, name=name, single=name)


def _model_card_html(settings, name: str, version: int) -> str | None:
    """The adapter's README.md rendered to HTML (raw HTML in it is escaped, not passed through)."""
    from markdown_it import MarkdownIt

    from farm.store import open_store

    store = open_store(settings.store_url, settings)
    key = adapter_file_key(name, version, MODEL_CARD)
    try:
        data = store.get_bytes(key)
    except FarmError:
        return None
    text = data[:MAX_CARD_BYTES].decode("utf-8", errors="replace")
    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


@router.get("/adapters/{name}/{version}", response_class=HTMLResponse)
def adapter_page(request: Request, name: str, version: str, caller: CallerUI, settings: SettingsDep):
    adapter = service.get_adapter(f"{name}:{version}", settings=settings)
    lineage = console.adapter_lineage(adapter.name, adapter.version, settings=settings)
    prov = adapter.provenance or {}
    has_card = any(f.path == MODEL_CARD for f in adapter.files)
    return page(request, "adapter.html", caller, settings, a=adapter, prov=prov,
                environment={k: v for k, v in sorted((prov.get("environment") or {}).items())
                             if not isinstance(v, (dict, list))},
                timings=prov.get("timings") or {}, dataset=prov.get("dataset") or {},
                metrics={k: v for k, v in sorted((adapter.metrics or {}).items()) if not isinstance(v, (dict, list))},
                card=_model_card_html(settings, adapter.name, adapter.version) if has_card else None,
                lineage=lineage, lineage_svg=lineage_svg(lineage))


@router.get("/adapters/{name}/{version}/files/{path:path}", response_class=FileResponse)
def download(name: str, version: str, path: str, caller: CallerUI, settings: SettingsDep) -> FileResponse:
    """A file of an adapter version, from any store, checked against the catalog (the API's download route)."""
    return download_adapter_file(name, version, path, settings)


@router.get("/workers", response_class=HTMLResponse)
async def workers_page(request: Request, caller: CallerUI, settings: SettingsDep):
    workers = await run_in_threadpool(console.workers_alive, settings=settings)
    stats = await run_in_threadpool(collect_stats, settings)
    flower = f"{request.url.scheme}://{request.url.hostname}:{FLOWER_PORT}/"
    return page(request, "workers.html", caller, settings, workers=workers, stats=stats, flower_url=flower)
