"""Jobs survive a lost worker: kill -9 mid-job, another worker resumes from the last checkpoint, one version is
published, and the loss matches an uninterrupted run. A job that fails every attempt ends failed."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from farm import service
from farm.catalog import repository as repo
from farm.catalog.session import session_scope
from tests.test_end_to_end import write_spec


def runner_processes(root) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "workers.runner" in cmd and str(root) in cmd:
            out.append(p)
    return out


def test_killed_worker_job_resumes_from_checkpoint_and_publishes_once(farm_stack, tiny_model_dir, tmp_path):
    from farm.tiny import write_dataset

    settings = farm_stack.settings
    data = write_dataset(tmp_path / "chat.jsonl", "chat", n=64, seed=3)
    spec = dict(max_steps=32, checkpoint_every=4, lr_scheduler="linear", warmup_steps=2)

    first = farm_stack.start_worker(name="doomed")
    reference = service.submit_job(write_spec(tmp_path / "ref.yaml", tiny_model_dir, data, **spec), settings=settings)
    reference = service.wait_for_job(reference.id, timeout=600, settings=settings)
    assert reference.state == "succeeded", farm_stack.worker_logs()

    interrupted = write_spec(tmp_path / "job.yaml", tiny_model_dir, data, **spec)
    text = interrupted.read_text().replace("name: e2e-bot", "name: e2e-resumed")
    interrupted.write_text(text)
    job = service.submit_job(interrupted, settings=settings, force=True)  # identical content: not deduplicated

    def checkpointed(view):
        with session_scope(settings.database_url) as session:
            return repo.latest_checkpoint(session, view.id) is not None and (view.progress or {}).get("step", 0) >= 6

    deadline = time.monotonic() + 300
    while not checkpointed(service.get_job(job.id, settings=settings)):
        assert time.monotonic() < deadline, farm_stack.worker_logs()
        time.sleep(0.2)

    runners = runner_processes(farm_stack.root)
    assert runners, "no runner process found"
    farm_stack.kill_worker(first, signal.SIGKILL)
    for p in runners:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(runners, timeout=30)
    assert service.get_job(job.id, settings=settings).state == "running"  # nobody knows yet: the lease runs out

    farm_stack.start_worker(name="rescuer")
    final = service.wait_for_job(job.id, timeout=600, settings=settings)
    assert final.state == "succeeded", (final.error, farm_stack.worker_logs())
    assert final.attempt == 2
    states = [e.state for e in service.job_events(job.id, settings=settings) if e.type == "state"]
    assert states == ["queued", "running", "recovering", "running", "succeeded"]

    adapters = service.list_adapters("e2e-resumed", settings=settings)
    assert [a.version for a in adapters] == [1]
    meta = adapters[0].provenance
    resumed = meta["lineage"]["resumed_from_step"]
    assert 4 <= resumed < 32 and resumed % 4 == 0 and meta["lineage"]["attempt"] == 2
    ref_loss = service.get_adapter("e2e-bot", settings=settings).metrics["final_loss"]
    assert adapters[0].metrics["final_loss"] == pytest.approx(ref_loss, rel=1e-3, abs=1e-4)


def test_job_failing_every_attempt_ends_failed_with_last_error(tmp_path, tiny_model_dir):
    import shutil

    from farm.tiny import write_dataset
    from tests.fixtures.farm import make_stack

    stack = make_stack(tmp_path / "farm", max_attempts=2)
    try:
        model = tmp_path / "model"
        shutil.copytree(tiny_model_dir, model)
        data = write_dataset(tmp_path / "chat.jsonl", "chat", n=16, seed=3)
        job = service.submit_job(write_spec(tmp_path / "job.yaml", model, data), settings=stack.settings)
        # the weights break after submit (a disk fault, say): every attempt crashes while loading them
        weights = next(model.glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:4096])
        stack.start_worker()
        final = service.wait_for_job(job.id, timeout=600, settings=stack.settings)
        assert final.state == "failed" and final.attempt == 2, stack.worker_logs()
        assert "all 2 attempts used" in final.error.message
        states = [e.state for e in service.job_events(job.id, settings=stack.settings) if e.type == "state"]
        assert states == ["queued", "running", "recovering", "running", "failed"]
    finally:
        stack.stop()


def test_stopping_a_worker_hands_its_job_back(farm_stack, tiny_model_dir, tmp_path):
    """SIGTERM to a worker's process group (what the supervisor sends): the runner is stopped, the job goes back to
    `recovering` at once (no lease to wait out) and another worker finishes it from its checkpoint."""
    from farm.tiny import write_dataset

    settings = farm_stack.settings
    data = write_dataset(tmp_path / "chat.jsonl", "chat", n=64, seed=3)
    worker = farm_stack.start_worker(name="leaving")
    job = service.submit_job(write_spec(tmp_path / "job.yaml", tiny_model_dir, data, max_steps=400,
                                        checkpoint_every=2), settings=settings)
    deadline = time.monotonic() + 300
    while True:
        with session_scope(settings.database_url) as session:
            if repo.latest_checkpoint(session, job.id) is not None:
                break
        assert time.monotonic() < deadline, farm_stack.worker_logs()
        time.sleep(0.2)
    os.killpg(worker.pid, signal.SIGTERM)
    worker.wait(timeout=120)
    view = service.get_job(job.id, settings=settings)
    assert view.state == "recovering" and view.error.code == "worker_stopped", farm_stack.worker_logs()
    assert runner_processes(farm_stack.root) == []

    farm_stack.start_worker(name="next")

    def resumed_logs():
        return [e.data["message"] for e in service.job_events(job.id, settings=settings)
                if e.type == "log" and e.attempt == 2 and "resumed from" in e.data.get("message", "")]

    deadline = time.monotonic() + 300
    while not resumed_logs():
        assert time.monotonic() < deadline, farm_stack.worker_logs()
        time.sleep(0.2)
    assert "at step" in resumed_logs()[0]
    service.cancel_job(job.id, settings=settings)  # 400 steps are not needed to see it resume
    final = service.wait_for_job(job.id, timeout=120, settings=settings)
    assert final.state == "cancelled" and final.attempt == 2


def test_a_job_whose_message_was_lost_gets_a_new_doorbell(tmp_path, tiny_model_dir):
    """The broker is only a doorbell and may lose a message: a waiting job with no message in Redis is rung again
    by the workers' reaper, and runs; a job whose message is still waiting is left alone."""
    import redis

    from farm.queue import job_ids_in_broker
    from farm.tiny import write_dataset
    from tests.fixtures.farm import make_stack

    stack = make_stack(tmp_path / "farm", requeue_after_seconds=2)
    try:
        settings = stack.settings
        data = write_dataset(tmp_path / "chat.jsonl", "chat", n=16, seed=3)
        job = service.submit_job(write_spec(tmp_path / "job.yaml", tiny_model_dir, data, max_steps=3),
                                 settings=settings)
        assert job_ids_in_broker(["farm.cpu"], settings.broker_url) == {job.id}
        time.sleep(2.5)
        assert service.reap_lost_jobs(settings=settings) == []  # its message is in the queue: nothing to do
        redis.Redis.from_url(settings.broker_url).delete("farm.cpu")  # the message is lost
        assert job_ids_in_broker(["farm.cpu"], settings.broker_url) == set()

        stack.start_worker()  # its reaper notices within a few seconds
        final = service.wait_for_job(job.id, timeout=300, settings=settings)
        assert final.state == "succeeded" and final.attempt == 1, stack.worker_logs()
    finally:
        stack.stop()
