"""Progress reaches Flower: the worker sends a `task-progress` Celery event per step (JSON, on the event bus)
besides the standard task-started/succeeded events, and records it in the catalog."""

from __future__ import annotations

import threading

from farm import service
from farm.queue import PROGRESS_EVENT, app_for
from tests.test_end_to_end import write_spec


def test_worker_sends_progress_events_on_the_bus(farm_stack, tiny_model_dir, tmp_path):
    from farm.tiny import write_dataset

    settings = farm_stack.settings
    app = app_for(settings)
    seen: list[dict] = []
    ready = threading.Event()
    receivers = []

    def listen():
        with app.connection_for_read() as conn:
            recv = app.events.Receiver(conn, handlers={PROGRESS_EVENT: seen.append,
                                                       "task-started": seen.append})
            receivers.append(recv)
            recv.on_iteration = ready.set  # called once the consumer is bound, before each drain
            for _ in recv.consume(limit=None, timeout=None, wakeup=False):
                pass

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    assert ready.wait(30)
    data = write_dataset(tmp_path / "chat.jsonl", "chat", n=16, seed=1)
    farm_stack.start_worker()
    job = service.submit_job(write_spec(tmp_path / "job.yaml", tiny_model_dir, data, max_steps=5), settings=settings)
    final = service.wait_for_job(job.id, timeout=600, settings=settings)
    assert final.state == "succeeded", farm_stack.worker_logs()
    receivers[0].should_stop = True
    t.join(timeout=10)
    progress = [e for e in seen if e["type"] == PROGRESS_EVENT and e.get("job_id") == job.id]
    assert [e["step"] for e in progress] == [1, 2, 3, 4, 5]
    assert all(e["total_steps"] == 5 and "loss" in e and "eta_s" in e for e in progress)
    assert any(e["type"] == "task-started" for e in seen)
