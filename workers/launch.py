"""How a job's runner starts: forked warm from the worker's zygote, or as a fresh process; one process, or N ranks.

`start_runner` is what the supervising task calls. A single-device job is forked from the zygote
(workers/zygote.py: torch, transformers and peft already imported) in a session of its own, so cancel still kills
its whole group; a multi-device job, a zygote that cannot be had, or FARM_WARM_START=0 gets the cold path:
`python -m workers.runner JOB_FILE` (or the DeepSpeed launcher). Either way the handle looks like a Popen.
`start_group_runner` does the same for a co-training group's runner (workers/cotrain_runner.py), whose stdin is a
pipe for its control messages: a group forked warm skips seconds of imports, as a job does.

CPU slots that share a host share its cores: the worker of CPU slot k of N (FARM_WORKER_KIND=cpu,
FARM_WORKER_DEVICES, FARM_HOST_CPU_SLOTS, which the supervisor sets) gives its runner the k-th N-th of the cores
this process may use, as CPU affinity (FARM_RUNNER_CPUS) and as the thread count (OMP_NUM_THREADS, and torch's pool
in a forked runner), so two runners never fight over one core.

This module never imports torch: the Celery pool process imports it.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from workers.zygote import STATUS

KeepAlive = tuple[Callable[[], object], float]
"""(renew the claim's lease, seconds between renewals): what a job waiting for its runner to start calls."""

READY_TIMEOUT_S = 600.0  # the zygote's imports; a cold start would pay the same
ZYGOTE_WAIT_S = 120.0
"""How long a job waits for a zygote still importing (its worker just started) before it starts cold. What is left
of the zygote's imports is never more than a cold runner's whole start-up, which would also compete with them for
the cores; the wait renews the job's lease (`keep_alive`), so a claim is never held silent."""


def _allowed_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def cpu_share(env: dict[str, str]) -> list[int] | None:
    """The cores of this worker's CPU slot(s), or None when the worker is not a CPU slot or the host's slot count
    is unknown. Slot k of N gets cores [k*C/N, (k+1)*C/N) of the C this process may use (at least one)."""
    if env.get("FARM_WORKER_KIND") != "cpu":
        return None
    try:
        total = int(env.get("FARM_HOST_CPU_SLOTS", ""))
        mine = [int(i) for i in env.get("FARM_WORKER_DEVICES", "").split(",") if i.strip()]
    except ValueError:
        return None
    if total < 1 or not mine or max(mine) >= total:
        return None
    cpus = _allowed_cpus()
    if total > len(cpus):  # more slots than cores: slots share cores round-robin
        return sorted({cpus[i % len(cpus)] for i in mine})
    per = len(cpus) / total
    return sorted({c for i in mine for c in cpus[round(i * per):round((i + 1) * per)]})


def runner_command(job_file: Path, spec: dict) -> tuple[list[str], dict[str, str]]:
    """argv and environment of the runner child process for this job (the cold path)."""
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["FARM_LAUNCHED_AT"] = repr(time.time())  # the runner reports its start-up time (farm.training.run timings)
    share = cpu_share(env)
    if share:
        env["FARM_RUNNER_CPUS"] = ",".join(map(str, share))
        env["OMP_NUM_THREADS"] = str(len(share))
    resources = spec.get("resources", {})
    ranks = resources.get("gpus") or resources.get("cpu_slots") or 1
    if ranks > 1:
        from workers.distributed import distributed_command  # DeepSpeed / torchrun launcher

        return distributed_command(job_file, spec, ranks, env)
    return [sys.executable, "-m", "workers.runner", str(job_file)], env


def _pin_cold_child(cpus: list[int] | None):
    from workers.pdeathsig import die_with_parent

    def preexec() -> None:
        die_with_parent()
        if cpus:
            try:
                os.sched_setaffinity(0, cpus)
            except OSError:
                pass

    return preexec


def warm_start_enabled(spec: dict) -> bool:
    """Single-device jobs on Linux, unless FARM_WARM_START=0."""
    resources = spec.get("resources", {})
    ranks = resources.get("gpus") or resources.get("cpu_slots") or 1
    flag = os.environ.get("FARM_WARM_START", "1").strip().lower()
    return ranks == 1 and sys.platform.startswith("linux") and flag not in ("0", "false", "no", "off")


def start_runner(job_file: Path, spec: dict, cwd: Path, keep_alive: KeepAlive | None = None):
    """Start the job's runner in its own session; a Popen (cold) or a WarmRunner (forked by the zygote).

    Its stdout (text, line-buffered) carries the runner's events and log lines, stderr included. `keep_alive`
    (callable, seconds between calls): while the zygote finishes its imports, renew the job's lease with it; without
    it a job that finds the zygote importing starts cold.
    """
    argv, env = runner_command(job_file, spec)
    return _start(argv, [str(job_file)], env, spec, cwd, module="workers.runner", control=False,
                  keep_alive=keep_alive)


def start_group_runner(group_file: Path, spec: dict, cwd: Path, keep_alive: KeepAlive | None = None):
    """Start a co-training group's runner (workers/cotrain_runner.py) in its own session, stdin a pipe for its
    control messages: forked warm from the zygote like a job's runner when it can be, else a fresh process. Same
    CPU share and `keep_alive` as a job's runner; a Popen or a WarmRunner."""
    _, env = runner_command(group_file, spec)
    argv = [sys.executable, "-m", "workers.cotrain_runner", str(group_file)]
    return _start(argv, [str(group_file)], env, spec, cwd, module="workers.cotrain_runner", control=True,
                  keep_alive=keep_alive)


def _await_zygote(zygote: "Zygote", keep_alive: KeepAlive | None) -> bool:
    """Whether the zygote is (or becomes, within ZYGOTE_WAIT_S) ready to fork; renews the lease while it waits."""
    if zygote.is_ready():
        return True
    if keep_alive is None or zygote.ready is not None:  # nobody renews the lease, or it answered: unusable
        return False
    beat, every = keep_alive
    deadline = time.monotonic() + ZYGOTE_WAIT_S
    next_beat = time.monotonic() + every
    while zygote.proc.poll() is None and time.monotonic() < deadline:
        select.select([zygote.sock], [], [], max(0.0, min(next_beat, deadline) - time.monotonic()))
        if zygote.is_ready():
            return True
        if zygote.ready is not None:  # it answered, and cannot fork (CUDA was touched)
            return False
        if time.monotonic() >= next_beat:
            beat()  # a reason to stop (a cancel) is the watch loop's business, right after the start
            next_beat = time.monotonic() + every
    return False


def _start(argv: list[str], runner_args: list[str], env: dict[str, str], spec: dict, cwd: Path, *, module: str,
           control: bool, keep_alive: KeepAlive | None = None):
    """Fork `module` with `runner_args` from the zygote when it can be, else run `argv` cold; `control`: its stdin
    is a pipe for control messages (else /dev/null). Either way in its own session with its CPU share."""
    cpus = [int(c) for c in env["FARM_RUNNER_CPUS"].split(",")] if env.get("FARM_RUNNER_CPUS") else None
    if warm_start_enabled(spec):
        zygote = Zygote.for_this_process()
        if zygote is not None and _await_zygote(zygote, keep_alive):
            try:
                runner = zygote.spawn(runner_args, env, cwd, cpus, title=" ".join(argv), module=module,
                                      stdin=control)
                runner.args = argv  # what a cold start would have run, for the log
                return runner
            except (OSError, ValueError, RuntimeError):
                Zygote.discard()
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.PIPE if control else subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=_pin_cold_child(cpus), env=env, cwd=cwd, text=True, bufsize=1)


class WarmRunner:
    """A runner forked by the zygote, with the parts of Popen the supervisor uses (pid, stdout, stdin, poll,
    wait)."""

    def __init__(self, pid: int, stdout, status_fd: int, args: list[str]):
        self.pid = pid
        self.stdout = stdout
        self.stdin = None  # a group runner's control channel (Zygote.spawn(stdin=True))
        self.args = args
        self.returncode: int | None = None
        self._status_fd = status_fd
        self._lock = threading.Lock()

    def _collect(self, timeout: float | None) -> int | None:
        with self._lock:
            if self.returncode is not None:
                return self.returncode
            ready, _, _ = select.select([self._status_fd], [], [], timeout)
            if not ready:
                return None
            data = os.read(self._status_fd, STATUS.size)
            # The zygote vanished without a word: its runner got SIGKILL with it (parent-death signal).
            self.returncode = STATUS.unpack(data)[0] if len(data) == STATUS.size else -9
            os.close(self._status_fd)
            return self.returncode

    def poll(self) -> int | None:
        return self._collect(0)

    def wait(self, timeout: float | None = None) -> int:
        code = self._collect(timeout)
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        import signal

        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        import signal

        self.send_signal(signal.SIGKILL)


class Zygote:
    """The pool process's zygote (one per process, started on first use, restarted if it died)."""

    _instance: "Zygote | None" = None
    _guard = threading.Lock()

    def __init__(self):
        from workers.pdeathsig import die_with_parent

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTORCH_NVML_BASED_CUDA_CHECK="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "workers.zygote", str(theirs.fileno())],
                                     pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=die_with_parent, env=env,
                                     cwd=str(Path(__file__).resolve().parents[1]))
        theirs.close()
        self.sock = ours
        self.replies = ours.makefile("rb")
        self.ready: dict | None = None
        self.lock = threading.Lock()

    @classmethod
    def for_this_process(cls) -> "Zygote | None":
        """The running zygote, starting one if none runs; None when it cannot start."""
        with cls._guard:
            z = cls._instance
            if z is not None and z.proc.poll() is not None:
                z, cls._instance = None, None
            if z is None:
                try:
                    z = cls._instance = Zygote()
                except OSError:
                    return None
            return z

    @classmethod
    def discard(cls) -> None:
        with cls._guard:
            z, cls._instance = cls._instance, None
        if z is not None:
            z.close()

    def _reply(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        line = self.replies.readline() if ready else b""
        if not line:
            raise RuntimeError("the zygote did not answer")
        return json.loads(line)

    def is_ready(self) -> bool:
        """Whether the zygote has finished its imports (never waits)."""
        if self.ready is None:
            ready, _, _ = select.select([self.sock], [], [], 0)
            if not ready:
                return False
            try:
                self.wait_ready(timeout=0)
            except (RuntimeError, ValueError, OSError):
                return False
        return not self.ready.get("cuda")

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> dict:
        """The zygote's hello (its preload seconds per module), once it has imported everything."""
        if self.ready is None:
            self.ready = self._reply(timeout)
            if self.ready.get("cuda"):
                raise RuntimeError("CUDA was initialised in the zygote; runners start cold")
        return self.ready

    def spawn(self, argv: list[str], env: dict[str, str], cwd: Path, cpus: list[int] | None,
              title: str | None = None, module: str = "workers.runner", stdin: bool = False) -> WarmRunner:
        """Fork a runner for `argv` (the runner's arguments) with this environment, folder, CPU share and process
        title (what ps shows: the cold runner's command line). `module`: workers.runner (a job) or
        workers.cotrain_runner (a co-training group); `stdin`: give it a pipe as stdin (the runner's `stdin`, a
        text stream) instead of /dev/null."""
        with self.lock:
            self.wait_ready()
            out_r, out_w = os.pipe()
            status_r, status_w = os.pipe()
            in_r, in_w = os.pipe() if stdin else (None, None)
            ours = [fd for fd in (out_r, status_r, in_w) if fd is not None]
            theirs = [fd for fd in (out_w, status_w, in_r) if fd is not None]
            try:
                request = {"argv": argv, "env": env, "cwd": str(cwd), "cpus": cpus, "title": title,
                           "module": module,
                           "threads": int(env["OMP_NUM_THREADS"]) if env.get("OMP_NUM_THREADS", "").isdigit()
                           else None}
                socket.send_fds(self.sock, [json.dumps(request).encode()], theirs)
            except OSError:
                for fd in ours + theirs:
                    os.close(fd)
                raise
            for fd in theirs:
                os.close(fd)
            reply = self._reply(30.0)
            if "pid" not in reply:
                for fd in ours:
                    os.close(fd)
                raise RuntimeError(reply.get("error", "the zygote refused"))
            stdout = open(out_r, "r", buffering=1, encoding="utf-8", errors="replace")
            runner = WarmRunner(reply["pid"], stdout, status_r, ["workers.zygote", *argv])
            if in_w is not None:
                runner.stdin = open(in_w, "w", buffering=1, encoding="utf-8")
            return runner

    def close(self) -> None:
        try:
            self.sock.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
