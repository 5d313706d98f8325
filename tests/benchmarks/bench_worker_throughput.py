"""Throughput of `farm worker --cpus 2`: N tiny jobs submitted at once against N x one job's wall / 2 slots.

    .venv/bin/python tests/benchmarks/bench_worker_throughput.py [--jobs 60] [--steps 12]
        [--cotrain | --no-cotrain]

Starts one farm (Redis db FARM_TEST_E2E_REDIS_DB, a SQLite catalog, a file store) and a real `farm worker --cpus 2`
(the CLI process: supervisor, two pinned Celery workers, the reaper), with the stack's environment minus
OMP_NUM_THREADS, so each slot's runner takes the share of cores the worker gives it. Then

1. baseline: one tiny 12-step 4-bit job alone on that worker, submit -> published wall (3 before the batch and 2
   after it, one median: the shared machine drifts), and the plain user script (tests/benchmarks/plain_qlora.py)
   in a fresh process with one slot's thread count, for context;
2. N jobs submitted at once through the service layer; makespan = first submit -> last published (catalog).

Wall time on a shared machine swings with the neighbours' load, so it also prints CPU seconds per job of the
worker's whole process tree (supervisor, Celery workers, zygotes, runners), alone and in the batch.

Prints makespan, jobs/min, the ratio to the ideal N x single / 2 (goal <= 1.1), each slot's idle gaps (a slot's
jobs all finished -> its next claim, from catalog events and the job's worker), per-phase medians from the
adapters' provenance timings, how many jobs were co-trained (provenance `cotraining` group sizes), and how many
runners started cold (the worker log). `--no-cotrain` sets `training.cotrain: false` on every job.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

PHASES = ("startup", "hash", "data", "load", "train", "save", "total")
SLOTS = 2


# ------------------------------------------------------------------------------------------------- the worker

def start_farm_worker(stack, slots: int = SLOTS) -> subprocess.Popen:
    """`farm worker --cpus N` in its own session, logging to root/farm-worker.log; returns once every slot's
    worker answers a ping and its zygote has finished importing."""
    from farm.queue import app_for

    env = {k: v for k, v in stack.env.items() if k != "OMP_NUM_THREADS"}
    log = (stack.root / "farm-worker.log").open("ab")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "farm"), "worker", "--cpus", str(slots)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=ROOT,
                            start_new_session=True)
    app = app_for(stack.settings)
    deadline = time.monotonic() + 180
    want = {f"cpu{i}@" for i in range(slots)}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"farm worker exited with {proc.returncode}:\n{worker_log(stack)[-3000:]}")
        names = {next(iter(r)) for r in (app.control.ping(timeout=0.5) or [])}
        if all(any(n.startswith(w) for n in names) for w in want):
            break
    else:
        stop_farm_worker(proc)
        raise SystemExit(f"farm worker's slots did not answer a ping:\n{worker_log(stack)[-3000:]}")
    _wait_zygotes_idle(proc.pid, slots)
    return proc


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(c) for t in os.listdir(f"/proc/{p}/task")
                    for c in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
        except OSError:
            continue
        out += kids
        todo += kids
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _cpu_ticks(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return 0
    fields = stat[stat.rfind(b")") + 2:].split()
    return int(fields[11]) + int(fields[12])


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds used by the process tree under `pid` (itself included), reaped descendants included: each live
    process's own time plus its reaped children's (runners are reaped by their zygote, workers by the supervisor)."""
    total = 0
    for p in [pid, *_descendants(pid)]:
        try:
            stat = Path(f"/proc/{p}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        total += sum(int(f) for f in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")


def _wait_zygotes_idle(supervisor_pid: int, slots: int, timeout: float = 120) -> None:
    """Until `slots` zygotes run and none used CPU for a second (their imports are done)."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        zygotes = [p for p in _descendants(supervisor_pid) if "workers.zygote" in _cmdline(p)]
        ticks = sum(_cpu_ticks(p) for p in zygotes)
        if len(zygotes) >= slots and ticks == last:
            return
        last = ticks
        time.sleep(1.0)
    print("warning: the zygotes did not settle; the first jobs may start cold", flush=True)


def stop_farm_worker(proc: subprocess.Popen) -> None:
    """SIGTERM the supervisor's group (it stops its workers), SIGKILL after 60 s."""
    from tests.fixtures.farm import stop_process_group

    stop_process_group(proc, timeout=60)


def worker_log(stack) -> str:
    path = stack.root / "farm-worker.log"
    return path.read_text(errors="replace") if path.exists() else ""


# ------------------------------------------------------------------------------------------------- the jobs

def job_spec(model: Path, data: Path, args, i: int, name: str) -> dict:
    training = {"max_steps": args.steps, "seed": i}
    if not args.cotrain:
        training["cotrain"] = False
    return {"kind": "train", "name": name, "base_model": str(model),
            "dataset": {"path": str(data), "format": "chat"}, "training": training}


def single_job(stack, model: Path, data: Path, args, i: int) -> float:
    """One job alone: submit -> published wall (s)."""
    from farm import service

    t0 = time.perf_counter()
    job = service.submit_job(job_spec(model, data, args, 1000 + i, f"single{i}"), settings=stack.settings,
                             force=True)
    job = service.wait_for_job(job.id, poll_seconds=0.02, settings=stack.settings)
    wall = time.perf_counter() - t0
    if job.state != "succeeded":
        raise SystemExit(f"job {job.state}: {job.error}\n{worker_log(stack)[-4000:]}")
    return wall


def plain_script_wall(model: Path, data: Path, args, threads: int) -> float:
    """tests/benchmarks/plain_qlora.py in a fresh process (imports included), the farm's defaults."""
    code = ("import torch; torch.set_num_threads(%d); from tests.benchmarks.plain_qlora import plain_script; "
            "plain_script(%r, %r, steps=%d, micro_batch=2, max_len=512, seed=0, r=8, alpha=16, dropout=0.05)"
            ) % (threads, str(model), str(data), args.steps)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)})
    if out.returncode != 0:
        raise SystemExit(f"plain script failed: {out.stderr[-2000:]}")
    return time.perf_counter() - t0


def batch(stack, model: Path, data: Path, args) -> dict:
    """N jobs submitted at once; waits for all; what the catalog and the adapters say about them."""
    from farm import service

    t0, started = time.perf_counter(), datetime.now(timezone.utc)
    ids = [service.submit_job(job_spec(model, data, args, i, f"batch{i}"), settings=stack.settings, force=True).id
           for i in range(args.jobs)]
    submit_s = time.perf_counter() - t0
    # One count per half second, as a user watching `farm jobs` would: a poll of every job at a high rate would be
    # the driver's CPU on the 2 cores the workers share (the makespan comes from the catalog's finished times).
    from sqlalchemy import func, select

    from farm.catalog.models import Job
    from farm.catalog.session import session_scope

    while True:
        with session_scope(stack.settings.database_url) as session:
            pending = session.scalar(select(func.count()).where(
                Job.id.in_(ids), Job.state.not_in(("succeeded", "failed", "cancelled"))))
        if not pending:
            break
        time.sleep(0.5)
    return {"ids": ids, "started": started, "submit_s": submit_s, **catalog_facts(stack, ids)}


def catalog_facts(stack, ids: list[str]) -> dict:
    from farm import service
    from farm.catalog import repository as repo
    from farm.catalog.session import session_scope

    jobs, failed = [], []
    with session_scope(stack.settings.database_url) as session:
        for job_id in ids:
            job = repo.get_job(session, job_id)
            events = [e for e in repo.job_events(session, job_id, 0, 10_000) if e.type == "state"]
            claims = [repo.as_utc(e.at) for e in events if e.state == "running"]
            if job.state != "succeeded":
                failed.append(f"{job_id} {job.state} {job.error_code}: {(job.error_message or '')[:200]}")
                continue
            jobs.append({"id": job_id, "adapter": f"{job.name}", "slot": (job.worker or "?").split("@")[0],
                         "claimed": claims[-1], "finished": repo.as_utc(job.finished_at)})
    for j in jobs:
        prov = service.get_adapter(j["adapter"], settings=stack.settings).provenance
        j["timings"] = prov.get("timings", {})
        sizes = (prov.get("cotraining") or {}).get("group_sizes") or []
        j["group"] = max((s["size"] for s in sizes), default=1)
    return {"jobs": jobs, "failed": failed}


def idle_gaps(jobs: list[dict]) -> dict[str, list[float]]:
    """Per slot: the gaps between its busy intervals (claim -> published, merged), in seconds."""
    gaps: dict[str, list[float]] = {}
    for slot in sorted({j["slot"] for j in jobs}):
        spans = sorted((j["claimed"], j["finished"]) for j in jobs if j["slot"] == slot)
        merged = [list(spans[0])]
        for a, b in spans[1:]:
            if a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        gaps[slot] = [(merged[k + 1][0] - merged[k][1]).total_seconds() for k in range(len(merged) - 1)]
    return gaps


def cold_starts(log: str) -> int:
    """Runners (a job's or a co-training group's) started as fresh processes, not forked from the zygote."""
    return len(re.findall(r"runner pid \d+ \(cold\)", log))


# ------------------------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=60)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--singles", type=int, default=3, help="lone jobs for the baseline before the batch (median)")
    ap.add_argument("--singles-after", type=int, default=2, help="lone jobs after the batch, in the same median")
    ap.add_argument("--cotrain", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--keep", action="store_true", help="keep the farm's folder (logs) and print its path")
    args = ap.parse_args()
    os.environ.setdefault("FARM_TEST_E2E_REDIS_DB", "11")  # a stock Redis has databases 0 to 15
    from farm.tiny import build_tiny_model, write_dataset
    from tests.fixtures.farm import make_stack

    tmp = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    model = build_tiny_model(tmp / "model")
    data = write_dataset(tmp / "chat.jsonl", "chat", n=64, seed=0)
    stack = make_stack(tmp / "farm")
    stack.env["FARM_HASH_CACHE"] = str(tmp / "digests.sqlite3")
    worker = start_farm_worker(stack)
    try:
        singles, cpu0 = [], tree_cpu_seconds(worker.pid)
        for i in range(args.singles):
            singles.append(single_job(stack, model, data, args, i))
            print(f"single job {i + 1}: {singles[-1]:.2f} s", flush=True)
        single_cpu = (tree_cpu_seconds(worker.pid) - cpu0) / args.singles
        plain = plain_script_wall(model, data, args, threads=max(1, (os.cpu_count() or 1) // SLOTS))
        print(f"plain script (fresh process, imports included): {plain:.2f} s", flush=True)
        cpu0 = tree_cpu_seconds(worker.pid)
        result = batch(stack, model, data, args)
        batch_cpu = (tree_cpu_seconds(worker.pid) - cpu0) / args.jobs
        for i in range(args.singles, args.singles + args.singles_after):  # the machine drifts: measure it after too
            singles.append(single_job(stack, model, data, args, i))
            print(f"single job {i + 1} (after the batch): {singles[-1]:.2f} s", flush=True)
        single = statistics.median(singles)
        log = worker_log(stack)
    finally:
        stop_farm_worker(worker)
    jobs = result["jobs"]
    if result["failed"]:
        print(f"{len(result['failed'])} job(s) did not succeed:\n  " + "\n  ".join(result["failed"][:5]))
    if not jobs:
        raise SystemExit("no job succeeded")
    last = max(j["finished"] for j in jobs)
    makespan = (last - result["started"]).total_seconds()
    ideal = args.jobs * single / SLOTS
    print(f"\n{args.jobs} jobs of {args.steps} steps on `farm worker --cpus {SLOTS}`, co-training "
          f"{'on' if args.cotrain else 'off'}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"one job alone, submit -> published: median {single:.2f} s of {', '.join(f'{s:.2f}' for s in singles)};"
          f" plain script {plain:.2f} s")
    print(f"submitting {args.jobs} jobs took {result['submit_s']:.2f} s")
    print(f"makespan first submit -> last published: {makespan:.1f} s, {len(jobs) / makespan * 60:.1f} jobs/min")
    print(f"ideal {args.jobs} x {single:.2f} / {SLOTS} = {ideal:.1f} s; ratio {makespan / ideal:.3f} (goal <= 1.1)")
    print(f"CPU seconds per job (the worker's whole process tree, steadier than wall on a shared machine): alone "
          f"{single_cpu:.2f}, in the batch {batch_cpu:.2f}: ratio {batch_cpu / single_cpu:.3f}")
    for slot, gaps in idle_gaps(jobs).items():
        n = sum(1 for j in jobs if j["slot"] == slot)
        text = (f"median {statistics.median(gaps):.2f} s, max {max(gaps):.2f} s, total {sum(gaps):.1f} s"
                if gaps else "none")
        print(f"slot {slot}: {n} jobs, {len(gaps)} idle gaps: {text}")
    print("per-phase medians (s): " + ", ".join(
        f"{p} {statistics.median(j['timings'].get(f'{p}_seconds', 0.0) for j in jobs):.2f}" for p in PHASES))
    sizes = [j["group"] for j in jobs]
    print(f"co-trained: {sum(1 for s in sizes if s > 1)} of {len(jobs)} jobs (largest group "
          f"{max(sizes)}); cold runner starts: {cold_starts(log)}")
    if args.keep:
        print(f"farm folder: {stack.root}")
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
