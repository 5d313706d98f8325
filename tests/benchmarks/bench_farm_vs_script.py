"""The farm's training loop against a plain user script, in interleaved pairs: farm, plain, farm, plain, ...

    .venv/bin/python tests/benchmarks/bench_farm_vs_script.py [--steps 60] [--pairs 4]
        [--threads 1]

One farm (Redis db FARM_TEST_E2E_REDIS_DB, a SQLite catalog, a file store) and one Celery worker are started
once; then each pair runs (a) the job through the whole farm: submit -> Redis -> worker -> runner (forked warm from
the worker's zygote after the first job) -> artifact in the store -> catalog, and (b) the plain script
(tests/benchmarks/plain_qlora.py: default dtypes, a for loop, loss.backward(), optimizer.step()) in a fresh process
on the same model, data and hyper-parameters. Alternating them makes the machine's drift hit both alike. Prints
each pair's training tokens/s (non-pad tokens per second of the training loop), the per-pair ratio farm/plain and
its median, and the farm's fixed cost: submit-to-published wall time minus the training loop, for the first
(cold) job and the median of the warm ones. Target: ratio >= 1.0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"}


def farm_job(stack, model_dir: Path, data_path: Path, args, i: int) -> dict:
    import yaml

    from farm import service

    spec = {"kind": "train", "name": f"bench{i}", "base_model": str(model_dir),
            "dataset": {"path": str(data_path), "format": "chat"}, "lora": LORA,
            "training": {"max_steps": args.steps, "lr": 2e-4, "micro_batch_size": args.micro_batch,
                         "grad_accum": 1, "max_seq_len": args.seq, "seed": 42 + i}}
    spec_path = stack.root / f"bench{i}.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    t0 = time.perf_counter()
    job = service.submit_job(spec_path, settings=stack.settings, force=True) if _takes_force() else \
        service.submit_job(spec_path, settings=stack.settings)
    job = service.wait_for_job(job.id, poll_seconds=0.02, settings=stack.settings)
    wall = time.perf_counter() - t0
    if job.state != "succeeded":
        raise SystemExit(f"farm job {job.state}: {job.error}\n{stack.worker_logs()}")
    adapter = service.get_adapter(job.adapter, settings=stack.settings)
    metrics, timings = adapter.metrics, adapter.provenance["timings"]
    return {"tokens_per_s": metrics["tokens_per_s"], "train_seconds": metrics["train_seconds"], "wall": wall,
            "timings": timings}


def plain_in_own_process(model_dir: Path, data: Path, args, seed: int) -> dict:
    """The plain script in a fresh process, as a user runs it (and as the farm's runner runs): nothing of this
    benchmark's process (its broker connection, its threads, its imports) weighs on it."""
    import json
    import subprocess

    code = ("import json, sys, torch; torch.set_num_threads(%d); "
            "from tests.benchmarks.plain_qlora import plain_script; "
            "print(json.dumps(plain_script(%r, %r, steps=%d, micro_batch=%d, max_len=%d, seed=%d, r=%d, alpha=%d, "
            "dropout=%r)))") % (args.threads, str(model_dir), str(data), args.steps, args.micro_batch, args.seq,
                                seed, LORA["r"], LORA["alpha"], LORA["dropout"])
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": str(args.threads)})
    if out.returncode != 0:
        raise SystemExit(f"plain script failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _takes_force() -> bool:
    import inspect

    from farm import service

    return "force" in inspect.signature(service.submit_job).parameters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from farm.tiny import build_tiny_model, write_dataset
    from tests.fixtures.farm import make_stack

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_tiny_model(tmp / "model", hidden_size=256, num_layers=4, num_heads=8,
                                     intermediate_size=688, vocab_size=512)
        data = write_dataset(tmp / "chat.jsonl", "chat", n=256, seed=0)
        stack = make_stack(tmp / "farm")
        stack.env["OMP_NUM_THREADS"] = str(args.threads)
        farm_runs, plain_runs = [], []
        try:
            stack.start_worker()
            for i in range(args.pairs):
                farm_runs.append(farm_job(stack, model_dir, data, args, i))
                plain_runs.append(plain_in_own_process(model_dir, data, args, seed=42 + i))
                f, p = farm_runs[-1], plain_runs[-1]
                print(f"pair {i + 1}: farm {f['tokens_per_s']:7.0f} tok/s, plain {p['tokens_per_s']:7.0f} tok/s, "
                      f"ratio {f['tokens_per_s'] / p['tokens_per_s']:.3f}; farm submit->published {f['wall']:.2f} s "
                      f"(loop {f['train_seconds']:.2f} s)", flush=True)
        finally:
            stack.stop()
    ratios = [f["tokens_per_s"] / p["tokens_per_s"] for f, p in zip(farm_runs, plain_runs)]
    fixed = [f["wall"] - f["train_seconds"] for f in farm_runs]
    print(f"\n{args.pairs} interleaved pairs, {args.steps} steps, micro-batch {args.micro_batch}, "
          f"{args.threads} thread(s); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"plain script : {statistics.median(p['tokens_per_s'] for p in plain_runs):8.0f} tokens/s (median)")
    print(f"farm         : {statistics.median(f['tokens_per_s'] for f in farm_runs):8.0f} tokens/s (median)")
    print(f"ratio farm/plain per pair: {', '.join(f'{r:.3f}' for r in ratios)}; median "
          f"{statistics.median(ratios):.3f} (target >= 1.0)")
    warm = fixed[1:] or fixed
    print(f"farm fixed cost (submit -> published minus the loop): first job {fixed[0]:.2f} s, then median "
          f"{statistics.median(warm):.2f} s; phases of the last job: {farm_runs[-1]['timings']}")


if __name__ == "__main__":
    main()
