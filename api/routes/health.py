"""Liveness and readiness: is the catalog (migrated) and the broker reachable? No auth, no secrets in the answer."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import select

from api.deps import SettingsDep
from farm.catalog.models import Job
from farm.catalog.session import session_scope
from farm.settings import FarmSettings

router = APIRouter(tags=["health"])


def check_catalog(settings: FarmSettings) -> str:
    """'ok', or the kind of failure; reading the jobs table also proves the migrations ran."""
    try:
        with session_scope(settings.database_url) as session:
            session.execute(select(Job.id).limit(1)).all()
        return "ok"
    except Exception as exc:
        # Only the exception's type: its text may quote a URL with a password in it.
        return f"unreachable ({type(exc).__name__})"


def check_broker(settings: FarmSettings) -> str:
    """'ok' when the broker (Redis) answers a PING within 2 s."""
    import redis

    try:
        client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=2, socket_timeout=2)
        try:
            client.ping()
        finally:
            client.close()
        return "ok"
    except Exception as exc:
        return f"unreachable ({type(exc).__name__})"


@router.get("/healthz", responses={503: {"description": "A service behind the API is down."}})
def healthz(settings: SettingsDep) -> JSONResponse:
    """200 when the catalog and the broker answer, else 503; each check says ok or what failed."""
    checks = {"catalog": check_catalog(settings), "broker": check_broker(settings)}
    healthy = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ok" if healthy else "unavailable", "checks": checks},
                        status_code=200 if healthy else 503)
