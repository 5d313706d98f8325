"""Jobs: submit, list, get, events (paged and streamed), cancel."""

from __future__ import annotations

from typing import Annotated, Literal

import yaml
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import TypeAdapter
from starlette.concurrency import run_in_threadpool

from api import sse
from api.errors import ErrorBody
from api.deps import CallerDep, SettingsDep
from farm import service
from farm.errors import SpecError
from farm.kinds import catalog_kind_names
from farm.limits import InputTooComplex, bound_message, load_json, load_yaml
from farm.schemas import JobEventPublic, JobPublic
from farm.specs import JobSpec, parse_spec

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

JobState = Literal["queued", "running", "recovering", "cancelling", "succeeded", "failed", "cancelled"]
JobKind = Literal[catalog_kind_names()]  # the farm/kinds.py registry, and import (a bundle import's job row)


def job_spec_schema() -> tuple[dict, dict]:
    """The JSON schema of a job spec (TrainSpec | ExtractSpec), and the definitions it refers to.

    The route reads the body itself (so that a bad spec gets the CLI's message); this schema documents it.
    """
    schema = TypeAdapter(JobSpec).json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    return schema, defs


_SPEC_SCHEMA, SPEC_SCHEMA_DEFS = job_spec_schema()
_SPEC_BODY_DOC = {
    "requestBody": {
        "required": True,
        "description": "A job spec, as JSON (or YAML with Content-Type application/yaml). The server's files are "
                       "not reachable: upload a dataset with POST /v1/datasets first and give the returned "
                       "`store:datasets/<sha256>.jsonl` as dataset.path; a local base_model must lie under the "
                       "server's FARM_MODEL_ROOTS. Bodies over FARM_API_MAX_BODY_BYTES get 413.",
        "content": {
            "application/json": {"schema": _SPEC_SCHEMA},
            "application/yaml": {"schema": _SPEC_SCHEMA},
        },
    }
}


async def read_spec_body(request: Request) -> object:
    """The request body as data: JSON, or YAML when the Content-Type says so.

    Bounded: the body size (413 above FARM_API_MAX_BODY_BYTES, see api/limits.py), YAML aliases and
    expansion, nesting depth, number size and NUL characters; each refusal is a 422 quoting at most an excerpt.
    """
    raw = await request.body()
    content_type = request.headers.get("content-type", "")
    kind = "YAML" if "yaml" in content_type else "JSON"
    try:
        return await run_in_threadpool(load_yaml if kind == "YAML" else load_json, raw)
    except InputTooComplex as exc:
        raise SpecError(f"spec: {exc}") from None
    except (ValueError, yaml.YAMLError) as exc:
        raise SpecError(f"spec: the request body is not valid {kind} ({bound_message(str(exc), 300)}); send the "
                        f"spec as a {kind} object") from None


@router.post("", status_code=201, openapi_extra=_SPEC_BODY_DOC,
             responses={422: {"model": ErrorBody, "description": "The spec, its dataset or its model is invalid: "
                                             "{code, message, field}, the message the CLI prints."}})
def submit_job(spec: Annotated[object, Depends(read_spec_body)], caller: CallerDep,
               settings: SettingsDep, force: bool = False) -> JobPublic:
    """Validate a spec exactly as `farm submit` does, record the job (submitted_by = the token's name), enqueue it.

    A job identical in content to one that succeeded or is in flight comes back instead, with `deduplicated: true`
    and nothing queued, unless `?force=true`.
    """
    # parse_spec first: a bare string body must never be taken for a spec file path on the server; and the caller
    # is remote: its datasets must be uploads or store: refs, its local models under FARM_MODEL_ROOTS.
    return service.submit_job(parse_spec(spec), submitted_by=caller, settings=settings, force=force, remote=True)


@router.get("")
def list_jobs(
    settings: SettingsDep,
    state: JobState | None = None,
    kind: JobKind | None = None,
    name: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[JobPublic]:
    """Jobs, newest first, filtered by state, kind and adapter name."""
    return service.list_jobs(state=state, kind=kind, name=name, limit=limit, offset=offset, settings=settings)


@router.get("/{job_id}")
def get_job(job_id: str, settings: SettingsDep) -> JobPublic:
    """A job's state, progress, error and published adapter (a unique id prefix works)."""
    return service.get_job(job_id, settings=settings)


@router.get("/{job_id}/events")
def job_events(
    job_id: str,
    settings: SettingsDep,
    after: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
) -> list[JobEventPublic]:
    """The job's events after event id `after`, oldest first (pass the last id seen to get only new ones)."""
    return service.job_events(job_id, after=after, limit=limit, settings=settings)


@router.get("/{job_id}/events/stream", response_class=StreamingResponse,
            responses={200: {"content": {sse.MEDIA_TYPE: {}},
                             "description": "Server-sent events: one per job event (id, event = type, data = "
                                            "JobEventPublic JSON), then `event: end` with the final JobPublic."}})
async def stream_job_events(
    job_id: str,
    request: Request,
    settings: SettingsDep,
    after: Annotated[int, Query(ge=0)] = 0,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """Follow a job: its events as they happen, as server-sent events; the stream ends when the job does."""
    # Resolve the id up front: an unknown job is a 404, not an empty stream.
    job = await run_in_threadpool(service.get_job, job_id, settings=settings)
    poll = request.app.state.poll_seconds
    stream = sse.job_event_stream(job.id, sse.parse_after(after, last_event_id), settings, poll,
                                  request.is_disconnected)
    return StreamingResponse(stream, media_type=sse.MEDIA_TYPE,
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/{job_id}/cancel")
def cancel_job(job_id: str, settings: SettingsDep) -> JobPublic:
    """Cancel a job: a waiting one ends at once, a running one is stopped by its worker. 409 when already over."""
    return service.cancel_job(job_id, settings=settings)
