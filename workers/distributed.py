"""The launcher of a multi-process (DeepSpeed ZeRO) job: `python -m workers.distributed --nproc N JOB_FILE`.

It starts N ranks of `python -m workers.runner JOB_FILE` on this host, with RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and a free MASTER_PORT, and watches them. Why not torchrun or the deepspeed launcher:

- **Cancel kills every rank.** The ranks stay in the launcher's process group, which is the group the supervising
  task (workers/job_run.py) kills. torchrun starts each rank in a session of its own, so killing the group leaves
  the ranks running. Each rank also gets SIGKILL if the launcher dies (a worker killed with -9).
- **One failure ends the job at once, and says which.** When a rank exits with an error the others are stopped
  (they would wait in a collective until its timeout), and the launcher exits with the status of the rank that
  failed first. When that is not rank 0 (whose error, if any, is then only a broken collective), the launcher
  emits the `error` event: that rank's own error, or how it died (unless rank 0 reported the very same error).
- **Parseable output.** Each rank writes to its own pipe and the launcher relays whole lines: rank 0's unchanged
  (its `@@farm ` events), the others' prefixed with `[rank r] `, so they are log lines whatever they print.

CPU jobs (gpus: 0) run with DS_ACCELERATOR=cpu, the gloo backend, and OMP_NUM_THREADS set to each rank's share of
the worker's CPUs, so N ranks don't oversubscribe the cores. This module never imports torch: the Celery worker
imports it to build the command.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from farm.runner_protocol import EVENT_PREFIX, parse_line  # json only: this module's imports stay light
from workers.pdeathsig import die_with_parent  # ctypes only

GRACE_SECONDS = 5.0


def distributed_command(job_file: Path, spec: dict, ranks: int,
                        env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """argv and environment of a job's launcher, which runs `ranks` processes of workers.runner (see the module)."""
    env = dict(env)
    gpus = (spec.get("resources") or {}).get("gpus") or 0
    cpus = _available_cpus()
    share = max(1, cpus // ranks)
    if env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        share = min(share, int(env["OMP_NUM_THREADS"]))
    env["OMP_NUM_THREADS"] = str(share)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if gpus == 0:
        env.update(DS_ACCELERATOR="cpu", FARM_DIST_BACKEND="gloo", CUDA_VISIBLE_DEVICES="")
    else:
        env.pop("DS_ACCELERATOR", None)
        env.setdefault("FARM_DIST_BACKEND", "nccl")
    argv = [sys.executable, "-m", "workers.distributed", "--nproc", str(ranks), str(job_file)]
    return argv, env


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (chosen right before the ranks start, to keep the window small)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def rank_env(base: dict[str, str], rank: int, world: int, port: int) -> dict[str, str]:
    """The environment torch.distributed's env:// rendezvous reads, for one rank on this host."""
    return {**base, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "PYTHONUNBUFFERED": "1"}


def _same_error(a: dict | None, b: dict) -> bool:
    return a is not None and (a.get("code"), a.get("message")) == (b.get("code"), b.get("message"))


class Launcher:
    """Runs the ranks, relays their output, stops them all when one fails; `run()` returns the exit status."""

    def __init__(self, job_file: str, nproc: int, out=None):
        self.job_file = job_file
        self.nproc = nproc
        self.out = out or sys.stdout
        self.procs: list[subprocess.Popen] = []
        self.relays: list[threading.Thread] = []
        self.exited_at: dict[int, float] = {}
        self._lock = threading.Lock()
        self.rank_errors: dict[int, dict] = {}

    def _write(self, line: str) -> None:
        with self._lock:
            self.out.write(line if line.endswith("\n") else line + "\n")
            self.out.flush()

    def _relay(self, rank: int, stream) -> None:
        for line in stream:
            event = parse_line(line)
            if event is not None and event.get("type") == "error":
                self.rank_errors.setdefault(rank, event)
            self._write(line if rank == 0 else f"[rank {rank}] {line}")

    def start(self) -> None:
        port = free_port()
        base = dict(os.environ)
        for rank in range(self.nproc):
            proc = subprocess.Popen(
                [sys.executable, "-m", "workers.runner", self.job_file], env=rank_env(base, rank, self.nproc, port),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, bufsize=1,
                preexec_fn=die_with_parent)  # same process group as the launcher: cancel reaches every rank
            self.procs.append(proc)
            relay = threading.Thread(target=self._relay, args=(rank, proc.stdout), daemon=True)
            relay.start()
            self.relays.append(relay)
            threading.Thread(target=self._note_exit, args=(rank, proc), daemon=True).start()

    def _note_exit(self, rank: int, proc: subprocess.Popen) -> None:
        proc.wait()
        self.exited_at[rank] = time.monotonic()

    def stop_all(self, sig: int = signal.SIGTERM) -> None:
        """Signal every rank still running, then SIGKILL what is left after GRACE_SECONDS."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + GRACE_SECONDS
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def run(self) -> int:
        self.start()
        while True:
            codes = [p.poll() for p in self.procs]
            if any(c not in (None, 0) for c in codes):
                self.stop_all()
                break
            if all(c == 0 for c in codes):
                break
            time.sleep(0.2)
        for proc in self.procs:
            proc.wait()
        for relay in self.relays:  # the ranks' last lines (an error event, say) are written before we decide
            relay.join(timeout=GRACE_SECONDS)
        failed = [r for r, p in enumerate(self.procs) if p.returncode != 0]
        if not failed:
            return 0
        first = min(failed, key=lambda r: (self.exited_at.get(r, float("inf")), r))
        status = self.procs[first].returncode
        self._report_failure(first, status)
        return status if status > 0 else 128 - status

    def _report_failure(self, rank: int, status: int) -> None:
        """Emit the job's error event unless rank 0 already said why (see the module)."""
        event, said = self.rank_errors.get(rank), self.rank_errors.get(0)
        if said is not None and (rank == 0 or _same_error(event, said)):
            return  # rank 0 failed first, or every rank met the same error (a bad dataset, say)
        if event is not None:
            code, message = event.get("code", "runner_crashed"), f"rank {rank}: {event.get('message', '')}"
        else:
            how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
            code, message = "runner_crashed", (f"rank {rank} of {self.nproc} {how}; the other ranks were stopped "
                                               "(see the log lines)")
        self._write(EVENT_PREFIX + json.dumps({"type": "error", "code": code, "message": message},
                                              separators=(",", ":")))


def main(argv: list[str] | None = None) -> int:
    """Run the ranks of the job named on the command line; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m workers.distributed", description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, required=True, help="processes (ranks) to start on this host")
    parser.add_argument("job_file", help="the job.json the supervisor wrote")
    args = parser.parse_args(argv)
    if args.nproc < 1:
        parser.error("--nproc must be 1 or more")
    launcher = Launcher(args.job_file, args.nproc)

    def on_signal(signum, frame):
        # The ranks usually got the same signal (the whole group is signalled); make sure, then exit.
        launcher.stop_all(signal.SIGTERM)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return launcher.run()


if __name__ == "__main__":
    sys.exit(main())
