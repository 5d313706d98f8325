"""Server-sent events: a job's events as a text/event-stream that ends when the job does.

Each catalog event is sent as ``id: <event id>``, ``event: <type>``, ``data: <JobEventPublic JSON>``; the stream
ends with ``event: end`` whose data is the final JobPublic. A client that reconnects sends the last id it saw
(the Last-Event-ID header or ``?after=``) and misses nothing.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import anyio
from starlette.concurrency import run_in_threadpool

from farm import service
from farm.catalog.models import TERMINAL_STATES
from farm.settings import FarmSettings

END_EVENT = "end"
KEEPALIVE_SECONDS = 15.0
PAGE = 500
MEDIA_TYPE = "text/event-stream"


def format_event(data: str, *, event: str | None = None, event_id: int | None = None) -> str:
    """One SSE message; `data` must be a single line (JSON is)."""
    head = (f"id: {event_id}\n" if event_id is not None else "") + (f"event: {event}\n" if event else "")
    return f"{head}data: {data}\n\n"


async def job_event_stream(job_id: str, after: int, settings: FarmSettings, poll_seconds: float,
                           is_disconnected) -> AsyncIterator[str]:
    """Yield the job's events after `after`, polling the catalog, until the job is terminal (then `end`)."""
    last_sent = time.monotonic()
    while True:
        # Read the state BEFORE the events: when the job was already terminal, the events read next include its
        # last one, so the stream never ends early.
        job = await run_in_threadpool(service.get_job, job_id, settings=settings)
        events = await run_in_threadpool(service.job_events, job_id, after=after, limit=PAGE,
                                         settings=settings)
        for ev in events:
            after = ev.id
            yield format_event(ev.model_dump_json(), event=ev.type, event_id=ev.id)
            last_sent = time.monotonic()
        if job.state in TERMINAL_STATES and len(events) < PAGE:
            yield format_event(job.model_dump_json(), event=END_EVENT)
            return
        if len(events) == PAGE:
            continue  # a full page: more are waiting
        if time.monotonic() - last_sent >= KEEPALIVE_SECONDS:
            # A comment line keeps proxies from closing a quiet stream.
            yield ": keepalive\n\n"
            last_sent = time.monotonic()
        if await is_disconnected():
            return
        await anyio.sleep(poll_seconds)


def parse_after(after: int, last_event_id: str | None) -> int:
    """Resume point: the later of ?after= and a reconnecting browser's Last-Event-ID header."""
    if last_event_id and last_event_id.strip().isdigit():
        return max(after, int(last_event_id.strip()))
    return after
