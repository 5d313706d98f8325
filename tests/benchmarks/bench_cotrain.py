"""Co-training K jobs on one shared base against running them one after another: wall time, memory, losses.

Run:  .venv/bin/python tests/benchmarks/bench_cotrain.py [--k 1 2 4] [--steps 30] [--hidden 512] [--layers 4]

Both sides go through the runner processes the worker starts: sequential = K `python -m workers.runner` processes
one after another (each loads and quantizes the base); co-trained = one `python -m workers.cotrain_runner` with
the K jobs. Same specs (4-bit nf4 base, LoRA r=16 on all linear layers), different seeds and datasets per job.
Printed per K: total wall time of each side and the throughput ratio (sequential / co-trained), the runners' peak
resident memory (co-trained vs the largest solo runner), and each job's final loss against its solo run.
Targets on a CPU at K = 4: >= 2.5x throughput, peak memory <= 1.3x one job, final losses within 1%.
On a GPU host the same script measures the GPU (peak memory then is the process's resident CPU memory).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from farm.runner_protocol import parse_line  # noqa: E402
from farm.specs import TrainSpec  # noqa: E402
from farm.tiny import build_tiny_model, write_dataset  # noqa: E402

def make_job(root: Path, model: Path, i: int, args) -> dict:
    data = write_dataset(root / f"data-{i}.jsonl", "chat", n=64, seed=i)
    spec = TrainSpec(name=f"bench-{i}", base_model=str(model), dataset={"path": str(data), "format": "chat"},
                     lora={"r": 16}, quantization={"compute_dtype": args.compute_dtype},
                     training={"max_steps": args.steps, "micro_batch_size": args.micro_batch_size, "lr": 2e-3,
                               "max_seq_len": 256, "seed": 100 + i})
    folder = root / f"job-{i}"
    return {"job_id": f"job-{i}", "attempt": 1, "spec": spec.model_dump(mode="json"), "base_model": str(model),
            "dataset": str(data), "eval_dataset": None, "continue_from": None, "resume_from": None,
            "output_dir": str(folder / "output"), "checkpoint_dir": str(folder / "checkpoints")}


def run_process(module: str, doc_path: Path) -> tuple[float, float, int, list[dict]]:
    """(wall seconds, CPU seconds, peak RSS in MiB, events) of one runner process (its own rusage, from wait4)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", module, str(doc_path)], cwd=REPO, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    events = [e for e in map(parse_line, stdout.splitlines()) if e]
    errors = [e for e in events if e["type"] == "error"]
    if proc.returncode != 0 or errors:
        raise SystemExit(f"{module} failed ({proc.returncode}): {errors or stderr[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss // 1024, events


def final_losses(events: list[dict], default_id: str | None = None) -> dict[str, float]:
    return {e.get("job_id", default_id): e["metrics"]["final_loss"] for e in events if e["type"] == "done"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    # float32: the loss comparison measures co-training, not bfloat16 rounding (whose noise alone, ~1e-3 a step,
    # grows to a few % of a final loss over tens of steps, co-trained or not).
    parser.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "model", hidden_size=args.hidden, num_layers=args.layers,
                                 num_heads=max(4, args.hidden // 64), intermediate_size=args.hidden * 11 // 4)
        print(f"base: Llama hidden {args.hidden}, {args.layers} layers, 4-bit nf4, {args.compute_dtype} compute; "
              f"{args.steps} steps a job, micro-batch {args.micro_batch_size}")
        jobs = [make_job(root, model, i, args) for i in range(max(args.k))]
        solo: dict[str, tuple[float, float, int, float]] = {}
        for job in jobs:  # each job alone, once: the sequential side of every K is a prefix of these
            path = root / f"{job['job_id']}.json"
            path.write_text(json.dumps(job))
            wall, cpu, rss, events = run_process("workers.runner", path)
            solo[job["job_id"]] = (wall, cpu, rss, final_losses(events, job["job_id"])[job["job_id"]])
        print("wall and CPU seconds of the runner processes (K solo ones one after another vs one group)")
        print(f"{'K':>2} {'seq wall':>9} {'group wall':>10} {'speedup':>8} {'seq CPU':>8} {'group CPU':>9} "
              f"{'speedup':>8} {'solo MiB':>9} {'group MiB':>9} {'memory':>7} {'max loss diff':>13}")
        for k in args.k:
            group_jobs = [{**j, "output_dir": j["output_dir"] + f"-g{k}", "checkpoint_dir": j["checkpoint_dir"]
                           + f"-g{k}"} for j in jobs[:k]]
            path = root / f"group-{k}.json"
            path.write_text(json.dumps({"jobs": group_jobs}))
            wall, cpu, rss, events = run_process("workers.cotrain_runner", path)
            losses = final_losses(events)
            seq_wall = sum(solo[j["job_id"]][0] for j in group_jobs)
            seq_cpu = sum(solo[j["job_id"]][1] for j in group_jobs)
            solo_rss = max(solo[j["job_id"]][2] for j in group_jobs)
            diff = max(abs(losses[j["job_id"]] - solo[j["job_id"]][3]) / abs(solo[j["job_id"]][3])
                       for j in group_jobs)
            print(f"{k:>2} {seq_wall:>9.1f} {wall:>10.1f} {seq_wall / wall:>7.2f}x {seq_cpu:>8.1f} {cpu:>9.1f} "
                  f"{seq_cpu / cpu:>7.2f}x {solo_rss:>9} {rss:>9} {rss / solo_rss:>6.2f}x {diff:>12.2%}")


if __name__ == "__main__":
    main()
