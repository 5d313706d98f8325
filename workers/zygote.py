"""A warm start for runners: a zygote process that imports torch, transformers and peft once and forks one runner
per job.

A cold runner spends seconds importing torch, transformers, peft and bitsandbytes before it reads its job; the
zygote pays that once per worker. It is a plain process (no Celery, no threads, no catalog or broker sockets)
started by the Celery pool process: `python -m workers.zygote` with one end of a Unix socket pair. For each job
the pool process sends a request (JSON: argv, env, cwd, CPU share) with two file descriptors, the write end of
the runner's output pipe and of a status pipe. The zygote forks; the child

- starts its own session (`setsid`: a process group of its own, killed as a group on cancel, like a cold runner),
- gets SIGKILL when the zygote dies (and the zygote gets it when the pool process dies), so no runner outlives
  its supervisor,
- takes the job's environment, folder, CPU affinity and thread count (its slot's share of the host, from
  workers/launch.py cpu_share), writes to the pipe as stdout and stderr, the first line saying what it got
  (`cpu share: 1 torch thread(s) on cores 1`),
- runs `workers.runner` on the job file (or `workers.cotrain_runner` on a co-training group's file, with a third
  descriptor, a pipe, as its stdin: the group's control channel) and leaves with `os._exit` as soon as its
  output is flushed: no interpreter teardown after `done`.

The zygote reaps its children and writes each one's exit status (Popen's convention: -N for signal N) to its
status pipe. CUDA is never touched in the zygote: torch is imported with the NVML-based availability check, and
the zygote refuses to fork (the pool process falls back to a cold start) if CUDA got initialised anyway.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import sys
import time
from pathlib import Path

# What every runner imports before it can read its job; a module that fails to import is skipped (the runner
# imports it itself, or does without). Never anything that initialises CUDA.
PRELOAD = (
    "torch",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "peft",
    "safetensors.torch",
    "bitsandbytes",
    "farm.training.run",
    "farm.training.model",
    "farm.training.data",
    "farm.training.loop",
    "farm.training.backend",
    "farm.training.checkpoint",
    "farm.training.environment",
    "farm.training.figures",
    "torch.utils.tensorboard",  # the artifact's TensorBoard log and loss plot (farm/training/figures.py) are
    "matplotlib.pyplot",  # written by every job: importing them cost each runner most of its `save` phase
    "farm.extraction.run",
    "farm.training.cotrain",
    "farm.training.cotrain_mix",
    "workers.runner",
    "workers.cotrain_runner",
    "setproctitle",
)
MAX_REQUEST = 1 << 20
RUNNERS = ("workers.runner", "workers.cotrain_runner")
"""The entry points a zygote child may run (`module` of a request): a job's runner or a co-training group's."""
STATUS = struct.Struct("!i")
CPU_SHARE_LINE = "cpu share:"
"""Opens the runner's first log line: `cpu share: T torch thread(s) on cores 0,1` (what it got, measured)."""


# ---------------------------------------------------------------------------------------------- in the zygote

def preload(modules=PRELOAD) -> dict[str, float]:
    """Import the runner's modules; seconds per module (for the phase breakdown)."""
    import importlib

    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # is_available() without creating a context
    os.environ.setdefault("MPLBACKEND", "Agg")  # no display on a worker (figures.plot_loss says the same)
    seconds = {}
    for name in modules:
        t = time.perf_counter()
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an optional package missing here is the runner's business
            continue
        seconds[name] = round(time.perf_counter() - t, 3)
    try:  # transformers' AutoModel machinery imports model classes lazily: resolve the mapping now
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass
    t = time.perf_counter()
    try:  # the first figure loads fonts and the renderer: draw one here, not in every job
        import tempfile

        from farm.training.figures import plot_loss

        with tempfile.TemporaryDirectory() as tmp:
            plot_loss([{"step": 1, "loss": 1.0}], Path(tmp) / "warm.png")
        seconds["figure"] = round(time.perf_counter() - t, 3)
    except Exception:  # noqa: BLE001 - no matplotlib here: the runner does without
        pass
    return seconds


def cuda_touched() -> bool:
    """True when CUDA was initialised in this process (forking it would hand children a broken context)."""
    torch = sys.modules.get("torch")
    try:
        return bool(torch is not None and torch.cuda.is_initialized())
    except Exception:  # noqa: BLE001
        return False


def _run_child(request: dict, out_fd: int, ctrl: socket.socket, status_fds: dict[int, int], started: int,
               in_fd: int | None = None) -> None:
    """In the forked child: become the job's runner (or the group's, with `in_fd` as its control stdin); never
    returns."""
    rc = 70
    try:
        os.setsid()
        _set_title(request.get("title"))  # before the zygote answers: whoever looks next sees a runner
        os.write(started, b"1")
        os.close(started)
        from workers.pdeathsig import die_with_parent

        die_with_parent()
        ctrl.close()
        for fd in status_fds.values():
            os.close(fd)
        source = os.open(os.devnull, os.O_RDONLY) if in_fd is None else in_fd
        os.dup2(source, 0)
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        os.close(source)
        os.close(out_fd)
        # Python's sys.stdout was made for the zygote's fd 1 (a pipe to nowhere now replaced): reopen line-buffered.
        sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
        sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
        sys.stdin = open(0, "r", encoding="utf-8", errors="replace", closefd=False)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        threads, cores = apply_cpu_share(request.get("cpus"), request.get("threads"))
        # a plain log line (the runner's log, not the catalog): what this runner may use of the host
        print(f"{CPU_SHARE_LINE} {threads} torch thread(s) on cores {','.join(map(str, cores or []))}", flush=True)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        import importlib

        module = request.get("module") or "workers.runner"
        if module not in RUNNERS:
            raise ValueError(f"not a runner: {module}")
        sys.argv = [module, *request["argv"]]
        rc = importlib.import_module(module).main(request["argv"])
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - report, then leave without unwinding into the zygote's loop
        import traceback

        traceback.print_exc()
        rc = 70
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc)


def _set_title(title: str | None) -> None:
    """Show the cold runner's command line (ps, psutil, /proc/PID/cmdline) instead of the zygote's."""
    if not title:
        return
    try:
        import setproctitle

        setproctitle.setproctitle(title)
    except ImportError:  # an optional nicety: without it the runner shows the zygote's command line
        pass


def apply_cpu_share(cpus: list[int] | None, threads: int | None) -> tuple[int | None, list[int] | None]:
    """Pin this process to `cpus` and size torch's thread pool to `threads` (each defaulting to the other).
    Returns what the process has then: torch's thread count (None without torch) and its CPU affinity."""
    if cpus:
        try:
            os.sched_setaffinity(0, cpus)
        except (AttributeError, OSError):
            pass
    if threads is None and cpus:
        threads = len(cpus)
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch = sys.modules.get("torch")
        if torch is not None:  # torch read OMP_NUM_THREADS when the zygote imported it: set its pool explicitly
            torch.set_num_threads(threads)
    torch = sys.modules.get("torch")
    try:
        affinity = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        affinity = None
    return (torch.get_num_threads() if torch is not None else None), affinity


def _recv_request(ctrl: socket.socket) -> tuple[dict | None, list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(ctrl, MAX_REQUEST, 4)
    if not data:
        return None, fds
    return json.loads(data), fds


def serve(ctrl: socket.socket) -> int:
    """The zygote's loop: fork a runner per request, report each child's exit status; return when the pool
    process closes its end."""
    status_fds: dict[int, int] = {}  # child pid -> write end of its status pipe
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    try:
        while True:
            ready, _, _ = select.select([ctrl, wake_r], [], [])
            if wake_r in ready:
                os.read(wake_r, 4096)
            _reap(status_fds)
            if ctrl not in ready:
                continue
            request, fds = _recv_request(ctrl)
            if request is None:
                return 0
            out_fd, status_fd = fds[0], fds[1]
            in_fd = fds[2] if len(fds) > 2 else None  # a group runner's control channel (its stdin)
            if cuda_touched() or (request.get("module") or "workers.runner") not in RUNNERS:
                why = "CUDA was initialised in the zygote" if cuda_touched() else "not a runner module"
                ctrl.sendall(json.dumps({"error": why}).encode() + b"\n")
                for fd in fds:
                    os.close(fd)
                continue
            started_r, started_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(started_r)
                _run_child(request, out_fd, ctrl, status_fds, started_w, in_fd)
            os.close(started_w)
            if in_fd is not None:
                os.close(in_fd)
            os.read(started_r, 1)  # the child has its own session now: only then may anyone kill "its group"
            os.close(started_r)
            os.close(out_fd)
            status_fds[pid] = status_fd
            ctrl.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    finally:
        for pid in list(status_fds):
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        _reap(status_fds, block=True)


def _reap(status_fds: dict[int, int], block: bool = False) -> None:
    while status_fds:
        try:
            pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        fd = status_fds.pop(pid, None)
        if fd is None:
            continue
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        try:
            os.write(fd, STATUS.pack(code))
        except OSError:
            pass
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    """`python -m workers.zygote FD`: FD is this process's end of the socket pair to the pool process."""
    argv = sys.argv[1:] if argv is None else argv
    ctrl = socket.socket(fileno=int(argv[0]))
    from workers.pdeathsig import die_with_parent

    die_with_parent()
    seconds = preload()
    ctrl.sendall(json.dumps({"ready": True, "preload_seconds": seconds, "cuda": cuda_touched()}).encode() + b"\n")
    return serve(ctrl)


if __name__ == "__main__":
    sys.exit(main())
