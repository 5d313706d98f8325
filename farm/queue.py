"""The Celery app: configuration and routing only (task bodies live in workers/).

The broker is a doorbell: a message carries a job id and nothing else, JSON-encoded.
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from farm.settings import FarmSettings, get_settings

RUN_JOB_TASK = "farm.run_job"
PROGRESS_EVENT = "task-progress"


def make_celery_app(settings: FarmSettings | None = None) -> Celery:
    """A Celery app wired to the farm's broker, with the settings the Celery traps in DESIGN.md call for."""
    settings = settings or get_settings()
    app = Celery("farm", broker=settings.broker_url)
    transport = {"visibility_timeout": settings.visibility_timeout}
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_max_tasks_per_child=1,
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        task_default_queue="farm.cpu",
        worker_hijack_root_logger=False,
    )
    return app


celery_app = make_celery_app()


@lru_cache(maxsize=8)
def _app_for_broker(broker_url: str) -> Celery:
    if broker_url == celery_app.conf.broker_url:
        return celery_app
    return make_celery_app(get_settings().model_copy(update={"broker_url": broker_url}))


def app_for(settings: FarmSettings | None = None) -> Celery:
    """The Celery app for these settings' broker (the module's app when they match)."""
    return _app_for_broker((settings or get_settings()).broker_url)


def ring_doorbell(job_id: str, queue: str, *, settings: FarmSettings | None = None,
                  countdown: float | None = None) -> None:
    """Enqueue the message that tells a worker on `queue` to try to claim `job_id`."""
    app_for(settings).send_task(RUN_JOB_TASK, args=[job_id], queue=queue, countdown=countdown)


def queue_depths(queues: list[str], broker_url: str | None = None) -> dict[str, int]:
    """Messages waiting per queue (Redis lists named after the queues)."""
    import redis

    client = redis.Redis.from_url(broker_url or get_settings().broker_url)
    return {q: int(client.llen(q)) for q in queues}


def job_ids_in_broker(queues: list[str], broker_url: str | None = None) -> set[str]:
    """Job ids of every run_job message the broker holds: waiting in the queues or delivered but unacknowledged.

    Reads kombu's Redis layout (a list per queue, the `unacked` hash); a job that the catalog says is waiting but
    that has no message here lost its doorbell.
    """
    import base64
    import json

    import redis

    client = redis.Redis.from_url(broker_url or get_settings().broker_url)
    raw = [m for q in queues for m in client.lrange(q, 0, -1)]
    raw += [json.dumps(json.loads(v)[0]).encode() for v in client.hvals("unacked")]
    found = set()
    for item in raw:
        try:
            message = json.loads(item)
            if message.get("headers", {}).get("task") != RUN_JOB_TASK:
                continue
            args = json.loads(base64.b64decode(message["body"]))[0]
            found.add(str(args[0]))
        except (ValueError, KeyError, IndexError, TypeError):
            continue
    return found
