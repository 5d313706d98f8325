"""Issue 14 on real services (SQLite and PostgreSQL catalogs, Redis, an HTTP receiver on 127.0.0.1), without
training: feedback pools, exactly-once retraining across processes and crashes, dedupe, schedules fired by two
beat processes, webhook delivery with retries. The end-to-end paths with a real worker are in
tests/test_automation_end_to_end.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from sqlalchemy import func, select

from farm import service
from farm.automation import feedback, retrain, schedules, webhooks
from farm.catalog import repository as repo
from farm.catalog.models import FeedbackRow, Job, RetrainRun, Schedule, ScheduleFiring, WebhookDelivery, utcnow
from farm.catalog.session import session_scope
from farm.errors import DatasetError
from farm.queue import queue_depths
from farm.settings import FarmSettings
from farm.tiny import dataset_rows, write_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]


def make_settings(tmp_path, database_url, broker_url, **extra) -> FarmSettings:
    return FarmSettings(database_url=database_url, broker_url=broker_url, store_url=f"file://{tmp_path}/store",
                        work_dir=tmp_path / "work", cache_dir=tmp_path / "cache", **extra)


def env_for(settings: FarmSettings) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "FARM_DATABASE_URL": settings.database_url,
            "FARM_BROKER_URL": settings.broker_url, "FARM_STORE_URL": settings.store_url,
            "FARM_WORK_DIR": str(settings.work_dir), "FARM_CACHE_DIR": str(settings.cache_dir),
            "FARM_REQUEUE_AFTER_SECONDS": "0.1"}


def spec_for(model_dir, data, name="bot", **extra) -> dict:
    return {"kind": "train", "name": name, "base_model": str(model_dir),
            "dataset": {"path": str(data), "format": "chat"}, "lora": {"r": 4, "alpha": 8},
            "quantization": {"bits": 16, "compute_dtype": "float32"},
            "training": {"max_steps": 2, "micro_batch_size": 2, "max_seq_len": 64}, **extra}


def fake_publish(settings: FarmSettings, job_id: str) -> str:
    """What a worker's publish does to the catalog (no training): the job succeeds with a version."""
    with session_scope(settings.database_url) as session:
        claim = repo.claim_job(session, job_id, "test-worker", 60)
        job = session.get(Job, job_id)
        adapter = repo.reserve_adapter_version(session, claim, name=job.name, kind="train", spec_hash=job.spec_hash)
        parent_id = None
        if job.spec.get("continue_from"):
            parent_id = repo.get_adapter(session, *service.parse_adapter_ref(job.spec["continue_from"])).id
        repo.publish_adapter(session, claim, files=[], provenance={}, metrics={}, base_model=job.spec["base_model"],
                             dataset_uri=job.spec["dataset"]["path"], parent_adapter_id=parent_id)
        return f"{adapter.name}:{adapter.version}"


@pytest.fixture
def farm(tmp_path, catalog_url, redis_url, tiny_model_dir):
    """Settings on both catalogs, and adapter `bot` v1 published from a 16-row chat dataset."""
    settings = make_settings(tmp_path, catalog_url, redis_url)
    data = write_dataset(tmp_path / "base.jsonl", "chat", n=16, seed=1)
    job = service.submit_job(spec_for(tiny_model_dir, data), settings=settings)
    fake_publish(settings, job.id)
    return settings


def feedback_file(path: Path, n: int, seed: int) -> Path:
    """n chat rows, each different from every row of another seed's file."""
    rows = dataset_rows("chat", n, seed=seed)
    for i, row in enumerate(rows):
        row["messages"][0]["content"] += f" (event {seed}-{i})"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def count(settings, model, *where) -> int:
    with session_scope(settings.database_url) as session:
        return session.scalar(select(func.count()).select_from(model).where(*where))


# ---------------------------------------------------------------- feedback and retraining

def test_feedback_is_validated_by_line_and_counted_once(farm, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good_row = json.dumps(dataset_rows("chat", 1, seed=9)[0])
    bad.write_text(good_row + "\n" + '{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: no assistant message"):
        feedback.add_feedback("bot", bad, settings=farm)
    assert count(farm, FeedbackRow) == 0  # nothing half-added

    with pytest.raises(DatasetError, match=r"^feedback:2: no assistant message"):
        feedback.add_feedback_bytes("bot", bad.read_bytes(), settings=farm)

    rows = feedback_file(tmp_path / "fb.jsonl", 5, seed=2)
    first = feedback.add_feedback("bot", rows, settings=farm)
    again = feedback.add_feedback("bot", rows, settings=farm)
    assert (first.added, again.added, again.received, again.pool_new) == (5, 0, 5, 5)
    assert first.every is None and first.retrain_job is None  # no policy: the pool only collects


def test_pool_reaching_every_starts_exactly_one_continue_from_job(farm, tmp_path):
    retrain.set_policy("bot", every=8, replay=0.5, max_steps=3, settings=farm)
    out = feedback.add_feedback("bot", feedback_file(tmp_path / "a.jsonl", 5, seed=2), settings=farm)
    assert out.retrain_job is None and out.pool_new == 5
    out = feedback.add_feedback("bot", feedback_file(tmp_path / "b.jsonl", 5, seed=3), settings=farm)
    assert out.retrain_job is not None and out.pool_new == 2 and out.every == 8

    job = service.get_job(out.retrain_job, settings=farm)
    assert job.spec["continue_from"] == "bot:1" and job.spec["training"]["max_steps"] == 3
    assert job.submitted_by == retrain.RETRAIN_SUBMITTER
    assert count(farm, FeedbackRow, FeedbackRow.used_by_job_id == job.id) == 8
    # the job's data: the 8 new rows and round(0.5 * 8) rows of the parent's dataset
    from farm.store import open_store

    lines = open_store(farm.store_url, farm).get_bytes(service.store_key(job.spec["dataset"]["path"])).splitlines()
    assert len(lines) == 12
    # in flight: more rows do not start a second one
    out = feedback.add_feedback("bot", feedback_file(tmp_path / "c.jsonl", 9, seed=4), settings=farm)
    assert out.retrain_job is None and count(farm, RetrainRun) == 1

    v2 = fake_publish(farm, job.id)
    lineage = retrain.adapter_lineage(v2, settings=farm)
    assert lineage["parent"] == "bot:1" and lineage["origin"] == "retrain"
    with session_scope(farm.database_url) as session:
        used = set(session.scalars(select(FeedbackRow.sha256).where(FeedbackRow.used_by_job_id == job.id)))
    assert set(lineage["feedback_events"]) == used
    # published: the next pool (2 + 9 = 11 unused rows >= 8) starts from v2 on the next check
    assert retrain.check_all_pools(settings=farm)
    assert count(farm, RetrainRun) == 2


def test_a_spec_retrain_section_is_the_policy_without_farm_retrain(tmp_path, sqlite_url, redis_url, tiny_model_dir):
    settings = make_settings(tmp_path, sqlite_url, redis_url)
    data = write_dataset(tmp_path / "base.jsonl", "chat", n=16, seed=1)
    job = service.submit_job(spec_for(tiny_model_dir, data, name="skill", retrain={"every": 4, "replay": 0}),
                             settings=settings)
    fake_publish(settings, job.id)
    out = feedback.add_feedback("skill", feedback_file(tmp_path / "f.jsonl", 4, seed=5), settings=settings)
    assert out.retrain_job and out.every == 4
    assert retrain.pool_status("skill", settings=settings)["policy"]["source"] == "spec"


TRIGGER = """
import sys, time
from pathlib import Path
from farm.automation.retrain import maybe_retrain
go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.005)
job = maybe_retrain("bot")
print(job.id if job else "none")
"""


def test_two_processes_triggering_one_pool_start_one_job(farm, tmp_path):
    retrain.set_policy("bot", every=6, settings=farm)
    feedback.add_feedback("bot", feedback_file(tmp_path / "a.jsonl", 6, seed=2), settings=farm, trigger=False)
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", TRIGGER, str(go)], env=env_for(farm), cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(2.0)  # both imported and waiting
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    started = [o.strip() for o, _ in outs if o.strip() != "none"]
    assert len(started) == 1, outs
    assert count(farm, RetrainRun) == 1 and count(farm, Job, Job.name == "bot") == 2
    assert queue_depths(["farm.cpu"], farm.broker_url)["farm.cpu"] == 2  # v1's doorbell and the retraining's


CRASH_BEFORE_COMMIT = """
import os
from farm.automation import dedupe, retrain
dedupe.record_lineage = lambda *a, **k: os._exit(137)  # killed inside the transaction that records the job
retrain.maybe_retrain("bot")
"""

CRASH_BEFORE_DOORBELL = """
import os
import farm.queue
farm.queue.ring_doorbell = lambda *a, **k: os._exit(137)  # killed after the commit, before the message
from farm.automation.retrain import maybe_retrain
maybe_retrain("bot")
"""


def test_a_trigger_killed_mid_way_loses_nothing_and_starts_nothing_twice(farm, tmp_path):
    retrain.set_policy("bot", every=6, settings=farm)
    feedback.add_feedback("bot", feedback_file(tmp_path / "a.jsonl", 6, seed=2), settings=farm, trigger=False)
    env = env_for(farm)

    crashed = subprocess.run([sys.executable, "-c", CRASH_BEFORE_COMMIT], env=env, cwd=REPO_ROOT, timeout=120)
    assert crashed.returncode == 137
    assert count(farm, RetrainRun) == 0 and count(farm, Job) == 1  # rolled back: the rows are still new
    assert count(farm, FeedbackRow, FeedbackRow.used_by_job_id.is_(None)) == 6

    crashed = subprocess.run([sys.executable, "-c", CRASH_BEFORE_DOORBELL], env=env, cwd=REPO_ROOT, timeout=120)
    assert crashed.returncode == 137
    assert count(farm, RetrainRun) == 1 and count(farm, FeedbackRow, FeedbackRow.used_by_job_id.is_(None)) == 0
    depth = queue_depths(["farm.cpu"], farm.broker_url)["farm.cpu"]
    assert retrain.check_all_pools(settings=farm) == []  # the pool is taken: nothing started twice
    # the job without a doorbell is rung again by the reaper (a lost message)
    time.sleep(0.3)
    requeued = service.reap_lost_jobs(settings=farm.model_copy(update={"requeue_after_seconds": 0.1}))
    with session_scope(farm.database_url) as session:
        run = session.scalar(select(RetrainRun))
    assert run.job_id in requeued
    assert queue_depths(["farm.cpu"], farm.broker_url)["farm.cpu"] == depth + len(requeued)


# ---------------------------------------------------------------- dedupe

def test_identical_content_is_deduplicated_unless_forced(farm, tmp_path, tiny_model_dir):
    data = write_dataset(tmp_path / "d.jsonl", "chat", n=16, seed=7)
    first = service.submit_job(spec_for(tiny_model_dir, data, name="one"), settings=farm)
    # another name, same content (the data file copied elsewhere): the in-flight job comes back
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(data.read_bytes())
    same = service.submit_job(spec_for(tiny_model_dir, copy, name="two"), settings=farm)
    assert same.deduplicated and same.id == first.id and count(farm, Job, Job.name == "two") == 0
    forced = service.submit_job(spec_for(tiny_model_dir, copy, name="two"), settings=farm, force=True)
    assert not forced.deduplicated and forced.id != first.id
    # different content: a hyperparameter or a byte of data
    other = service.submit_job(spec_for(tiny_model_dir, data, name="one", lora={"r": 8, "alpha": 8}), settings=farm)
    assert not other.deduplicated
    # succeeded: still deduplicated, pointing at its adapter; a failed one is not
    fake_publish(farm, first.id)
    again = service.submit_job(spec_for(tiny_model_dir, data, name="one"), settings=farm)
    assert again.deduplicated and again.id == first.id and again.adapter == "one:1"
    with session_scope(farm.database_url) as session:
        claim = repo.claim_job(session, other.id, "w", 60)
        repo.fail_job(session, claim, "runner_crashed", "boom")
    retry = service.submit_job(spec_for(tiny_model_dir, data, name="one", lora={"r": 8, "alpha": 8}), settings=farm)
    assert not retry.deduplicated


def test_identical_submits_at_the_same_moment_queue_one_job(farm, tmp_path, tiny_model_dir, monkeypatch):
    """Both submits pass the first look for a duplicate before either records its job (a barrier holds each one
    just before its transaction): the check inside the transaction still lets only one of them queue."""
    from farm import queue as broker

    data = write_dataset(tmp_path / "d.jsonl", "chat", n=16, seed=11)
    barrier = threading.Barrier(2, timeout=30)
    real_warm = broker.warm_doorbell

    def warm_then_wait(*args, **kwargs):
        real_warm(*args, **kwargs)
        barrier.wait()

    monkeypatch.setattr(broker, "warm_doorbell", warm_then_wait)
    results, errors = [], []

    def submit():
        try:
            results.append(service.submit_job(spec_for(tiny_model_dir, data, name="twin"), settings=farm))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=submit) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(r.deduplicated for r in results) == [False, True]
    assert results[0].id == results[1].id
    assert count(farm, Job, Job.name == "twin") == 1


def test_a_changed_base_model_is_new_content(farm, tmp_path, tiny_model_dir):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    data = write_dataset(tmp_path / "d.jsonl", "chat", n=16, seed=7)
    first = service.submit_job(spec_for(model, data, name="m"), settings=farm)
    assert service.submit_job(spec_for(model, data, name="m"), settings=farm).id == first.id
    weights = model / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1
    weights.write_bytes(bytes(blob))
    assert not service.submit_job(spec_for(model, data, name="m"), settings=farm).deduplicated


def test_a_job_evicted_from_its_cotraining_group_for_memory_retries_alone(farm, tmp_path, tiny_model_dir):
    """The group ran out of memory and evicted its newest job: that job's next attempt trains alone
    (training.cotrain false, recorded like a micro-batch change) instead of rejoining a group with no room for it,
    and it is rung again."""
    from farm.errors import EvictedForMemory
    from farm.training.cotrain import cotrain_key
    from workers.outcome import record_failure

    data = write_dataset(tmp_path / "d.jsonl", "chat", n=16, seed=13)
    job = service.submit_job(spec_for(tiny_model_dir, data, name="evicted"), settings=farm)
    assert cotrain_key(job.spec) is not None
    with session_scope(farm.database_url) as session:
        claim = repo.claim_job(session, job.id, "w", 60)

    def write(fn, *args):
        with session_scope(farm.database_url) as session:
            return fn(session, claim, *args)

    depth = queue_depths(["farm.cpu"], farm.broker_url)["farm.cpu"]
    state = record_failure(write, farm, job.id, EvictedForMemory.code, "evicted from its co-training group")
    assert state == "recovering"
    view = service.get_job(job.id, settings=farm)
    assert view.state == "recovering" and view.error.code == "cotrain_out_of_memory"
    assert view.spec["training"]["cotrain"] is False and cotrain_key(view.spec) is None
    assert [e.data for e in service.job_events(job.id, settings=farm) if e.type == "oom_retry"] == \
        [{"from": {"cotrain": True}, "to": {"cotrain": False}, "attempt": 1}]
    assert queue_depths(["farm.cpu"], farm.broker_url)["farm.cpu"] == depth + 1


# ---------------------------------------------------------------- schedules

def test_schedule_durations_and_slots():
    assert [schedules.parse_every(x) for x in ("30s", "10m", "6h", "2d")] == [30, 600, 21600, 172800]
    with pytest.raises(Exception, match="30s, 10m, 6h"):
        schedules.parse_every("6 hours")
    s = Schedule(cron="0 3 * * *", every_seconds=None, created_at=utcnow() - timedelta(days=2))
    slot = schedules.due_slot(s, utcnow())
    assert (slot.hour, slot.minute) == (3, 0) and slot <= utcnow()
    s = Schedule(cron=None, every_seconds=60, created_at=utcnow() - timedelta(seconds=150))
    assert schedules.due_slot(s, utcnow()) == s.created_at + timedelta(seconds=120)
    assert schedules.due_slot(Schedule(cron=None, every_seconds=60, created_at=utcnow()), utcnow()) is None


def test_bad_schedules_are_refused(farm, tmp_path, tiny_model_dir):
    data = write_dataset(tmp_path / "d.jsonl", "chat", n=8, seed=7)
    spec = spec_for(tiny_model_dir, data, name="s")
    with pytest.raises(Exception, match="exactly one of"):
        schedules.add_schedule(spec, settings=farm)
    with pytest.raises(Exception, match="not a cron expression"):
        schedules.add_schedule(spec, cron="0 3 * *", settings=farm)
    with pytest.raises(DatasetError):
        schedules.add_schedule({**spec, "dataset": {"path": str(tmp_path / "none.jsonl")}}, every="1h",
                               settings=farm)
    assert schedules.list_schedules(settings=farm) == []


def test_two_beat_processes_fire_each_slot_once(tmp_path, catalog_url, redis_url, tiny_model_dir):
    settings = make_settings(tmp_path, catalog_url, redis_url)
    data = write_dataset(tmp_path / "d.jsonl", "chat", n=8, seed=7)
    made = schedules.add_schedule(spec_for(tiny_model_dir, data, name="nightly"), every="1s", name="nightly",
                                  settings=settings)
    assert made["next_slot"]
    env = {**env_for(settings), "FARM_BEAT_INTERVAL_SECONDS": "0.3"}
    beats = [subprocess.Popen([sys.executable, "-m", "farm.cli.main", "beat"], env=env, cwd=REPO_ROOT,
                              start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=(tmp_path / f"beat{i}.log").open("w"))
             for i in range(2)]
    try:
        deadline = time.monotonic() + 90
        while count(settings, ScheduleFiring) < 3:
            assert time.monotonic() < deadline and all(b.poll() is None for b in beats), \
                (tmp_path / "beat0.log").read_text()[-3000:]
            time.sleep(0.2)
        # one beat is killed in the middle; the other goes on alone
        os.killpg(beats[0].pid, 9)
        before = count(settings, ScheduleFiring)
        while count(settings, ScheduleFiring) < before + 2:
            assert time.monotonic() < deadline, (tmp_path / "beat1.log").read_text()[-3000:]
            time.sleep(0.2)
        schedules.set_paused("nightly", True, settings=settings)
    finally:
        for b in beats:
            if b.poll() is None:
                os.killpg(b.pid, 15)
                b.wait(timeout=30)
    with session_scope(settings.database_url) as session:
        firings = session.scalars(select(ScheduleFiring).order_by(ScheduleFiring.slot_at)).all()
        slots = [f.slot_at for f in firings]
        assert len(slots) == len(set(slots))  # never one slot twice
        # the first firing trained; later ones found the same content in flight: deduplicated, nothing queued
        assert firings[0].outcome == "submitted"
        assert {f.outcome for f in firings[1:]} == {"deduplicated"}
        assert {f.job_id for f in firings} == {firings[0].job_id}
        assert session.scalar(select(func.count()).select_from(Job)) == 1
    listed = schedules.list_schedules(settings=settings)
    assert listed[0]["paused"] and listed[0]["last_firing"]["outcome"] == "deduplicated"


# ---------------------------------------------------------------- webhooks

class Receiver:
    """A real HTTP server on 127.0.0.1 that records POSTs and answers the status codes it is told to."""

    def __init__(self, statuses: list[int]):
        self.statuses = list(statuses)
        self.requests: list[tuple[dict, bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((dict(self.headers), body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def test_webhook_is_signed_retried_with_backoff_and_every_attempt_recorded(tmp_path, sqlite_url, redis_url,
                                                                           tiny_model_dir):
    receiver, farm_wide = Receiver([500, 503]), Receiver([])
    settings = make_settings(tmp_path, sqlite_url, redis_url, webhook_secret="s3cret", webhook_backoff_seconds=0.2,
                             webhook_urls=[farm_wide.url])
    try:
        data = write_dataset(tmp_path / "d.jsonl", "chat", n=8, seed=7)
        job = service.submit_job(spec_for(tiny_model_dir, data, name="hooked",
                                          notify={"url": receiver.url, "events": ["succeeded"]}), settings=settings)
        assert webhooks.deliver_due(settings=settings) == 0  # still queued: nothing to say
        fake_publish(settings, job.id)
        deadline = time.monotonic() + 30
        while len(receiver.requests) < 3 or not farm_wide.requests:
            webhooks.deliver_due(settings=settings)
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        receiver.close()
        farm_wide.close()
    headers, body = receiver.requests[-1]
    assert json.loads(body)["id"] == job.id and json.loads(body)["state"] == "succeeded"
    assert headers["X-Farm-Event"] == "succeeded"
    assert webhooks.verify(body, headers["X-Farm-Signature"], "s3cret")
    assert not webhooks.verify(body, headers["X-Farm-Signature"], "other")
    keys = {h["Idempotency-Key"] for h, _ in receiver.requests}
    assert len(keys) == 1  # the same key on every retry
    deliveries = {d["url"]: d for d in webhooks.list_deliveries(job.id, settings=settings)}
    hooked = deliveries[receiver.url]
    assert hooked["state"] == "delivered" and [a["status_code"] for a in hooked["attempts"]] == [500, 503, 200]
    assert hooked["id"] in keys
    from datetime import datetime

    at = [datetime.fromisoformat(a["at"]) for a in hooked["attempts"]]
    # an attempt is never sent before its backoff (0.2 s, then doubled) has passed since the one before it
    assert at[1] - at[0] >= timedelta(seconds=0.2) and at[2] - at[1] >= timedelta(seconds=0.4)
    assert deliveries[farm_wide.url]["state"] == "delivered"
    webhooks.deliver_due(settings=settings)
    assert len(receiver.requests) == 3  # delivered: never sent again


def test_webhook_backoff_doubles_from_each_attempt_and_is_capped(tmp_path, sqlite_url, redis_url, tiny_model_dir):
    settings = make_settings(tmp_path, sqlite_url, redis_url, webhook_backoff_seconds=0.25,
                             webhook_urls=["http://127.0.0.1:1/nothing-listens"])
    data = write_dataset(tmp_path / "d.jsonl", "chat", n=8, seed=7)
    job = service.submit_job(spec_for(tiny_model_dir, data, name="spaced"), settings=settings)
    service.cancel_job(job.id, settings=settings)
    webhooks.enqueue_ended_jobs(settings=settings)  # adds the outbox row, sends nothing
    [delivery] = webhooks.list_deliveries(job.id, settings=settings)
    gaps = []
    for attempts in (0, 1, 2, 30):
        with session_scope(settings.database_url) as session:
            session.get(WebhookDelivery, delivery["id"]).attempts = attempts
        sent_at = webhooks._claim(settings, delivery["id"], attempts)
        assert webhooks._claim(settings, delivery["id"], attempts) is None  # the same attempt is taken once
        with session_scope(settings.database_url) as session:
            gaps.append((session.get(WebhookDelivery, delivery["id"]).next_attempt_at - sent_at).total_seconds())
    assert gaps == [0.25, 0.5, 1.0, webhooks.MAX_BACKOFF_S]


def test_webhook_gives_up_after_max_attempts(tmp_path, sqlite_url, redis_url, tiny_model_dir):
    settings = make_settings(tmp_path, sqlite_url, redis_url, webhook_backoff_seconds=0.05, webhook_max_attempts=2,
                             webhook_urls=["http://127.0.0.1:1/nothing-listens"])
    data = write_dataset(tmp_path / "d.jsonl", "chat", n=8, seed=7)
    job = service.submit_job(spec_for(tiny_model_dir, data, name="lonely"), settings=settings)
    service.cancel_job(job.id, settings=settings)
    deadline = time.monotonic() + 30
    while (d := webhooks.list_deliveries(job.id, settings=settings)) == [] or d[0]["state"] == "pending":
        webhooks.deliver_due(settings=settings)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert d[0]["state"] == "failed" and d[0]["event"] == "cancelled" and len(d[0]["attempts"]) == 2
    assert all(a["status_code"] is None and "ConnectError" in a["error"] for a in d[0]["attempts"])
