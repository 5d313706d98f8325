"""Runners forked warm from the zygote keep the cold runner's guarantees: own session, killed as a group, gone
when their supervisor goes, output and exit status as a Popen gives them. And CPU slots split the cores."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from farm.specs import TrainSpec
from workers import launch
from workers.launch import WarmRunner, Zygote, cpu_share, start_runner


@pytest.fixture(scope="module")
def zygote():
    z = Zygote.for_this_process()
    assert z is not None
    hello = z.wait_ready()
    assert not hello["cuda"] and "torch" in hello["preload_seconds"]
    yield z
    Zygote.discard()


def _job(tmp_path, model_dir, dataset) -> tuple:
    spec = TrainSpec(name="warm", base_model=str(model_dir), dataset={"path": str(dataset), "format": "text"},
                     training={"max_steps": 1}).model_dump(mode="json")
    doc = {"job_id": "warm", "attempt": 1, "spec": spec, "base_model": str(model_dir), "dataset": str(dataset),
           "eval_dataset": None, "continue_from": None, "resume_from": None,
           "output_dir": str(tmp_path / "out"), "checkpoint_dir": str(tmp_path / "ck")}
    path = tmp_path / "job.json"
    path.write_text(json.dumps(doc))
    return path, spec


def _gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_warm_runner_reports_like_a_cold_one(zygote, tmp_path, tiny_model_dir):
    job_file, spec = _job(tmp_path, tiny_model_dir, tmp_path / "missing.jsonl")
    proc = start_runner(job_file, spec, tmp_path)
    assert isinstance(proc, WarmRunner)
    assert os.getpgid(proc.pid) == proc.pid != os.getpgid(0)  # a session and process group of its own
    cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    assert "-m workers.runner" in cmdline and str(job_file) in cmdline  # ps shows it as the cold runner
    lines = list(proc.stdout)
    assert proc.wait(timeout=60) == 1
    errors = [json.loads(line[len("@@farm "):]) for line in lines if line.startswith("@@farm ")]
    assert errors[-1]["type"] == "error" and errors[-1]["code"] == "invalid_dataset", lines[-5:]


def test_cancel_kills_the_warm_runners_group_and_a_dead_zygote_takes_its_runners(zygote, tmp_path,
                                                                                 tiny_model_dir):
    from workers.child import kill_group

    fifo = tmp_path / "never.jsonl"
    os.mkfifo(fifo)  # reading the dataset blocks: the runner stays busy until it is killed
    job_file, spec = _job(tmp_path, tiny_model_dir, fifo)
    proc = start_runner(job_file, spec, tmp_path)
    with pytest.raises(Exception):
        proc.wait(timeout=1.0)
    kill_group(proc, grace=2)
    assert proc.wait(timeout=10) in (-signal.SIGTERM, -signal.SIGKILL)
    assert _gone(proc.pid)

    proc = start_runner(job_file, spec, tmp_path)
    time.sleep(0.5)
    os.kill(zygote.proc.pid, signal.SIGKILL)  # its runner gets SIGKILL from the kernel (parent-death signal)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while not _gone(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(proc.pid)
    assert Zygote.for_this_process() is not zygote  # a dead zygote is replaced on the next job


def test_cold_start_when_turned_off(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("FARM_WARM_START", "0")
    job_file, spec = _job(tmp_path, tiny_model_dir, tmp_path / "missing.jsonl")
    proc = start_runner(job_file, spec, tmp_path)
    assert not isinstance(proc, WarmRunner)
    proc.stdout.read()
    assert proc.wait(timeout=120) == 1


def test_cpu_slots_split_the_cores(monkeypatch):
    monkeypatch.setattr(launch, "_allowed_cpus", lambda: [0, 1, 2, 3])
    env = {"FARM_WORKER_KIND": "cpu", "FARM_HOST_CPU_SLOTS": "2"}
    assert cpu_share({**env, "FARM_WORKER_DEVICES": "0"}) == [0, 1]
    assert cpu_share({**env, "FARM_WORKER_DEVICES": "1"}) == [2, 3]
    assert cpu_share({**env, "FARM_HOST_CPU_SLOTS": "4", "FARM_WORKER_DEVICES": "2,3"}) == [2, 3]
    assert cpu_share({**env, "FARM_HOST_CPU_SLOTS": "8", "FARM_WORKER_DEVICES": "5"}) == [1]  # cores shared
    assert cpu_share({**env, "FARM_WORKER_DEVICES": "0", "FARM_WORKER_KIND": "gpu"}) is None
    assert cpu_share({"FARM_WORKER_KIND": "cpu", "FARM_WORKER_DEVICES": "0"}) is None  # host's count unknown
    monkeypatch.setattr(launch.os, "environ", {**env, "FARM_WORKER_DEVICES": "1"})
    _, run_env = launch.runner_command(__import__("pathlib").Path("job.json"), {"resources": {}})
    assert run_env["FARM_RUNNER_CPUS"] == "2,3" and run_env["OMP_NUM_THREADS"] == "2"


@pytest.fixture
def ready_zygote(zygote):
    """This process's zygote with its imports done (an earlier test may have killed the module's one)."""
    z = Zygote.for_this_process()
    z.wait_ready()
    return z


def _cpu_share_line(lines: list[str]) -> tuple[int, list[int]]:
    """(torch threads, cores) from the runner's `cpu share:` log line."""
    from workers.zygote import CPU_SHARE_LINE

    line = next(x for x in lines if x.startswith(CPU_SHARE_LINE))
    threads, cores = re.fullmatch(r"cpu share: (\d+) torch thread\(s\) on cores ([\d,]*)\n?", line).groups()
    return int(threads), [int(c) for c in cores.split(",") if c]


def test_each_cpu_slots_runner_gets_its_own_cores_and_as_many_threads(ready_zygote, tmp_path, tiny_model_dir,
                                                                      monkeypatch):
    if len(launch._allowed_cpus()) < 2:
        pytest.skip("one core: CPU slots share it")
    job_file, spec = _job(tmp_path, tiny_model_dir, tmp_path / "missing.jsonl")
    monkeypatch.setenv("FARM_WORKER_KIND", "cpu")
    monkeypatch.setenv("FARM_HOST_CPU_SLOTS", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "64")  # whatever the worker inherited, the slot's share wins
    got = {}
    for slot in (0, 1):
        monkeypatch.setenv("FARM_WORKER_DEVICES", str(slot))
        proc = start_runner(job_file, spec, tmp_path)
        assert isinstance(proc, WarmRunner)
        lines = list(proc.stdout)
        assert proc.wait(timeout=60) == 1
        got[slot] = _cpu_share_line(lines)
        threads, cores = got[slot]
        assert cores == cpu_share(dict(os.environ)) and threads == len(cores) >= 1
    assert not set(got[0][1]) & set(got[1][1])  # two slots never share a core
    assert sorted(got[0][1] + got[1][1]) == launch._allowed_cpus()


def test_a_cotraining_group_runner_is_forked_warm_with_its_control_channel(ready_zygote, tmp_path, tiny_model_dir,
                                                                          monkeypatch):
    from workers.child import kill_group
    from workers.launch import start_group_runner

    fifo = tmp_path / "never.jsonl"
    os.mkfifo(fifo)  # reading the dataset blocks: the group stays busy until it is killed
    job_file, spec = _job(tmp_path, tiny_model_dir, fifo)
    group_file = tmp_path / "group.json"
    group_file.write_text(json.dumps({"jobs": [json.loads(job_file.read_text())]}))
    monkeypatch.setenv("FARM_WORKER_KIND", "cpu")
    monkeypatch.setenv("FARM_HOST_CPU_SLOTS", "1")
    monkeypatch.setenv("FARM_WORKER_DEVICES", "0")
    proc = start_group_runner(group_file, spec, tmp_path)
    try:
        assert isinstance(proc, WarmRunner) and proc.stdin is not None
        assert os.getpgid(proc.pid) == proc.pid != os.getpgid(0)  # a session and process group of its own
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert "-m workers.cotrain_runner" in cmdline and str(group_file) in cmdline
        threads, cores = _cpu_share_line([proc.stdout.readline()])
        assert cores == launch._allowed_cpus() and threads == len(cores)
        # its stdin is the pipe we write control messages to
        assert os.readlink(f"/proc/{proc.pid}/fd/0") == f"pipe:[{os.fstat(proc.stdin.fileno()).st_ino}]"
    finally:
        kill_group(proc, grace=2)
    assert proc.wait(timeout=10) in (-signal.SIGTERM, -signal.SIGKILL)
    assert _gone(proc.pid)


def test_a_slot_takes_its_next_job_in_the_same_pool_process(farm_stack, tiny_model_dir, tmp_path):
    """The pool process is kept between jobs (no worker_max_tasks_per_child): queued jobs are claimed one after
    another by the same process, each once, instead of waiting for a fresh pool process at the pool's next check."""
    from farm import service
    from farm.catalog import repository as repo
    from farm.catalog.session import session_scope
    from farm.queue import celery_app
    from farm.tiny import write_dataset

    assert celery_app.conf.worker_max_tasks_per_child is None and celery_app.conf.worker_prefetch_multiplier == 1
    data = write_dataset(tmp_path / "chat.jsonl", "chat", n=16, seed=0)
    farm_stack.start_worker()
    ids = [service.submit_job({"kind": "train", "name": f"next{i}", "base_model": str(tiny_model_dir),
                               "dataset": {"path": str(data), "format": "chat"},
                               "training": {"max_steps": 1, "seed": i, "cotrain": False}},
                              settings=farm_stack.settings).id for i in range(3)]
    jobs = [service.wait_for_job(i, poll_seconds=0.1, timeout=300, settings=farm_stack.settings) for i in ids]
    assert [j.state for j in jobs] == ["succeeded"] * 3, farm_stack.worker_logs()
    with session_scope(farm_stack.settings.database_url) as session:
        workers = {repo.get_job(session, i).worker for i in ids}
        claims = [sum(1 for e in repo.job_events(session, i, 0, 1000) if e.type == "state" and e.state == "running")
                  for i in ids]
    assert len(workers) == 1, workers  # one pool process (its pid is in the worker name) took all three
    assert claims == [1, 1, 1]


def test_a_job_that_finds_the_zygote_importing_waits_for_it_renewing_its_lease(tmp_path, tiny_model_dir):
    """The worker just started: its zygote is still importing. A job that can renew its lease waits for the zygote
    (a cold start would redo the same imports on the same cores), renewing the lease meanwhile, and is forked warm;
    without a way to renew it, the job starts cold."""
    job_file, spec = _job(tmp_path, tiny_model_dir, tmp_path / "missing.jsonl")
    try:
        for keep_alive in (True, False):
            Zygote.discard()
            assert not Zygote.for_this_process().is_ready()  # torch alone takes seconds to import
            beats = []
            proc = start_runner(job_file, spec, tmp_path,
                                keep_alive=(lambda: beats.append(1), 0.05) if keep_alive else None)
            assert isinstance(proc, WarmRunner) is keep_alive
            assert bool(beats) is keep_alive  # it waited, and renewed the lease while it did
            proc.stdout.read()
            assert proc.wait(timeout=120) == 1  # the runner's own answer to a missing dataset, warm or cold
    finally:
        Zygote.discard()
