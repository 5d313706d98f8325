"""The console's sign-in and job pages: /ui/login, /ui/jobs (live table), /ui/jobs/{id} (live chart, events,
checkpoints, cancel). Every route but the sign-in page needs the session cookie (CallerUI)."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from api import sse
from api.deps import SettingsDep, token_owner
from api.ui import session
from api.ui.views import job_row, templates
from farm import console, service
from farm.catalog.models import JOB_STATES, TERMINAL_STATES
from farm.errors import FarmError

router = APIRouter(prefix="/ui", include_in_schema=False)

PAGE_SIZE = 25
EVENT_LOG_ROWS = 300
KINDS = ("train", "extract")


def require_ui_caller(request: Request, settings: SettingsDep) -> str:
    """The signed-in caller; LoginRequired (answered with a redirect to /ui/login) otherwise."""
    caller = session.session_caller(request, settings)
    if caller is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise session.LoginRequired(target)
    return caller


CallerUI = Annotated[str, Depends(require_ui_caller)]


def page(request: Request, template: str, caller: str | None, settings, status_code: int = 200, **context):
    """Render a console page with what every page shows (the caller, the CSRF token for its forms)."""
    csrf = session.csrf_token(settings, caller) if caller else ""
    return templates.TemplateResponse(request, template, {"caller": caller, "csrf": csrf, **context},
                                      status_code=status_code)


def _safe_next(target: str | None) -> str:
    # Only a console path: a crafted ?next= must not send a signed-in user to another site.
    if target and target.startswith("/ui/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/ui/jobs"


# ---------------------------------------------------------------- sign-in


@router.get("", response_class=HTMLResponse)
def ui_root() -> RedirectResponse:
    return RedirectResponse("/ui/jobs", status_code=303)


def _login_page(request: Request, settings, next_url: str | None, error: str | None, status_code: int = 200):
    """The sign-in form with its CSRF token (session.login_csrf), setting the nonce cookie when it is new."""
    token, fresh = session.login_csrf(request, settings)
    response = page(request, "login.html", None, settings, status_code=status_code, next=_safe_next(next_url),
                    error=error, login_csrf=token)
    if fresh is not None:
        session.set_login_cookie(response, request, fresh)
    return response


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, settings: SettingsDep, next: str | None = None):
    return _login_page(request, settings, next, None)


@router.post("/login", response_class=HTMLResponse)
def login(request: Request, settings: SettingsDep, token: Annotated[str, Form()] = "",
          next: Annotated[str | None, Form()] = None, csrf: Annotated[str, Form()] = ""):
    if not session.check_login_csrf(request, settings, csrf):  # a cross-site post, or a form over an hour old
        return _login_page(request, settings, next, "This sign-in form expired or was not sent from this farm's "
                           "page: sign in again with the form below.", status_code=403)
    owner = token_owner(token.strip(), settings.api_tokens) if token.strip() else None
    if owner is None:
        return _login_page(request, settings, next, "That is not one of this farm's API tokens (FARM_API_TOKENS).",
                           status_code=401)
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.delete_cookie(session.LOGIN_COOKIE, path="/ui/login", httponly=True, samesite="strict")
    session.set_session(response, request, settings, owner)
    return response


@router.post("/logout")
def logout(caller: CallerUI) -> RedirectResponse:
    response = RedirectResponse("/ui/login", status_code=303)
    session.clear_session(response)
    return response


# ---------------------------------------------------------------- jobs


def _filters(state: str | None, kind: str | None, name: str | None) -> dict:
    return {"state": state if state in JOB_STATES else None, "kind": kind if kind in KINDS else None,
            "name": (name or "").strip() or None}


def _job_rows(settings, filters: dict, page_no: int) -> tuple[list[dict], bool]:
    jobs = service.list_jobs(**filters, limit=PAGE_SIZE + 1, offset=(page_no - 1) * PAGE_SIZE, settings=settings)
    return [job_row(j) for j in jobs[:PAGE_SIZE]], len(jobs) > PAGE_SIZE


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request, caller: CallerUI, settings: SettingsDep, state: str | None = None,
              kind: str | None = None, name: str | None = None,
              page_no: Annotated[int, Query(alias="page", ge=1)] = 1):
    filters = _filters(state, kind, name)
    rows, more = _job_rows(settings, filters, page_no)
    query = {k: v for k, v in filters.items() if v}
    return page(request, "jobs.html", caller, settings, rows=rows, filters=filters, states=JOB_STATES, kinds=KINDS,
                page_no=page_no, more=more, query=urlencode(query),
                stream_url="/ui/jobs-stream?" + urlencode({**query, "page": page_no}))


@router.get("/jobs-stream")
async def jobs_stream(request: Request, caller: CallerUI, settings: SettingsDep, state: str | None = None,
                      kind: str | None = None, name: str | None = None,
                      page_no: Annotated[int, Query(alias="page", ge=1)] = 1) -> StreamingResponse:
    """The jobs table's rows as server-sent events (`event: rows`, data = the rendered rows), sent on change."""
    filters = _filters(state, kind, name)
    poll = request.app.state.poll_seconds
    row_template = templates.env.get_template("_job_rows.html")

    async def rows_events():
        last = None
        quiet = 0.0
        while not await request.is_disconnected():
            rows, _ = await run_in_threadpool(_job_rows, settings, filters, page_no)
            body = row_template.render(rows=rows)
            if body != last:
                last, quiet = body, 0.0
                yield sse.format_event(json.dumps({"html": body}), event="rows")
            elif quiet >= sse.KEEPALIVE_SECONDS:
                quiet = 0.0
                yield ": keepalive\n\n"
            await asyncio.sleep(poll)
            quiet += poll

    return StreamingResponse(rows_events(), media_type=sse.MEDIA_TYPE,
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: str, caller: CallerUI, settings: SettingsDep, notice: str | None = None):
    job = service.get_job(job_id, settings=settings)
    events = console.all_job_events(job.id, settings=settings)
    return page(request, "job.html", caller, settings, job=job, row=job_row(job),
                series=console.job_series(events), events=list(reversed(events[-EVENT_LOG_ROWS:])),
                last_event_id=events[-1].id if events else 0,
                checkpoints=console.job_checkpoints(job.id, settings=settings),
                can_cancel=job.state not in TERMINAL_STATES, notice=notice,
                spec_yaml=_yaml(job.spec))


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


@router.get("/jobs/{job_id}/stream")
async def job_stream(request: Request, job_id: str, caller: CallerUI, settings: SettingsDep,
                     after: Annotated[int, Query(ge=0)] = 0) -> StreamingResponse:
    """The job's events as server-sent events (the API's stream, behind the console's cookie)."""
    job = await run_in_threadpool(service.get_job, job_id, settings=settings)
    last_id = request.headers.get("last-event-id")
    stream = sse.job_event_stream(job.id, sse.parse_after(after, last_id), settings, request.app.state.poll_seconds,
                                  request.is_disconnected)
    return StreamingResponse(stream, media_type=sse.MEDIA_TYPE,
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/jobs/{job_id}/cancel")
def cancel(request: Request, job_id: str, caller: CallerUI, settings: SettingsDep,
           csrf: Annotated[str, Form()] = ""):
    """Cancel from the job page (the form carries the caller's CSRF token)."""
    if not session.check_csrf(settings, caller, csrf):
        notice = "The form expired: reload the page and cancel again."
    else:
        try:
            job = service.cancel_job(job_id, settings=settings)
            notice = f"Cancel requested: the job is {job.state}."
        except FarmError as exc:
            notice = exc.message
    job = service.get_job(job_id, settings=settings)
    return RedirectResponse(f"/ui/jobs/{job.id}?" + urlencode({"notice": notice}), status_code=303)
