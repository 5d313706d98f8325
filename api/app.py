"""The FastAPI application: routers, auth on every route but /healthz, FarmError -> JSON errors.

    uvicorn --factory api.app:create_app       # or: farm api --host 0.0.0.0 --port 8000
"""

from __future__ import annotations

from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi

from api.deps import require_caller
from api.errors import ERROR_RESPONSES, install_error_handlers
from api.routes import adapters, automation, datasets, health, jobs, metrics, sharing
from api.routes import models as models_routes  # merges, checkpoints
from api.docs_offline import install_offline_docs
from api.routes import console as console_routes  # workers, logs
from api.ui import mount_console
from farm import __version__ as farm_version
from farm.errors import FarmError
from farm.settings import FarmSettings, get_settings


def create_app(settings: FarmSettings | None = None, *, poll_seconds: float = 1.0) -> FastAPI:
    """Build the API for these settings (default: the process's FARM_* settings).

    `poll_seconds` is how often a streamed event feed re-reads the catalog.
    """
    app = FastAPI(
        title="LoRA farm API",
        version=farm_version,
        description="Submit (Q)LoRA training and extraction jobs, follow them, and fetch their adapters. "
                    "Every route but /healthz needs `Authorization: Bearer <token>`.",
        docs_url=None, redoc_url=None,  # served offline by install_offline_docs
    )
    app.state.settings = settings or get_settings()
    app.state.poll_seconds = poll_seconds
    install_error_handlers(app)

    authed = [Depends(require_caller)]
    app.include_router(health.router)
    for module in (automation, jobs, adapters, datasets, metrics, sharing, models_routes):  # automation first: its /v1/adapters/{name}/x
        # paths would otherwise be taken by adapters' /{name}/{version}
        app.include_router(module.router, dependencies=authed, responses=ERROR_RESPONSES)
    app.include_router(console_routes.router, dependencies=authed, responses=ERROR_RESPONSES)
    install_offline_docs(app)  # /docs and /redoc with the farm's own assets
    mount_console(app)  # the web console under /ui (cookie sessions)
    app.openapi = lambda: _openapi(app)
    return app


def _openapi(app: FastAPI) -> dict:
    """The generated OpenAPI document, plus the spec models that document POST /v1/jobs's body."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        doc.setdefault("components", {}).setdefault("schemas", {}).update(jobs.SPEC_SCHEMA_DEFS)
        app.openapi_schema = doc
    return app.openapi_schema


def serve(host: str, port: int) -> None:
    """Run the API with uvicorn until stopped (what `farm api` calls).

    Refuses to start without FARM_API_TOKENS: every route but /healthz would answer 401.
    """
    import uvicorn

    settings = get_settings()
    if not settings.api_tokens:
        raise FarmError('FARM_API_TOKENS is empty: set it to a JSON object of token names and tokens, like '
                        '{"alice": "<a long random string>"}; every request must carry one of them',
                        field="api_tokens")
    uvicorn.run(create_app(settings), host=host, port=port, proxy_headers=True, log_level="info")
