"""What the CLI needs beside the jobs and adapters routes: the workers alive (for `farm submit --wait`'s hint when
no worker serves a job's queue) and a job's runner logs (`farm logs`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from api.deps import SettingsDep
from farm import console, job_logs

router = APIRouter(tags=["workers"])


class WorkerPublic(BaseModel):
    node: str
    """Celery node name: <slot>@<host>."""
    devices: str
    queues: list[str]
    """Queues it consumes."""
    jobs: list[str]
    """Ids of the jobs it runs now."""


@router.get("/v1/workers")
def list_workers(settings: SettingsDep) -> list[WorkerPublic]:
    """Workers answering on the broker now, with their queues and current jobs."""
    return [WorkerPublic(node=w.node, devices=w.devices, queues=w.queues, jobs=[j[0] for j in w.jobs])
            for w in console.workers_alive(settings=settings)]


@router.get("/v1/jobs/{job_id}/logs", response_class=PlainTextResponse,
            responses={200: {"content": {"text/plain": {}}, "description": "The runner's log of that attempt; "
                                                                              "X-Farm-Attempt names the attempt."}})
def job_log(job_id: str, settings: SettingsDep,
            attempt: Annotated[int | None, Query(ge=1, description="Attempt number (default: the latest)")] = None,
            ) -> PlainTextResponse:
    """The runner's whole log for one attempt of a job (the latest by default), as the store keeps it."""
    _, number, text = job_logs.read_job_log(job_id, attempt, settings=settings)
    return PlainTextResponse(text, headers={"X-Farm-Attempt": str(number)})
