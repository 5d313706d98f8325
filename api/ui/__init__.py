"""The farm's web console under /ui: server-rendered pages (Jinja2), live updates by server-sent events, and its
own scripts and styles under /ui/static (no CDN: the farm runs where the internet may not be reachable).

    mount_console(app)    # api/app.py does this
"""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from api.errors import error_response, status_for
from api.ui import adapter_pages, pages
from api.ui.session import LoginRequired, session_caller
from api.ui.views import HERE, templates
from farm.errors import FarmError


def mount_console(app: FastAPI) -> None:
    """Add the console's routes, its static files, and its answers to a missing session and to farm errors."""
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")
    app.include_router(pages.router)
    app.include_router(adapter_pages.router)

    @app.exception_handler(LoginRequired)
    async def _login_required(_request: Request, exc: LoginRequired):
        return RedirectResponse("/ui/login?" + urlencode({"next": exc.next_url}), status_code=303)

    # FarmErrors on console pages become an HTML page with the same status; the API's routes keep their JSON.
    @app.exception_handler(FarmError)
    async def _farm_error(request: Request, exc: FarmError):
        if not request.url.path.startswith("/ui/") or request.url.path.endswith("/stream"):
            return error_response(exc)
        settings = request.app.state.settings
        caller = session_caller(request, settings)
        return templates.TemplateResponse(request, "error.html", {"caller": caller, "csrf": "", "error": exc},
                                          status_code=status_for(exc))
