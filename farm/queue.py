"""The Celery app: configuration and routing only (task bodies live in workers/).

The broker is a doorbell: a message carries a job id and nothing else, JSON-encoded. Queue names come from
farm.names (`queue_name`). The settings answer Celery's known traps:

- Redis re-delivers an unacknowledged message after `visibility_timeout` (default 1 h) even while it runs, so a
  long `acks_late` job would run twice (celery#5935): it is set above the longest job, for the broker and the
  result backend; the catalog's lease claim makes any duplicate harmless anyway.
- One job at a time per pool process (`worker_prefetch_multiplier=1`): a prefetched message would wait behind a
  job of hours.
- Flower needs `worker_send_task_events` and `task_send_sent_event`; it ignores `update_state` meta, so progress
  goes out as a custom event (`PROGRESS_EVENT`).
- `accept_content=["json"]`: no pickle on the wire.
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from farm.names import CPU_QUEUE, label_for
from farm.settings import FarmSettings, get_settings

RUN_JOB_TASK = "farm.run_job"
PROGRESS_EVENT = "task-progress"


def make_celery_app(settings: FarmSettings | None = None) -> Celery:
    """A Celery app wired to the farm's broker, with the settings the traps in this module's docstring call for."""
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
        # the pool process only supervises (torch lives in the runner and its zygote, never here), so it
        # is kept between jobs: a fresh one per job left the worker idle until the pool's next 5 s check.
        worker_max_tasks_per_child=None,
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        task_default_queue=CPU_QUEUE,
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


def warm_doorbell(settings: FarmSettings | None = None, queue: str | None = None) -> None:
    """Make the producer ready to send, so that ring_doorbell right after a commit only sends.

    Called before the job's row is committed: the message then leaves within a millisecond or two of the commit
    instead of after Celery's first connection, its result-backend lookup (a scan of every installed package's
    entry points, ~25 ms, even with results ignored), its message sender and the queue's declaration (`queue`,
    when known). A broker that does not answer is left for ring_doorbell to report.
    """
    try:
        app = app_for(settings)
        app.backend  # noqa: B018 (resolved once, then cached by the app)
        app.amqp.send_task_message  # noqa: B018 (the sender, made once: its sent-event dispatcher imports a module)
        with app.producer_or_acquire() as producer:
            producer.connection.ensure_connection(max_retries=1)
            if queue is not None:
                producer.maybe_declare(app.amqp.queues[queue])
    except Exception:
        pass


def ring_doorbell(job_id: str, queue: str, *, settings: FarmSettings | None = None,
                  countdown: float | None = None, label: str | None = None) -> None:
    """Enqueue the message that tells a worker on `queue` to try to claim `job_id`.

    `label` is the name Flower shows for the task (task_label's text); a caller that holds the job's view passes
    it, else it is read from the catalog."""
    if label is None:
        label = task_label(job_id, settings)
    app_for(settings).send_task(RUN_JOB_TASK, args=[job_id], queue=queue, countdown=countdown,
                                shadow=label)  # Flower shows the farm's names


def task_label(job_id: str, settings: FarmSettings | None = None) -> str | None:
    """The name Flower shows for a job's task (Celery's `shadow`): kind, adapter name and short job id, as in
    ``train demo-chat 1a2b3c4d`` (label_for). None (Flower shows farm.run_job) when the catalog cannot say."""
    from farm.catalog.models import Job
    from farm.catalog.session import session_scope

    try:
        with session_scope((settings or get_settings()).database_url) as session:
            job = session.get(Job, job_id)
            return label_for(job.kind, job.name, job.id) if job is not None else None
    except Exception:  # the message matters more than its label
        return None




def queue_depths(queues: list[str], broker_url: str | None = None) -> dict[str, int]:
    """Messages waiting per queue (Redis lists named after the queues)."""
    import redis

    client = redis.Redis.from_url(broker_url or get_settings().broker_url)
    return {q: int(client.llen(q)) for q in queues}


def job_ids_in_broker(queues: list[str], broker_url: str | None = None, *,
                      unacked_within: float | None = None) -> set[str]:
    """Job ids of every run_job message the broker holds: waiting in the queues or delivered but unacknowledged.

    Reads kombu's Redis layout (a list per queue, the `unacked` hash); a job that the catalog says is waiting but
    that has no message here lost its doorbell. With `unacked_within`, only unacknowledged messages delivered in
    the last that many seconds count (kombu's `unacked_index` holds each delivery's time): a worker that took a
    message longer ago and still has not claimed its job is stuck, and the job needs a new doorbell.
    """
    import base64
    import json

    import redis

    client = redis.Redis.from_url(broker_url or get_settings().broker_url)
    raw = [m for q in queues for m in client.lrange(q, 0, -1)]
    if unacked_within is None:
        held = client.hvals("unacked")
    else:  # a message delivered longer ago whose job is still waiting was never claimed: not counted
        import time

        tags = client.zrangebyscore("unacked_index", time.time() - unacked_within, "+inf")
        held = [v for v in (client.hmget("unacked", tags) if tags else []) if v is not None]
    raw += [json.dumps(json.loads(v)[0]).encode() for v in held]
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
