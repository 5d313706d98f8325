"""Packing vs no packing, side by side: effective (non-pad) tokens/s over one epoch of short chat examples.

Run:  .venv/bin/python tests/benchmarks/bench_packing.py [--repeats 3] [--rows 512] [--max-seq-len 256] [--threads 1]

Three modes train the same 4-bit QLoRA job through farm.training.run.run_training on the same dataset (one epoch,
so the same real tokens): padded batches (the baseline, `packing: false`), the previous greedy packing (rows filled
in the given order; kept here as a baseline) and the farm's packing (best-fit decreasing). Runs alternate
(unpacked, greedy, packed, unpacked, ...) so load from other processes hits all alike; the median of each mode is
reported, with its padding (pad tokens over all tokens of the batches). On a machine shared with
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
    """Chat rows: an optional system line, a question, an answer of 1 to 6 short sentences (some with a second
    turn): short and uneven, the case packing is for."""
    rng = random.Random(seed)

    def answer() -> str:
        parts = []
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(len(ANIMALS))
            parts.append(f"The {ANIMALS[i]} likes {FOODS[i]}. The {ANIMALS[i]} is {COLORS[i]}.")
        return " ".join(parts)

    with path.open("w") as fh:
        for _ in range(rows):
            i = rng.randrange(len(ANIMALS))
            messages = [{"role": "system", "content": "Answer briefly."}] if rng.random() < 0.5 else []
            messages += [{"role": "user", "content": f"Tell me about the {ANIMALS[i]}."},
                         {"role": "assistant", "content": answer()}]
            if rng.random() < 0.3:
                messages += [{"role": "user", "content": "And more?"}, {"role": "assistant", "content": answer()}]
            fh.write(json.dumps({"messages": messages}) + "\n")
    return path


def pack_greedy(examples, max_len: int):
    """The farm's previous packing, as a baseline: append to the open row while it fits, else open a new row."""
    rows, current, used = [], [], 0
    for ex in examples:
        if current and used + len(ex) > max_len:
            rows.append(current)
            current, used = [], 0
        current.append(ex)
        used += len(ex)
    if current:
        rows.append(current)
    return rows


def padding(rows, micro_batch_size: int) -> float:
    """Pad tokens over all tokens of the batches, rows in order (each batch padded to its longest row)."""
    real = total = 0
    for k in range(0, len(rows), micro_batch_size):
        lengths = [sum(len(e) for e in row) for row in rows[k:k + micro_batch_size]]
        real += sum(lengths)
        total += max(lengths) * len(lengths)
    return 1 - real / total


MODES = ("unpacked", "greedy", "packed")


def train_once(root: Path, model: Path, data: Path, mode: str, args) -> dict:
    from farm.training import packing as packing_module
    from farm.training.run import run_training

    spec = TrainSpec(name="bench", base_model=str(model), dataset={"path": str(data), "format": "chat"},
                     training={"epochs": 1, "micro_batch_size": args.micro_batch_size, "max_seq_len": args.max_seq_len,
                               "packing": mode != "unpacked", "lr": 1e-3})
    out = root / mode
    job = {"job_id": "bench", "attempt": 1, "spec": spec.model_dump(mode="json"), "base_model": str(model),
           "dataset": str(data), "eval_dataset": None, "continue_from": None, "resume_from": None,
           "output_dir": str(out / "output"), "checkpoint_dir": str(out / "checkpoints")}
    events: list[dict] = []
    seen_rows: list = []
    farm_pack = packing_module.pack_examples
    chosen = pack_greedy if mode == "greedy" else farm_pack
    real_to_rows = packing_module.to_rows

    def to_rows(examples, max_len, packing):
        rows = [[ex] for ex in examples] if not packing else chosen(examples, max_len)
        seen_rows.append(rows)
        return rows

    packing_module.to_rows = to_rows  # run_training imports it when it runs: this mode's packing is used
    try:
        run_training(job, events.append)
    finally:
        packing_module.to_rows = real_to_rows
    done = next(e for e in events if e["type"] == "done")["metrics"]
    return {"steps": done["steps"], "tokens": done["tokens"], "tokens_per_s": done["tokens_per_s"],
            "rows": len(seen_rows[0]), "padding": padding(seen_rows[0], args.micro_batch_size)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=512)
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
        warm = short_examples(root / "warm.jsonl", 16)
        train_once(root / "warmup", model, warm, "packed", args)
        results: dict[str, list[dict]] = {m: [] for m in MODES}
        for r in range(args.repeats):
            for mode in MODES:
                res = train_once(root / f"r{r}", model, data, mode, args)
                results[mode].append(res)
                print(f"repeat {r + 1}: {mode:8s} {res['steps']:4d} steps {res['tokens']:7d} tokens "
                      f"{res['tokens_per_s']:9.0f} tokens/s  padding {res['padding']:.1%}", flush=True)

    med = {m: statistics.median(r["tokens_per_s"] for r in results[m]) for m in MODES}
    print()
    print(f"model: hidden {args.hidden}, {args.layers} layers, 4-bit; {args.rows} chat rows, micro-batch "
          f"{args.micro_batch_size}, max_seq_len {args.max_seq_len}; median of {args.repeats}; "
          f"{__import__('torch').get_num_threads()} threads")
    print(f"{'mode':10s} {'rows':>6s} {'steps':>6s} {'tokens':>8s} {'padding':>8s} {'effective tokens/s':>20s} "
          f"{'vs unpacked':>12s}")
    for mode in MODES:
        r = results[mode][0]
        print(f"{mode:10s} {r['rows']:6d} {r['steps']:6d} {r['tokens']:8d} {r['padding']:8.1%} {med[mode]:20.0f} "
              f"{med[mode] / med['unpacked']:11.2f}x")
    print(f"ratio packed / unpacked: {med['packed'] / med['unpacked']:.2f}x "
          f"(previous greedy packing: {med['greedy'] / med['unpacked']:.2f}x)")


if __name__ == "__main__":
    main()
