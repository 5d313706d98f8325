"""`farm submit` as a user runs it, a fresh process per submit: locally and through a running API (issue 12).

    .venv/bin/python tests/benchmarks/bench_submit.py [--runs 7] [--top 12] [--baseline DIR]

Starts one farm (SQLite catalog, Redis, file store: the embedded defaults, in a temporary folder) and `farm api`
on it, writes a tiny spec (a tiny local model, an 8-line dataset), then runs `farm submit SPEC --force` --runs
times in local mode and --runs times through the API (FARM_API_URL, a client environment with no catalog or
broker), interleaved with the floor: `python -c pass` and a process that only imports the libraries each mode
cannot do without. Prints the median wall and CPU time (user + system, of the child) of each, the ratio to the
goal (0.5 s), and the modules with the largest own import time in one submit of each mode (-X importtime).
With --baseline DIR (a checkout of an earlier commit, e.g. from `git worktree add`), that checkout's `farm submit`
(PYTHONPATH=DIR) is timed too, in the same rounds, against the same farm and API.

The farm's modules are byte-compiled once before timing (PYTHONPYCACHEPREFIX in the temporary folder), as in
an installed package: an environment with PYTHONDONTWRITEBYTECODE=1 would otherwise compile them on every
submit. CPU time is the steadier figure on a shared machine; wall time includes waiting for a core.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

GOAL_S = 0.5
FLOORS = {
    "python -c pass": "pass",
    "local libraries": "import sqlalchemy.orm, pydantic, yaml, typer, celery, kombu.transport.redis",
    "http libraries": "import pydantic, yaml, typer, httpx",
}


def run_once(command: list[str], env: dict, cwd: Path) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall s, CPU s, process) of one run of `command`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), proc


def top_imports(command: list[str], env: dict, cwd: Path, top: int) -> list[tuple[float, str]]:
    """The `top` modules with the largest own import time (ms) in one run of `command`."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *command[1:]] if command[0] == sys.executable
                          else [sys.executable, "-X", "importtime", *command], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    rows = []
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            own, _, name = line[len("import time:"):].split("|")
            if own.strip().isdigit():
                rows.append((int(own) / 1000, name.strip()))
    return sorted(rows, reverse=True)[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="Timed submits per mode (and runs of each floor).")
    parser.add_argument("--top", type=int, default=12, help="Modules listed by own import time, per mode.")
    parser.add_argument("--baseline", type=Path, help="An earlier checkout whose `farm submit` is timed beside.")
    args = parser.parse_args()

    from farm.tiny import build_tiny_model, write_dataset
    from tests.fixtures.farm import make_stack
    from tests.test_cli_end_to_end import TOKENS, client_env, running_api

    farm_cli = str(Path(sys.executable).with_name("farm"))
    with tempfile.TemporaryDirectory(prefix="bench-submit-") as tmp:
        root = Path(tmp)
        stack = make_stack(root / "farm")
        model = build_tiny_model(root / "model", seed=0)
        data = write_dataset(root / "chat.jsonl", "chat", n=8, seed=1)
        spec = root / "job.yaml"
        spec.write_text(json.dumps({"kind": "train", "name": "bench-submit", "base_model": str(model),
                                    "dataset": {"path": str(data), "format": "chat"},
                                    "training": {"max_steps": 3}}))
        bytecode = {"PYTHONPYCACHEPREFIX": str(root / "pycache")}
        with running_api(stack, {"FARM_API_TOKENS": json.dumps(TOKENS),
                                 "FARM_MODEL_ROOTS": json.dumps([str(root)])}) as url:
            envs = {
                "local": {**{k: v for k, v in stack.env.items() if k != "PYTHONDONTWRITEBYTECODE"}, **bytecode},
                "http": {**{k: v for k, v in client_env(stack, "remote", url).items()
                            if k != "PYTHONDONTWRITEBYTECODE"}, **bytecode},
            }
            submit = [farm_cli, "submit", str(spec), "--force"]
            cases = {f"farm submit ({mode})": (submit, env) for mode, env in envs.items()}
            if args.baseline:
                cases.update({f"baseline submit ({mode})": (submit, {**env, "PYTHONPATH": str(args.baseline)})
                              for mode, env in envs.items()})
            cases.update({name: ([sys.executable, "-c", code], envs["local"]) for name, code in FLOORS.items()})
            for command, env in cases.values():  # compile and warm the file cache once
                run_once(command, env, root)
            times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
            for _ in range(args.runs):  # interleaved: a busy moment hits every case alike
                for name, (command, env) in cases.items():
                    wall, cpu, proc = run_once(command, env, root)
                    if "submit" in name and not proc.stdout.startswith("submitted job "):
                        raise SystemExit(f"unexpected output of {name}: {proc.stdout!r}")
                    times[name].append((wall, cpu))
            imports = {mode: top_imports(submit, env, root, args.top) for mode, env in envs.items()}
        stack.stop()

    load = os.getloadavg()[0]
    print(f"`farm submit` of a tiny spec, {args.runs} runs each, interleaved; load average {load:.1f} on "
          f"{os.cpu_count()} cores; goal {GOAL_S} s")
    print(f"{'':28s} {'wall med':>9s} {'cpu med':>8s} {'cpu min':>8s} {'wall/goal':>9s} {'cpu/goal':>8s}")
    for name, values in times.items():
        wall = statistics.median(v[0] for v in values)
        cpu = statistics.median(v[1] for v in values)
        print(f"{name:28s} {wall:8.3f}s {cpu:7.3f}s {min(v[1] for v in values):7.3f}s {wall / GOAL_S:8.2f}× "
              f"{cpu / GOAL_S:7.2f}×")
    if args.baseline:
        for mode in envs:
            this, before = times[f"farm submit ({mode})"], times[f"baseline submit ({mode})"]
            wall = statistics.median(v[0] for v in before) / statistics.median(v[0] for v in this)
            cpu = statistics.median(v[1] for v in before) / statistics.median(v[1] for v in this)
            print(f"{mode}: baseline / this checkout, median wall {wall:.2f}×, median CPU {cpu:.2f}×")
    for mode, rows in imports.items():
        print(f"\nlargest own import times, one `farm submit` ({mode}):")
        for ms, name in rows:
            print(f"  {ms:7.1f} ms  {name}")


if __name__ == "__main__":
    main()
