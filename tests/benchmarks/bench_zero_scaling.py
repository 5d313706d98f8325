"""One process against N DeepSpeed ZeRO processes on the same job: tokens/s side by side, and the ratio.

Run:  .venv/bin/python tests/benchmarks/bench_zero_scaling.py [--processes 2] [--stage 2] [--steps 30] [--repeats 3]
      [--hidden 256 --layers 4] [--bits 4] [--gpu]

Every side runs exactly as a worker runs it (workers.launch.runner_command: the runner alone, or the launcher of
workers/distributed.py starting N ranks) on the same global batch: one process trains micro-batches of
`micro_batch_size x N` rows, each of the N processes `micro_batch_size` rows (the final losses print equal).
On the CPU there are two one-process baselines: with every CPU as a torch thread (the same cores used two ways), and
with one rank's share of them (OMP_NUM_THREADS = CPUs / N: the ratio against it is the data-parallel scaling).
With --gpu the sides use 1 and N GPUs (resources.gpus), which measures real data-parallel scaling.
Sides run interleaved, repeat after repeat, and the medians are compared; on a machine shared with other work the
all-CPUs side suffers most (its OpenMP threads wait on each other when a core is taken), so read its runs too.

Throughput is real tokens over the wall time of the training phase (the runner's `train_seconds`, steps plus
progress events); startup (imports, process group, deepspeed.initialize) is printed separately as the job's total.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from farm.runner_protocol import parse_line  # noqa: E402
from farm.specs import TrainSpec  # noqa: E402
from farm.tiny import build_tiny_model, write_dataset  # noqa: E402


def make_job(root: Path, model: Path, data: Path, args, processes: int) -> Path:
    resources = {"gpus": processes} if args.gpu else {"gpus": 0, "cpu_slots": processes}
    spec = TrainSpec(
        name="bench", base_model=str(model), dataset={"path": str(data), "format": "chat"},
        lora={"r": 8, "alpha": 16, "dropout": 0.0},
        quantization={"bits": args.bits, "compute_dtype": "bfloat16" if args.gpu else "float32"},
        training={"max_steps": args.steps, "lr": 1e-3, "max_seq_len": 256, "seed": 1,
                  "micro_batch_size": args.micro_batch_size * (args.processes if processes == 1 else 1)},
        deepspeed={"stage": args.stage} if processes > 1 else None, resources=resources)
    root.mkdir(parents=True, exist_ok=True)
    doc = {"job_id": "bench", "attempt": 1, "spec": spec.model_dump(mode="json"), "base_model": str(model),
           "dataset": str(data), "eval_dataset": None, "continue_from": None, "resume_from": None,
           "output_dir": str(root / "output"), "checkpoint_dir": str(root / "checkpoints")}
    path = root / "job.json"
    path.write_text(json.dumps(doc))
    return path


def run_once(job: Path, threads: int | None = None) -> dict:
    from workers.launch import runner_command

    argv, env = runner_command(job, json.loads(job.read_text())["spec"])
    env["PYTHONPATH"] = str(REPO_ROOT)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    out = subprocess.run(argv, env=env, cwd=job.parent, capture_output=True, text=True, timeout=3600)
    events = [e for e in map(parse_line, out.stdout.splitlines()) if e is not None]
    if out.returncode != 0 or not events or events[-1]["type"] != "done":
        raise SystemExit(f"{job}: the run failed (status {out.returncode})\n{out.stdout[-3000:]}{out.stderr[-2000:]}")
    done = events[-1]
    timings = done["provenance"]["timings"]
    return {"tokens_per_s": done["metrics"]["tokens"] / timings["train_seconds"],
            "total_seconds": timings["total_seconds"], "final_loss": done["metrics"]["final_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--stage", type=int, choices=(2, 3), default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--micro-batch-size", type=int, default=4, help="per ZeRO process")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--bits", type=int, choices=(4, 16), default=4)
    parser.add_argument("--gpu", action="store_true", help="1 GPU against N GPUs (resources.gpus)")
    args = parser.parse_args()
    # Each side sizes its own threads: the runner alone takes every CPU, the launcher gives each rank its share.
    os.environ.pop("OMP_NUM_THREADS", None)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "model", hidden_size=args.hidden, num_layers=args.layers,
                                 intermediate_size=args.hidden * 2, num_heads=max(1, args.hidden // 32))
        data = write_dataset(root / "chat.jsonl", "chat", n=256, seed=0)
        n, cpus = args.processes, len(os.sched_getaffinity(0))
        # (label, processes, torch threads per process or None for the farm's own choice)
        if args.gpu:
            sides = [("1 GPU", 1, None), (f"{n} GPUs, ZeRO-{args.stage}", n, None)]
        else:
            sides = [(f"1 process x {cpus} threads", 1, None),
                     (f"1 process x {max(1, cpus // n)} threads", 1, max(1, cpus // n)),
                     (f"{n} processes x {max(1, cpus // n)}, ZeRO-{args.stage}", n, None)]
        results: dict[str, list[dict]] = {label: [] for label, _, _ in sides}
        for i in range(args.repeats):  # interleaved, so a machine that slows down slows every side
            for k, (label, procs, threads) in enumerate(sides):
                results[label].append(run_once(make_job(root / f"s{k}-{i}", model, data, args, procs), threads))

    print(f"model: hidden {args.hidden}, {args.layers} layers, {args.bits}-bit base; {args.steps} steps, global "
          f"batch {args.micro_batch_size * n} rows; {args.repeats} repeats; {os.cpu_count()} CPUs")
    medians = {}
    for label, runs in results.items():
        medians[label] = statistics.median(r["tokens_per_s"] for r in runs)
        each = ", ".join(f"{r['tokens_per_s']:.0f}" for r in runs)
        print(f"{label:>30}: {medians[label]:8.0f} tokens/s (runs: {each}); job total "
              f"{statistics.median(r['total_seconds'] for r in runs):.1f} s; final loss {runs[0]['final_loss']:.4f}")
    zero = sides[-1][0]
    for label, _, _ in sides[:-1]:
        print(f"ratio {zero} / {label}: {medians[zero] / medians[label]:.2f}")


if __name__ == "__main__":
    main()
