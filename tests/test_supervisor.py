"""The worker supervisor, with real processes and real signals.

The supervisor runs as a subprocess. Most tests give it a stand-in worker (a small Python script that records
its environment, starts a child in its own process group like a prefork pool child and one in a session of its
own like a training runner, then sleeps) so that they are fast and independent of the task module; one test
starts real Celery workers on the real Redis. A stand-in nvidia-smi plays a 4-GPU host.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from farm.errors import FarmError
from farm.settings import FarmSettings
from workers.device_lock import acquire_device_lock
from workers.supervisor import Slot, plan_slots, run_supervisor, worker_command

STANDIN_WORKER = r'''
import json, os, signal, subprocess, sys, time
mode = os.environ.get("STANDIN_MODE", "")
if mode == "crash":
    sys.exit(3)
if mode == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by the children below, across exec
sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
pool = subprocess.Popen(sleeper) if mode != "bare" else None
runner = subprocess.Popen(sleeper, start_new_session=True) if mode != "bare" else None
keys = ["CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "FARM_WORKER_DEVICES", "FARM_CPU_SLOTS", "FARM_WORKER_NODE",
        "FARM_BROKER_URL", "FARM_HOME", "FARM_HOST_CPU_SLOTS"]
record = {"pid": os.getpid(), "pgid": os.getpgrp(), "sid": os.getsid(0), "argv": sys.argv[1:],
          "pool": pool and pool.pid, "runner": runner and runner.pid, "env": {k: os.environ.get(k) for k in keys}}
out = os.path.join(os.environ["STANDIN_RECORDS"], f"{os.environ['FARM_WORKER_NODE']}.{os.getpid()}.json")
with open(out + ".tmp", "w") as f:
    json.dump(record, f)
os.rename(out + ".tmp", out)
while True:
    time.sleep(1)
'''

DRIVER = r'''
import json, sys
from farm.errors import FarmError
from farm.settings import FarmSettings
from workers.supervisor import RestartPolicy, run_supervisor, worker_command

args = json.loads(sys.argv[1])

def standin(slot, hostname, settings):
    _, env = worker_command(slot, hostname, settings)  # the real environment, a stand-in program
    env["STANDIN_MODE"] = args["mode"]
    return [sys.executable, args["standin"], slot.queue], env

try:
    code = run_supervisor(args.get("gpus"), args.get("cpus"), args.get("group", 1), FarmSettings(),
                          hostname="testhost", grace_seconds=args.get("grace", 5.0), command_factory=standin,
                          policy=RestartPolicy(initial_backoff=0.1, max_backoff=0.4, stable_after=30,
                                               max_rapid_restarts=3))
except FarmError as exc:
    print(f"error: {exc.message}", file=sys.stderr)
    code = 2
sys.exit(code)
'''

FOUR_GPUS = "".join(f"{i}, NVIDIA H100 80GB HBM3, GPU-{i}{i}{i}{i}\n" for i in range(4))


# ---- helpers ------------------------------------------------------------------------------------------------


def alive(pid: int | None) -> bool:
    """Whether a process exists and is not a zombie (read from /proc, so it sees non-children too)."""
    if not pid:
        return False
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return False
    return raw[raw.rfind(b")") + 2:].split()[0] != b"Z"


def wait_for(predicate, what: str, timeout: float = 30.0):
    """Poll until predicate() is truthy; fail naming `what` if it never is (a bound, not a timing assertion)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"never happened: {what}")


def descendants(pid: int) -> list[int]:
    """Every live descendant of pid (children, grandchildren, ...) from /proc."""
    parent_of = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                raw = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            parent_of[int(entry)] = int(raw[raw.rfind(b")") + 2:].split()[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parent_of.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


class Farm:
    """One test's host: a FARM_HOME, a 4-GPU nvidia-smi on PATH, the stand-in worker, supervisors started."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.records = tmp_path / "records"
        self.records.mkdir()
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        smi = bin_dir / "nvidia-smi"
        smi.write_text(f"#!{sys.executable}\nimport sys\nsys.stdout.write({FOUR_GPUS!r})\n")
        smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
        (tmp_path / "standin.py").write_text(STANDIN_WORKER)
        (tmp_path / "driver.py").write_text(DRIVER)
        self.env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FARM_HOME=str(tmp_path / "home"),
                        STANDIN_RECORDS=str(self.records), FARM_BROKER_URL="redis://127.0.0.1:6379/15")
        self.procs: list[subprocess.Popen] = []

    def supervisor(self, mode: str = "", **args) -> subprocess.Popen:
        args.update(mode=mode, standin=str(self.tmp / "standin.py"))
        log = open(self.tmp / f"supervisor{len(self.procs)}.log", "w")
        proc = subprocess.Popen([sys.executable, str(self.tmp / "driver.py"), json.dumps(args)], env=self.env,
                                cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT)
        proc.log_path = log.name
        self.procs.append(proc)
        return proc

    def log(self, proc) -> str:
        return Path(proc.log_path).read_text()

    def workers(self, node: str | None = None) -> list[dict]:
        """Records of the stand-in workers started so far (of one node name if given), oldest first."""
        out = []
        for path in sorted(self.records.glob("*.json"), key=lambda p: p.stat().st_mtime_ns):
            record = json.loads(path.read_text())
            if node is None or record["env"]["FARM_WORKER_NODE"] == node:
                out.append(record)
        return out

    def wait_workers(self, count: int) -> list[dict]:
        return wait_for(lambda: len(self.workers()) >= count and self.workers(), f"{count} workers recorded")

    def every_pid(self) -> list[int]:
        return [p for r in self.workers() for p in (r["pid"], r["pool"], r["runner"]) if p]

    def cleanup(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for pid in self.every_pid():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def farm(tmp_path):
    f = Farm(tmp_path)
    yield f
    f.cleanup()


def stop(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 30.0) -> int:
    proc.send_signal(sig)
    return proc.wait(timeout=timeout)


# ---- planning and command lines ------------------------------------------------------------------------------


def test_slots_are_groups_of_consecutive_devices_each_with_its_queue():
    assert [(s.name, s.queue, s.indexes) for s in plan_slots("gpu", [0, 1, 2, 3], 1)] == [
        ("gpu0", "farm.gpu.1", (0,)), ("gpu1", "farm.gpu.1", (1,)), ("gpu2", "farm.gpu.1", (2,)),
        ("gpu3", "farm.gpu.1", (3,))]
    assert [(s.name, s.queue) for s in plan_slots("gpu", [0, 1, 2, 3], 2)] == [("gpu0-1", "farm.gpu.2"),
                                                                               ("gpu2-3", "farm.gpu.2")]
    assert [(s.name, s.queue) for s in plan_slots("gpu", [0, 1, 2, 3], 4)] == [("gpu0-3", "farm.gpu.4")]
    assert [(s.name, s.queue) for s in plan_slots("gpu", [0, 2, 4, 6], 2)] == [("gpu0_2", "farm.gpu.2"),
                                                                               ("gpu4_6", "farm.gpu.2")]
    assert [(s.name, s.queue) for s in plan_slots("cpu", [0, 1], 1)] == [("cpu0", "farm.cpu"), ("cpu1", "farm.cpu")]
    assert [(s.name, s.queue) for s in plan_slots("cpu", [0, 1], 2)] == [("cpu0-1", "farm.cpu.2")]


@pytest.mark.parametrize("kind, indexes, group, message", [
    ("gpu", [0, 1, 2, 3], 3, "--group 3 does not divide the 4 GPUs selected (0,1,2,3): each worker owns exactly 3"),
    ("cpu", [0, 1, 2], 2, "--group 2 does not divide the 3 CPU slots selected (0,1,2)"),
    ("gpu", [0, 1], 0, "--group 0: a worker needs at least one device"),
    ("gpu", [], 1, "no GPU selected"),
    ("gpu", [1, 1], 1, "a device is listed twice"),
    ("tpu", [0], 1, "device kind 'tpu' is unknown"),
])
def test_bad_plans_are_refused_with_the_reason(kind, indexes, group, message):
    with pytest.raises(FarmError) as err:
        plan_slots(kind, indexes, group)
    assert message in err.value.message


def test_worker_command_pins_a_gpu_group():
    settings = FarmSettings(broker_url="redis://broker.example:6379/3", api_token="s3cret-token")
    argv, env = worker_command(Slot("gpu", (4, 5, 6, 7)), "hostA", settings)
    assert argv == [sys.executable, "-m", "celery", "-A", "workers.tasks", "worker", "-P", "prefork",
                    "--concurrency", "1", "-Q", "farm.gpu.4", "-n", "gpu4-7@hostA", "--loglevel", "INFO", "-E"]
    assert env["CUDA_VISIBLE_DEVICES"] == "4,5,6,7" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["FARM_WORKER_DEVICES"] == "4,5,6,7" and env["FARM_WORKER_NODE"] == "gpu4-7@hostA"
    assert "FARM_CPU_SLOTS" not in env
    assert env["FARM_BROKER_URL"] == "redis://broker.example:6379/3"  # the worker sees its supervisor's settings
    assert "s3cret-token" not in json.dumps(env)


def test_worker_command_for_cpu_slots_hides_gpus():
    argv, env = worker_command(Slot("cpu", (0, 1)), "hostA", FarmSettings(), app="farm.queue:celery_app")
    assert argv[argv.index("-A") + 1] == "farm.queue:celery_app"
    assert argv[argv.index("-Q") + 1] == "farm.cpu.2" and argv[argv.index("-n") + 1] == "cpu0-1@hostA"
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["FARM_CPU_SLOTS"] == "2" and env["FARM_WORKER_DEVICES"] == "0,1"
    _, single = worker_command(Slot("cpu", (1,)), "hostA", FarmSettings())
    assert single["FARM_CPU_SLOTS"] == "1"


@pytest.mark.parametrize("gpus, cpus, group, message", [
    (None, None, 1, "say which devices to serve: --gpus all|0,1,... or --cpus N"),
    ("all", 2, 1, "say which devices to serve"),
    (None, 0, 1, "--cpus 0: give at least 1 CPU slot"),
    (None, 2, 16, "--group 16 is above FARM_MAX_GROUP_SIZE=8"),
    ("all", None, 1, "--gpus all: no GPU found on this host ("),
    ("0,1", None, 1, "no GPU found on this host"),
])
def test_run_supervisor_refuses_bad_requests_before_starting_anything(tmp_path, monkeypatch, gpus, cpus, group,
                                                                       message):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi here: a host without GPUs
    with pytest.raises(FarmError) as err:
        run_supervisor(gpus, cpus, group, FarmSettings(home=tmp_path / "home"))
    assert message in err.value.message
    if gpus and not cpus:
        assert "use --cpus N (or --cpu)" in err.value.message
    assert not (tmp_path / "home" / "locks").exists() or not any((tmp_path / "home" / "locks").iterdir())


@pytest.mark.parametrize("args, message", [
    (["--cpus", "0"], "--cpus 0: give at least 1 CPU slot"),
    (["--cpus", "-2"], "--cpus -2: give at least 1 CPU slot"),
    ([], "say which devices"),
])
def test_farm_worker_refuses_bad_device_options_in_one_line(tmp_path, args, message):
    out = subprocess.run([str(Path(sys.executable).parent / "farm"), "worker", *args], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "FARM_HOME": str(tmp_path / "home")})
    assert out.returncode != 0 and message in out.stdout + out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "home" / "locks").exists()  # nothing started, no device locked


# ---- supervising real processes --------------------------------------------------------------------------------


def test_each_gpu_gets_its_own_pinned_worker_and_sigterm_leaves_no_process(farm):
    sup = farm.supervisor(gpus="all")
    workers = farm.wait_workers(4)
    by_node = {w["env"]["FARM_WORKER_NODE"]: w for w in workers}
    assert sorted(by_node) == ["gpu0@testhost", "gpu1@testhost", "gpu2@testhost", "gpu3@testhost"]
    for k in range(4):
        w = by_node[f"gpu{k}@testhost"]
        assert w["env"]["CUDA_VISIBLE_DEVICES"] == w["env"]["FARM_WORKER_DEVICES"] == str(k)
        assert w["env"]["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID" and w["env"]["FARM_CPU_SLOTS"] is None
        assert w["argv"] == ["farm.gpu.1"]
        assert w["sid"] == w["pgid"] == w["pid"]  # each worker leads a session of its own
        assert w["env"]["FARM_HOME"] == str(farm.tmp / "home")
        lock = json.loads((farm.tmp / "home" / "locks" / f"gpu{k}.lock").read_text())
        assert lock["supervisor_pid"] == sup.pid and lock["worker_pid"] == w["pid"]
    pids = farm.every_pid()
    assert len(pids) == 12 and all(alive(p) for p in pids)

    assert stop(sup) == 0
    assert [p for p in pids if alive(p)] == []  # workers, their pool children, and their runners
    assert "all workers stopped" in farm.log(sup)
    acquire_device_lock(farm.tmp / "home" / "locks", "gpu", 0).release()  # the locks went with it


@pytest.mark.parametrize("mode", ["", "ignore-term"])
def test_a_killed_worker_is_restarted_and_what_it_left_is_killed(farm, mode):
    sup = farm.supervisor(mode=mode, cpus=2, grace=1.0)
    farm.wait_workers(2)
    first = farm.workers("cpu0@testhost")[0]
    other = farm.workers("cpu1@testhost")[0]
    assert first["env"]["CUDA_VISIBLE_DEVICES"] == "" and first["env"]["FARM_CPU_SLOTS"] == "1"
    assert first["argv"] == ["farm.cpu"]
    # each CPU worker knows how many slots share the host, so its runners take their share of the cores
    assert first["env"]["FARM_HOST_CPU_SLOTS"] == other["env"]["FARM_HOST_CPU_SLOTS"] == "2"

    os.kill(first["pid"], signal.SIGKILL)
    second = wait_for(lambda: (farm.workers("cpu0@testhost") + [None])[1], "cpu0 restarted")
    assert second["pid"] != first["pid"] and second["env"] == first["env"]
    # its pool child dies with its process group; its runner, in a session of its own, is killed once adopted
    wait_for(lambda: not alive(first["pool"]) and not alive(first["runner"]), "the dead worker's children killed")
    assert alive(other["pid"]) and len(farm.workers("cpu1@testhost")) == 1  # the other worker was left alone
    log = farm.log(sup)
    assert "worker cpu0@testhost (pid %d) was killed by SIGKILL" % first["pid"] in log
    assert "restarting worker cpu0@testhost in 0.1 s (rapid restart 1 of 3)" in log
    assert "outlived the worker that started it" in log
    if mode == "ignore-term":
        assert "ignored SIGTERM for 1 s: SIGKILL" in log

    assert stop(sup) == 0
    assert [p for p in farm.every_pid() if alive(p)] == []


def test_workers_that_ignore_sigterm_are_killed_after_the_grace_period(farm):
    sup = farm.supervisor(mode="ignore-term", gpus="0,1", group=2, grace=1.0)
    (worker,) = farm.wait_workers(1)
    assert worker["env"]["FARM_WORKER_NODE"] == "gpu0-1@testhost" and worker["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert worker["argv"] == ["farm.gpu.2"]
    pids = farm.every_pid()
    assert stop(sup) == 0
    assert [p for p in pids if alive(p)] == []
    assert "still running after the grace period: SIGKILL" in farm.log(sup)


def test_a_second_stop_request_skips_the_grace_period(farm):
    sup = farm.supervisor(mode="ignore-term", cpus=1, grace=600.0)
    farm.wait_workers(1)
    pids = farm.every_pid()
    sup.send_signal(signal.SIGINT)  # Ctrl-C, then Ctrl-C again
    wait_for(lambda: "stop requested" in farm.log(sup), "the first request noticed")
    assert stop(sup, signal.SIGINT) == 0
    assert "still running and stop was asked twice: SIGKILL" in farm.log(sup)
    assert [p for p in pids if alive(p)] == []


def test_a_worker_that_keeps_dying_at_start_is_given_up(farm):
    sup = farm.supervisor(mode="crash", cpus=1)
    assert sup.wait(timeout=30) == 1
    log = farm.log(sup)
    assert log.count("started worker cpu0@testhost") == 4  # the first start and 3 rapid restarts
    assert "worker cpu0@testhost died 4 times in a row within 30 s of starting: giving up on CPU slot 0" in log
    assert "every worker slot was given up" in log


def test_a_second_supervisor_on_a_taken_device_is_refused(farm):
    first = farm.supervisor(gpus="0,1")
    farm.wait_workers(2)
    second = farm.supervisor(gpus="2,1")
    assert second.wait(timeout=30) == 2
    log = farm.log(second)
    assert f"GPU 1 is already taken by the worker supervisor with pid {first.pid} (worker gpu1@testhost)" in log
    assert "started worker" not in log and len(farm.workers()) == 2
    acquire_device_lock(farm.tmp / "home" / "locks", "gpu", 2).release()  # the refused one holds nothing
    assert stop(first) == 0


def test_workers_get_sigterm_when_the_supervisor_is_killed_outright(farm):
    sup = farm.supervisor(mode="bare", cpus=2)
    workers = farm.wait_workers(2)
    stop(sup, signal.SIGKILL)
    wait_for(lambda: not any(alive(w["pid"]) for w in workers), "workers of a killed supervisor exit")


# ---- real Celery workers on the real Redis -----------------------------------------------------------------------


def test_real_celery_workers_come_up_pinned_with_distinct_names(farm, redis_url, sqlite_url):
    # workers.tasks once the task module exists; the bare app otherwise (same worker command, no task bodies)
    app = "workers.tasks" if importlib.util.find_spec("workers.tasks") else "farm.queue:celery_app"
    host = f"t{uuid.uuid4().hex[:8]}"
    env = dict(farm.env, FARM_BROKER_URL=redis_url, FARM_DATABASE_URL=sqlite_url,
               FARM_STORE_URL=f"file://{farm.tmp / 'store'}")
    log = open(farm.tmp / "celery.log", "w")
    sup = subprocess.Popen([sys.executable, "-m", "workers.supervisor", "--gpus", "all", "--group", "2", "--app", app,
                            "--hostname", host, "--grace", "20"], env=env, cwd=farm.tmp, stdout=log,
                           stderr=subprocess.STDOUT)
    farm.procs.append(sup)
    from farm.queue import make_celery_app

    client = make_celery_app(FarmSettings(broker_url=redis_url))
    nodes = [f"gpu0-1@{host}", f"gpu2-3@{host}"]
    try:
        def all_answer():
            if sup.poll() is not None:
                pytest.fail(f"supervisor exited {sup.returncode}:\n{(farm.tmp / 'celery.log').read_text()[-3000:]}")
            replies = client.control.inspect(destination=nodes, timeout=1.0).stats() or {}
            return replies if set(replies) == set(nodes) else None

        stats = wait_for(all_answer, "both Celery workers answer inspect().stats()", timeout=90)
        visible = {}
        for node, info in stats.items():
            environ = Path(f"/proc/{info['pid']}/environ").read_bytes().split(b"\0")
            env_of = dict(e.decode().split("=", 1) for e in environ if b"=" in e)
            visible[node] = env_of["CUDA_VISIBLE_DEVICES"]
            assert env_of["FARM_WORKER_NODE"] == node
            assert info["pool"]["max-concurrency"] == 1
        assert visible == {f"gpu0-1@{host}": "0,1", f"gpu2-3@{host}": "2,3"}
        queues = client.control.inspect(destination=nodes, timeout=2.0).active_queues()
        assert {node: [q["name"] for q in qs] for node, qs in queues.items()} == {n: ["farm.gpu.2"] for n in nodes}
        everything = descendants(sup.pid)
        assert len(everything) >= 4  # two workers and their pool children
    finally:
        client.close()
    assert stop(sup, timeout=60) == 0
    assert [p for p in everything if alive(p)] == []
