"""Automation: feedback and retraining, lineage, replay, schedules, webhook deliveries."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from api.deps import CallerDep, SettingsDep
from farm.automation import feedback as fb
from farm.automation import replay as rp
from farm.automation import retrain as rt
from farm.automation import schedules as sc
from farm.automation import webhooks as wh
from farm.schemas import JobPublic
from farm.specs import parse_spec

router = APIRouter(tags=["automation"])
MAX_FEEDBACK_BYTES = 16 * 1024 * 1024


class RetrainPolicyIn(BaseModel):
    """A retraining policy (as `farm retrain NAME --every N`)."""

    every: int = Field(ge=1)
    """Retrain each time this many new rows arrived."""
    replay: float = Field(0.5, ge=0, le=10)
    """Earlier rows added per new row (rehearsal)."""
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps of each retraining (null: the adapter's own)."""


class ScheduleIn(BaseModel):
    """A schedule: a spec and exactly one of cron or every."""

    spec: dict[str, Any]
    """The job spec (its dataset a `store:` reference: upload it with POST /v1/datasets)."""
    cron: str | None = None
    """Cron expression in UTC, e.g. `0 3 * * *`."""
    every: str | None = None
    """Interval such as 30s, 10m, 6h, 2d."""
    name: str | None = None
    """Schedule name (default: the spec's name)."""


def _version_ref(name: str, version: int | None) -> str:
    return f"{name}:{version}" if version is not None else name


@router.post("/v1/adapters/{name}/feedback", status_code=201)
async def post_feedback(name: str, request: Request, settings: SettingsDep) -> dict:
    """Add JSONL rows (the body, one JSON object a line, in the adapter's dataset format) to the adapter's pool.

    Errors name the line as `feedback:<line>`; a row sent twice counts once; a retraining starts when the pool
    reaches the policy's threshold (`retrain_job`).
    """
    from starlette.concurrency import run_in_threadpool

    body = await request.body()
    if len(body) > MAX_FEEDBACK_BYTES:
        from farm.errors import DatasetError

        raise DatasetError(f"feedback: the body is over {MAX_FEEDBACK_BYTES // 2**20} MiB; send it in parts",
                           field="feedback")
    result = await run_in_threadpool(fb.add_feedback_bytes, name, body, settings=settings)
    return result.to_dict()


@router.get("/v1/adapters/{name}/retrain")
def get_retrain(name: str, settings: SettingsDep) -> dict:
    """The adapter's pool (new and used rows), retraining policy and retrainings."""
    return rt.pool_status(name, settings=settings)


@router.put("/v1/adapters/{name}/retrain")
def put_retrain(name: str, policy: RetrainPolicyIn, settings: SettingsDep) -> dict:
    """Set the adapter's retraining policy (overrides its spec's retrain: section); checks the pool at once."""
    return rt.set_policy(name, policy.every, policy.replay, policy.max_steps, settings=settings)


@router.delete("/v1/adapters/{name}/retrain")
def delete_retrain(name: str, settings: SettingsDep) -> dict:
    """Remove the policy set with PUT (a spec's retrain: section applies again)."""
    rt.remove_policy(name, settings=settings)
    return {"adapter": name, "policy": None}


@router.get("/v1/adapters/{name}/lineage")
def get_lineage(name: str, settings: SettingsDep, version: int | None = None) -> dict:
    """Where a version came from: parent, the feedback rows (hashes) it learned from, replay_of."""
    return rt.adapter_lineage(_version_ref(name, version), settings=settings)


@router.post("/v1/adapters/{name}/replay", status_code=201)
def post_replay(name: str, caller: CallerDep, settings: SettingsDep, version: int | None = None) -> JobPublic:
    """Rerun the job behind a version (dataset pinned by digest, base checked by hash; never deduplicated)."""
    return rp.replay_adapter(_version_ref(name, version), submitted_by=caller, settings=settings)


@router.get("/v1/adapters/{name}/compare")
def compare_adapters(name: str, other: str, settings: SettingsDep, version: int | None = None) -> dict:
    """Whether NAME[:version] and `other` (NAME:VERSION) have identical weights, else the largest difference."""
    return rp.verify_replay(_version_ref(name, version), other, settings=settings)


@router.get("/v1/jobs/{job_id}/deliveries")
def get_deliveries(job_id: str, settings: SettingsDep) -> list[dict]:
    """The job's webhook deliveries, each with every attempt (status code or error, duration)."""
    return wh.list_deliveries(job_id, settings=settings)


@router.post("/v1/schedules", status_code=201)
def post_schedule(body: ScheduleIn, caller: CallerDep, settings: SettingsDep) -> dict:
    """Submit a spec on a schedule (fired by `farm beat`; each firing validated and submitted as POST /v1/jobs)."""
    spec = parse_spec(body.spec)
    return sc.add_schedule(spec.model_dump(mode="json"), cron=body.cron, every=body.every, name=body.name,
                           created_by=caller, settings=settings)


@router.get("/v1/schedules")
def get_schedules(settings: SettingsDep) -> list[dict]:
    """Every schedule with its next slot and last firing."""
    return sc.list_schedules(settings=settings)


@router.post("/v1/schedules/{name}/pause")
def pause_schedule(name: str, settings: SettingsDep) -> dict:
    """Stop firing a schedule."""
    return sc.set_paused(name, True, settings=settings)


@router.post("/v1/schedules/{name}/resume")
def resume_schedule(name: str, settings: SettingsDep) -> dict:
    """Fire a paused schedule again from its next slot."""
    return sc.set_paused(name, False, settings=settings)


@router.delete("/v1/schedules/{name}")
def delete_schedule(name: str, settings: SettingsDep) -> dict:
    """Delete a schedule (its jobs stay)."""
    sc.remove_schedule(name, settings=settings)
    return {"deleted": name}

