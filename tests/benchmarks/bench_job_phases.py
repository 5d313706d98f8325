"""Where one job's time goes, submit to published: a cold runner (FARM_WARM_START=0) and a warm one side by side.

    .venv/bin/python tests/benchmarks/bench_job_phases.py [--jobs 3] [--steps 12]

Starts one farm (Redis, SQLite catalog, file store) and a Celery worker with warm starts off, submits --jobs tiny
4-bit jobs one after another with `farm submit` (a real CLI process, timed), stops it, then does the same with a
worker that forks its runners from its zygote. For each job: the `farm submit` process, queued -> claimed (catalog
events), launch -> runner ready (fork or exec, imports), the runner's phases (hash, data, load, train, save),
then `done` -> published (runner exit, upload, catalog), and the whole wall time. Medians per mode, ratios
cold/warm. The first warm job also pays the zygote's imports unless the worker had them ready.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

PHASES = ("submit_process", "queued_to_claimed", "startup", "hash", "data", "load", "train", "save",
          "done_to_published", "wall")


def one_job(stack, spec_path: Path) -> dict:
    from farm import service
    from farm.catalog import repository as repo
    from farm.catalog.session import session_scope

    farm_cli = str(Path(sys.executable).parent / "farm")
    env = {**stack.env}
    t0 = time.perf_counter()
    out = subprocess.run([farm_cli, "submit", str(spec_path), "--json"], capture_output=True, text=True, env=env,
                         cwd=stack.root)
    submit_s = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"farm submit failed: {out.stderr[-2000:]}")
    import json

    job_id = json.loads(out.stdout)["id"]
    job = service.wait_for_job(job_id, poll_seconds=0.02, settings=stack.settings)
    wall = time.perf_counter() - t0
    if job.state != "succeeded":
        raise SystemExit(f"job {job.state}: {job.error}\n{stack.worker_logs()}")
    with session_scope(stack.settings.database_url) as session:
        events = repo.job_events(session, job_id, 0, 1000)
        at = {e.state: repo.as_utc(e.at) for e in events if e.type == "state"}
        finished = repo.as_utc(repo.get_job(session, job_id).finished_at)
    timings = service.get_adapter(job.adapter, settings=stack.settings).provenance["timings"]
    claimed = (at["running"] - at["queued"]).total_seconds()
    runner = timings.get("startup_seconds", 0.0) + timings["total_seconds"]
    row = {"submit_process": submit_s, "queued_to_claimed": claimed, "wall": wall,
           "done_to_published": (finished - at["running"]).total_seconds() - runner}
    row.update({k: timings.get(f"{k}_seconds", float("nan")) for k in ("startup", "hash", "data", "load", "train",
                                                                        "save")})
    return row


def run_mode(root: Path, model: Path, data: Path, args, warm: bool) -> list[dict]:
    import yaml

    from tests.fixtures.farm import make_stack

    stack = make_stack(root)
    stack.env["FARM_WARM_START"] = "1" if warm else "0"
    stack.env["FARM_HASH_CACHE"] = str(root / "digests.sqlite3")
    rows = []
    try:
        stack.start_worker()
        for i in range(args.jobs):
            spec = {"kind": "train", "name": f"phases{i}", "base_model": str(model),
                    "dataset": {"path": str(data), "format": "chat"},
                    "training": {"max_steps": args.steps, "seed": i}}
            spec_path = root / f"job{i}.yaml"
            spec_path.write_text(yaml.safe_dump(spec))
            rows.append(one_job(stack, spec_path))
            print(f"{'warm' if warm else 'cold'} job {i + 1}: " + ", ".join(f"{k} {rows[-1][k]:.2f}" for k in PHASES),
                  flush=True)
    finally:
        stack.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    from farm.tiny import build_tiny_model, write_dataset

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_model(tmp / "model")
        data = write_dataset(tmp / "chat.jsonl", "chat", n=64, seed=0)
        cold = run_mode(tmp / "cold", model, data, args, warm=False)
        warm = run_mode(tmp / "warm", model, data, args, warm=True)
    print(f"\n{args.jobs} jobs of {args.steps} steps per mode, seconds (median; warm median skips the first job, "
          f"which starts the zygote); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'phase':20s} {'cold':>8s} {'warm':>8s} {'cold/warm':>10s}")
    later = warm[1:] or warm
    for k in PHASES:
        c, w = statistics.median(r[k] for r in cold), statistics.median(r[k] for r in later)
        print(f"{k:20s} {c:8.3f} {w:8.3f} {c / w if w > 0 else float('inf'):9.1f}x")
    fixed = lambda r: r["wall"] - r["load"] - r["train"]  # noqa: E731
    print(f"beyond load and training: cold {statistics.median(map(fixed, cold)):.2f} s, "
          f"warm {statistics.median(map(fixed, later)):.2f} s (target <= 1.5 s)")


if __name__ == "__main__":
    main()
