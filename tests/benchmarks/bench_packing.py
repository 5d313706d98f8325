"""Packing vs no packing, side by side: effective (non-pad) tokens/s over one epoch of short examples.

Run:  .venv/bin/python tests/benchmarks/bench_packing.py [--repeats 3] [--rows 256] [--max-seq-len 256] [--threads 1]

Both modes train the same 4-bit QLoRA job through farm.training.run.run_training on the same dataset (one epoch,
so the same real tokens); only `training.packing` differs. Runs alternate (unpacked, packed, unpacked, ...) so
load from other processes hits both alike; the median of each mode is reported. On a machine shared with
other jobs, `--threads 1` avoids OpenMP oversubscription, which otherwise slows every run by an order of
magnitude at random. tokens/s counts real tokens
only and times the optimizer steps only (model loading excluded), as the runner reports it.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from farm.specs import TrainSpec  # noqa: E402
from farm.tiny import ANIMALS, COLORS, FOODS, build_tiny_model  # noqa: E402


def short_examples(path: Path, rows: int, seed: int = 0) -> Path:
    """Text rows of 1 to 6 short sentences: short and uneven, the case packing is for."""
    rng = random.Random(seed)
    with path.open("w") as fh:
        for _ in range(rows):
            sentences = []
            for _ in range(rng.randint(1, 6)):
                i = rng.randrange(len(ANIMALS))
                sentences.append(f"The {ANIMALS[i]} likes {FOODS[i]}. The {ANIMALS[i]} is {COLORS[i]}.")
            fh.write(json.dumps({"text": " ".join(sentences)}) + "\n")
    return path


def train_once(root: Path, model: Path, data: Path, packing: bool, args) -> dict:
    from farm.training.run import run_training

    spec = TrainSpec(name="bench", base_model=str(model), dataset={"path": str(data), "format": "text"},
                     training={"epochs": 1, "micro_batch_size": args.micro_batch_size, "max_seq_len": args.max_seq_len,
                               "packing": packing, "lr": 1e-3})
    out = root / ("packed" if packing else "unpacked")
    job = {"job_id": "bench", "attempt": 1, "spec": spec.model_dump(mode="json"), "base_model": str(model),
           "dataset": str(data), "eval_dataset": None, "continue_from": None, "resume_from": None,
           "output_dir": str(out / "output"), "checkpoint_dir": str(out / "checkpoints")}
    events: list[dict] = []
    run_training(job, events.append)
    done = next(e for e in events if e["type"] == "done")["metrics"]
    return {"steps": done["steps"], "tokens": done["tokens"], "tokens_per_s": done["tokens_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "model", hidden_size=args.hidden, num_layers=args.layers, num_heads=8,
                                 intermediate_size=args.hidden * 8 // 3)
        data = short_examples(root / "short.jsonl", args.rows)
        train_once(root / "warmup", model, data, False, argparse.Namespace(**{**vars(args), "rows": 16}))
        results: dict[bool, list[dict]] = {False: [], True: []}
        for r in range(args.repeats):
            for packing in (False, True):
                res = train_once(root / f"r{r}", model, data, packing, args)
                results[packing].append(res)
                print(f"repeat {r + 1}: {'packed  ' if packing else 'unpacked'} {res['steps']:4d} steps "
                      f"{res['tokens']:7d} tokens {res['tokens_per_s']:9.0f} tokens/s", flush=True)

    med = {p: statistics.median(r["tokens_per_s"] for r in results[p]) for p in (False, True)}
    print()
    print(f"model: hidden {args.hidden}, {args.layers} layers, 4-bit; {args.rows} rows, micro-batch "
          f"{args.micro_batch_size}, max_seq_len {args.max_seq_len}; median of {args.repeats}; "
          f"{__import__('torch').get_num_threads()} threads")
    print(f"{'mode':10s} {'steps':>6s} {'tokens':>8s} {'effective tokens/s':>20s}")
    for packing in (False, True):
        r = results[packing][0]
        print(f"{'packed' if packing else 'unpacked':10s} {r['steps']:6d} {r['tokens']:8d} {med[packing]:20.0f}")
    print(f"ratio packed / unpacked: {med[True] / med[False]:.2f}x")


if __name__ == "__main__":
    main()
