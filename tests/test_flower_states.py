"""What Flower shows of the farm's tasks (issue 16), read the way Flower reads it: Celery's event-state machine
(celery.events.state.State) fed by a real worker's events. Each task carries a readable name (kind, adapter name,
short job id) and ends in the state that matches its job: SUCCESS, CANCELLED (a custom event: Celery's state
machine ranks REVOKED below the progress events' state) for a cancelled job, FAILURE for a failed one. The
cancelled attempt's whole runner log is kept in the store (`farm logs`)."""

from __future__ import annotations

import threading
import time

from celery.events.state import State

from farm import service
from farm.job_logs import read_job_log
from farm.queue import app_for
from tests.fixtures.farm import make_stack
from tests.test_end_to_end import write_spec


def test_tasks_carry_the_jobs_names_and_end_in_their_states(tmp_path, tiny_model_dir):
    from farm.tiny import write_dataset

    # one job a runner (no co-training): each message runs its own job, and the cancelled one keeps its log
    stack = make_stack(tmp_path / "farm", max_attempts=1, cotrain_max=1)
    try:
        settings = stack.settings
        app = app_for(settings)
        state = State()
        ready = threading.Event()
        receivers = []

        def listen():
            with app.connection_for_read() as conn:
                recv = app.events.Receiver(conn, handlers={"*": state.event})
                receivers.append(recv)
                recv.on_iteration = ready.set
                for _ in recv.consume(limit=None, timeout=None, wakeup=False):
                    pass

        threading.Thread(target=listen, daemon=True).start()
        assert ready.wait(30)
        data = write_dataset(tmp_path / "chat.jsonl", "chat", n=16, seed=2)
        ok = service.submit_job(write_spec(tmp_path / "ok.yaml", tiny_model_dir, data, max_steps=2), settings=settings)
        long_spec = write_spec(tmp_path / "long.yaml", tiny_model_dir, data, max_steps=500)
        long_spec.write_text(long_spec.read_text().replace("name: e2e-bot", "name: long-bot"))
        long = service.submit_job(long_spec, settings=settings)
        broken_spec = write_spec(tmp_path / "broken.yaml", tiny_model_dir, data, max_steps=2)
        broken_spec.write_text(broken_spec.read_text().replace(str(tiny_model_dir), "org/no-such-model")
                               .replace("name: e2e-bot", "name: broken-bot"))
        broken = service.submit_job(broken_spec, settings=settings)
        stack.start_worker()

        deadline = time.monotonic() + 300
        while not (service.get_job(long.id, settings=settings).progress or {}).get("step"):
            assert time.monotonic() < deadline, stack.worker_logs()
            time.sleep(0.3)
        service.cancel_job(long.id, settings=settings)
        finals = {j.id: service.wait_for_job(j.id, timeout=300, settings=settings).state for j in (ok, long, broken)}
        assert finals == {ok.id: "succeeded", long.id: "cancelled", broken.id: "failed"}, stack.worker_logs()

        expected = {f"train e2e-bot {ok.id[:8]}": "SUCCESS", f"train long-bot {long.id[:8]}": "CANCELLED",
                    f"train broken-bot {broken.id[:8]}": "FAILURE"}
        deadline = time.monotonic() + 30
        while True:
            seen = {t.name: t.state for t in state.tasks.values() if t.name in expected}
            if seen == expected or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert seen == expected, ({t.name: t.state for t in state.tasks.values()}, stack.worker_logs())
        receivers[0].should_stop = True

        # the cancelled attempt's whole runner log is in the store, not just a tail
        job_id, attempt, text = read_job_log(long.id[:10], settings=settings)
        assert job_id == long.id and attempt == 1 and "training 500 steps" in text, text
    finally:
        stack.stop()
