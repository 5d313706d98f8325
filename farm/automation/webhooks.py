"""Webhooks: a job's end, POSTed to its spec's `notify.url` and to every FARM_WEBHOOK_URLS, through an outbox.

Nothing on a job's path waits for a receiver. A sender (a thread of the reaper process that `farm worker` runs
beside its workers, workers/reaper.py, and `farm beat`'s tick)
calls `deliver_due`: it adds an outbox row (`webhook_deliveries`, unique per job, URL and event) for each job that
ended since the sender last looked, claims due rows by compare-and-set on their attempt count (several senders
never POST one attempt twice), POSTs, and records every attempt (`webhook_attempts`). A failure is retried with
exponential backoff (FARM_WEBHOOK_BACKOFF_SECONDS, doubling, capped at an hour) up to FARM_WEBHOOK_MAX_ATTEMPTS.

The request: body = the job's public view (JSON, as GET /v1/jobs/{id} returns it); headers
`X-Farm-Event` (succeeded | failed | cancelled), `Idempotency-Key` (the delivery id, the same on every retry), and
`X-Farm-Signature: sha256=<hex HMAC-SHA256 of the body with FARM_WEBHOOK_SECRET>` when a secret is set.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
import uuid
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from farm.catalog.models import TERMINAL_STATES, Job, WebhookAttempt, WebhookDelivery, utcnow
from farm.catalog.session import session_scope
from farm.settings import FarmSettings, get_settings

log = logging.getLogger("farm.webhooks")
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
LOOKBACK = timedelta(days=1)  # jobs that ended longer ago than this are not announced any more
RESCAN = timedelta(minutes=5)
TIMEOUT_S = 10.0
MAX_BACKOFF_S = 3600.0


def sign(body: bytes, secret: str) -> str:
    """The X-Farm-Signature value: `sha256=` + hex HMAC-SHA256 of the exact body bytes."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(body: bytes, signature: str, secret: str) -> bool:
    """What a receiver does: recompute the signature and compare in constant time."""
    return hmac.compare_digest(sign(body, secret), signature or "")


def _targets(job: Job, settings: FarmSettings) -> list[str]:
    urls = []
    notify = (job.spec or {}).get("notify")
    if notify and job.state in notify.get("events", ()):
        urls.append(notify["url"])
    urls += [u for u in settings.webhook_urls if u not in urls]
    return urls


_scanned_until: dict[str, object] = {}  # per catalog: this process has looked at jobs that ended before this


def enqueue_ended_jobs(*, settings: FarmSettings | None = None) -> int:
    """Add outbox rows for jobs that ended (within LOOKBACK) and have none yet; returns how many were added.

    A process re-reads only the last RESCAN of what it already looked at (a transaction committing late still
    gets its job announced), so a quiet farm's tick reads a handful of rows."""
    settings = settings or get_settings()
    added, now = 0, utcnow()
    since = max(now - LOOKBACK, _scanned_until.get(settings.database_url, now - LOOKBACK) - RESCAN)
    with session_scope(settings.database_url) as session:
        have = select(WebhookDelivery.job_id)
        jobs = session.scalars(select(Job).where(Job.state.in_(TERMINAL_STATES),
                                                 Job.finished_at >= since, Job.id.not_in(have))).all()
        todo = [(j.id, url, j.state) for j in jobs for url in _targets(j, settings)]
    _scanned_until[settings.database_url] = now
    for job_id, url, event in todo:
        try:
            with session_scope(settings.database_url) as session:
                session.add(WebhookDelivery(id=uuid.uuid4().hex, job_id=job_id, url=url, event=event))
            added += 1
        except IntegrityError:
            pass  # another sender added it
    return added


def _claim(settings: FarmSettings, delivery_id: str, attempts: int) -> datetime | None:
    """Take one attempt of a delivery (compare-and-set on its attempt count): the attempt's time, or None when
    another sender has it. The next attempt is due `backoff` after this time, so attempts are spaced by it."""
    with session_scope(settings.database_url) as session:
        backoff = min(MAX_BACKOFF_S, settings.webhook_backoff_seconds * (2 ** attempts))
        now = utcnow()
        result = session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.attempts == attempts,
                   WebhookDelivery.state == PENDING)
            # until this attempt is recorded, the row is not due again (a sender that dies mid-POST retries later)
            .values(attempts=attempts + 1, next_attempt_at=now + timedelta(seconds=backoff))
            .execution_options(synchronize_session=False))
        return now if result.rowcount == 1 else None


def _post(url: str, body: bytes, headers: dict) -> tuple[int | None, str | None]:
    import httpx

    try:
        response = httpx.post(url, content=body, headers=headers, timeout=TIMEOUT_S)
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}"[:1000]
    if 200 <= response.status_code < 300:
        return response.status_code, None
    return response.status_code, f"HTTP {response.status_code}: {response.text[:300]}"


def send_one(delivery_id: str, *, settings: FarmSettings | None = None) -> str | None:
    """One attempt of one due delivery (if this sender wins its claim); returns its new state."""
    from farm import service

    settings = settings or get_settings()
    with session_scope(settings.database_url) as session:
        d = session.get(WebhookDelivery, delivery_id)
        if d is None or d.state != PENDING:
            return None
        attempts, url, event, job_id = d.attempts, d.url, d.event, d.job_id
    sent_at = _claim(settings, delivery_id, attempts)
    if sent_at is None:
        return None
    body = service.get_job(job_id, settings=settings).model_dump_json().encode()
    headers = {"Content-Type": "application/json", "X-Farm-Event": event, "Idempotency-Key": delivery_id,
               "X-Farm-Delivery-Attempt": str(attempts + 1), "User-Agent": "lora-farm-webhooks"}
    if settings.webhook_secret is not None:
        headers["X-Farm-Signature"] = sign(body, settings.webhook_secret.get_secret_value())
    started = time.monotonic()
    status, error = _post(url, body, headers)
    with session_scope(settings.database_url) as session:
        session.add(WebhookAttempt(delivery_id=delivery_id, attempt=attempts + 1, at=sent_at, status_code=status,
                                   error=error, duration_ms=int((time.monotonic() - started) * 1000)))
        d = session.get(WebhookDelivery, delivery_id)
        if error is None:
            d.state, d.delivered_at = DELIVERED, utcnow()
        elif attempts + 1 >= settings.webhook_max_attempts:
            d.state = FAILED
        return d.state


def deliver_due(*, settings: FarmSettings | None = None, limit: int = 50) -> int:
    """Enqueue ended jobs, then make one attempt of each due delivery; returns the attempts made."""
    settings = settings or get_settings()
    enqueue_ended_jobs(settings=settings)
    with session_scope(settings.database_url) as session:
        due = session.scalars(select(WebhookDelivery.id).where(WebhookDelivery.state == PENDING,
                                                               WebhookDelivery.next_attempt_at <= utcnow())
                              .order_by(WebhookDelivery.next_attempt_at).limit(limit)).all()
    return sum(1 for i in due if send_one(i, settings=settings) is not None)


def sender_loop(stop, *, settings: FarmSettings | None = None, interval: float = 1.0) -> None:
    """Run deliver_due every `interval` seconds until the `stop` event is set (a worker's sender thread)."""
    settings = settings or get_settings()
    while not stop.wait(interval):
        try:
            deliver_due(settings=settings)
        except Exception as exc:  # the catalog blinked; keep going
            log.warning("webhooks: %s", exc)


def list_deliveries(job_id: str, *, settings: FarmSettings | None = None) -> list[dict]:
    """Every delivery of a job's notifications and each of its attempts."""
    from farm.catalog import repository as repo

    settings = settings or get_settings()
    with session_scope(settings.database_url) as session:
        job = repo.get_job(session, job_id)
        out = []
        for d in session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job.id)
                                 .order_by(WebhookDelivery.created_at)):
            attempts = session.scalars(select(WebhookAttempt).where(WebhookAttempt.delivery_id == d.id)
                                       .order_by(WebhookAttempt.attempt)).all()
            out.append({"id": d.id, "job_id": d.job_id, "url": d.url, "event": d.event, "state": d.state,
                        "attempts": [{"attempt": a.attempt, "at": a.at.isoformat(), "status_code": a.status_code,
                                      "error": a.error, "duration_ms": a.duration_ms} for a in attempts],
                        "next_attempt_at": d.next_attempt_at.isoformat() if d.state == PENDING else None,
                        "delivered_at": d.delivered_at.isoformat() if d.delivered_at else None})
        return out
