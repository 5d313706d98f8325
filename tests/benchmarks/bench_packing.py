"""Packing vs no packing, side by side: effective (non-pad) tokens/s over one epoch of short chat examples.

Run:  .venv/bin/python tests/benchmarks/bench_packing.py [--repeats 3] [--lengths uniform|longtail] [--rows 512]
      [--max-seq-len 256] [--threads 1] [--modes unpacked greedy packed varlen]

Each mode trains the same 4-bit QLoRA job through farm.training.run.run_training on the same dataset (one epoch,
so the same real tokens), with the spec's defaults otherwise:
  unpacked  padded batches, the baseline: the farm's own `packing: false`, nothing tuned for it;
  greedy    the previous packing (rows filled in the given order), kept as a baseline;
  packed    the farm's packing (best-fit decreasing; sdpa under transformers' block-diagonal mask);
  varlen    the same rows with attention restricted to each example (varlen_attention.py beside this script,
            opt-in, not used by the runner): its row says whether per-example attention saves anything here.
Runs alternate (unpacked, greedy, packed, varlen, unpacked, ...) so load from other processes hits all alike; the
median of each mode is reported with its padding: pad tokens over all tokens of the batches the loop really
trained (its seeded order per epoch). tokens/s counts real tokens only and times the optimizer steps only (model
loading excluded), as the runner reports it (`--clock cpu`: in CPU seconds of this process, steadier when other
jobs share the machine); "per token" counts all tokens, pads included.

The padding ceiling: where every token, pad or real, costs the same in both modes, packing can gain at most
(1 - p_packed) / (1 - p_unpacked) (~ 1 / (1 - p_unpacked) with packing's ~1% padding). A gain beyond it needs a
per-token saving that only packing has (e.g. cheaper attention per example); the bench prints the fraction of the
ceiling each mode reaches, and what building the packed attention mask costs per forward.

--lengths: `uniform` answers of 1 to 6 sentences; `longtail` answer lengths drawn from a lognormal (median 2
sentences, sigma 1.0 in log space, a tail to 15), as real chat data has: still short on average, but a random
batch of 8 usually holds one long example, so padded batches carry more padding. On a machine shared with other
jobs, `--threads 1` avoids OpenMP oversubscription, which otherwise slows every run by an order of magnitude at
random.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from farm.specs import TrainSpec  # noqa: E402
from farm.tiny import ANIMALS, COLORS, FOODS, build_tiny_model  # noqa: E402

MAX_SENTENCES = 15  # per example, all answers together: ~14 tokens each keeps the longest example under 256


def short_examples(path: Path, rows: int, seed: int = 0, lengths: str = "uniform") -> Path:
    """Chat rows: an optional system line, a question, an answer of short sentences (some with a second turn):
    short and uneven, the case packing is for. `lengths` draws the sentence counts (module docstring)."""
    rng = random.Random(seed)

    def count(budget: int) -> int:
        if lengths == "uniform":
            return rng.randint(1, 6)
        return max(1, min(budget, round(math.exp(rng.gauss(math.log(2), 1.0)))))

    def answer(n: int) -> str:
        parts = []
        for _ in range(n):
            i = rng.randrange(len(ANIMALS))
            parts.append(f"The {ANIMALS[i]} likes {FOODS[i]}. The {ANIMALS[i]} is {COLORS[i]}.")
        return " ".join(parts)

    with path.open("w") as fh:
        for _ in range(rows):
            i = rng.randrange(len(ANIMALS))
            messages = [{"role": "system", "content": "Answer briefly."}] if rng.random() < 0.5 else []
            first = count(MAX_SENTENCES - 1)
            messages += [{"role": "user", "content": f"Tell me about the {ANIMALS[i]}."},
                         {"role": "assistant", "content": answer(first)}]
            if rng.random() < 0.3:
                messages += [{"role": "user", "content": "And more?"},
                             {"role": "assistant", "content": answer(count(MAX_SENTENCES - first))}]
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


def padding(rows, micro_batch_size: int, seed: int) -> float:
    """Pad tokens over all tokens of the batches the loop trains in epoch 0 (each padded to its longest row)."""
    from farm.training.loop import EpochPlan

    real = total = 0
    for window in EpochPlan(rows, micro_batch_size, 1, seed).windows(0):
        for batch in window:
            lengths = [sum(len(e) for e in row) for row in batch]
            real += sum(lengths)
            total += max(lengths) * len(lengths)
    return 1 - real / total


MODES = ("unpacked", "greedy", "packed", "varlen")


def train_once(root: Path, model: Path, data: Path, mode: str, args) -> dict:
    from farm.training import loop as loop_module
    from farm.training import model as model_module
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
    real_to_rows, real_build = packing_module.to_rows, model_module.build_model

    def to_rows(examples, max_len, packing):
        rows = [[ex] for ex in examples] if not packing else chosen(examples, max_len)
        seen_rows.append(rows)
        return rows

    def build_varlen(*a, **kw):
        built = real_build(*a, **kw)
        from varlen_attention import use_varlen_attention  # beside this script

        assert use_varlen_attention(built), "varlen mode needs a model on sdpa attention"
        return built

    # run_training imports these when it runs: this mode's packing (and attention) is used.
    packing_module.to_rows = to_rows
    if mode == "varlen":
        model_module.build_model = build_varlen
    if args.clock == "cpu":  # the loop times its steps in this process's CPU seconds: load from others drops out
        loop_module.time = types.SimpleNamespace(perf_counter=time.process_time)
    try:
        run_training(job, events.append)
    finally:
        packing_module.to_rows, model_module.build_model, loop_module.time = real_to_rows, real_build, time
    done = next(e for e in events if e["type"] == "done")["metrics"]
    return {"steps": done["steps"], "tokens": done["tokens"], "tokens_per_s": done["tokens_per_s"],
            "rows": len(seen_rows[0]), "padding": padding(seen_rows[0], args.micro_batch_size, spec.training.seed)}


def mask_cost_ms(model_dir: Path, data: Path, args) -> tuple[float, float]:
    """ms per forward to detect the packed sequences and build sdpa's block-diagonal mask for one packed micro-batch
    (what transformers does once per forward, shared by all layers): (detection alone, whole mask)."""
    import torch
    from transformers import AutoConfig
    from transformers.masking_utils import create_causal_mask, find_packed_sequence_indices

    from farm.training.data import prepare_data
    from farm.training.model import load_tokenizer
    from farm.training.packing import collate, pack_examples

    spec = TrainSpec(name="bench", base_model=str(model_dir), dataset={"path": str(data), "format": "chat"},
                     training={"max_seq_len": args.max_seq_len, "packing": True})
    tokenizer = load_tokenizer(model_dir)
    rows = pack_examples(prepare_data(spec, tokenizer, str(data), None).train, args.max_seq_len)
    batch = collate(rows[:args.micro_batch_size], tokenizer.pad_token_id, packed=True)
    config = AutoConfig.from_pretrained(model_dir)
    config._attn_implementation = "sdpa"
    embeds = torch.zeros(*batch.input_ids.shape, config.hidden_size, dtype=torch.bfloat16)

    def per_call(fn, n=50) -> float:
        fn()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) / n * 1000

    detect = per_call(lambda: find_packed_sequence_indices(batch.position_ids))
    whole = per_call(lambda: create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=None, cache=None,
                                                position_ids=batch.position_ids))
    return detect, whole


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--lengths", choices=("uniform", "longtail"), default="uniform")
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="time the steps by the wall clock (as the runner reports) or by this process's CPU time "
                             "(steadier on a shared machine; use with --threads 1)")
    args = parser.parse_args()
    modes = [m for m in MODES if m in args.modes]
    if "unpacked" not in modes:
        parser.error("--modes needs unpacked (the baseline)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "model", hidden_size=args.hidden, num_layers=args.layers, num_heads=8,
                                 intermediate_size=args.hidden * 8 // 3)
        data = short_examples(root / "short.jsonl", args.rows, lengths=args.lengths)
        warm = short_examples(root / "warm.jsonl", 16, lengths=args.lengths)
        train_once(root / "warmup", model, warm, "packed", args)
        results: dict[str, list[dict]] = {m: [] for m in modes}
        for r in range(args.repeats):
            for mode in modes:
                res = train_once(root / f"r{r}", model, data, mode, args)
                results[mode].append(res)
                print(f"repeat {r + 1}: {mode:8s} {res['steps']:4d} steps {res['tokens']:7d} tokens "
                      f"{res['tokens_per_s']:9.0f} tokens/s  padding {res['padding']:.1%}", flush=True)
        detect_ms, mask_ms = mask_cost_ms(model, data, args)

    med = {m: statistics.median(r["tokens_per_s"] for r in results[m]) for m in modes}
    pad = {m: results[m][0]["padding"] for m in modes}
    per_token = {m: med[m] / (1 - pad[m]) for m in modes}  # all tokens (pads too) per second
    base = "unpacked"
    print()
    print(f"model: hidden {args.hidden}, {args.layers} layers, 4-bit; {args.rows} chat rows ({args.lengths} lengths), "
          f"micro-batch {args.micro_batch_size}, max_seq_len {args.max_seq_len}; median of {args.repeats}; "
          f"{__import__('torch').get_num_threads()} threads; {args.clock} clock")
    print(f"{'mode':10s} {'rows':>6s} {'steps':>6s} {'tokens':>8s} {'padding':>8s} {'effective tokens/s':>19s} "
          f"{'per token':>10s} {'vs unpacked':>12s} {'ceiling':>8s} {'reached':>8s}")
    for mode in modes:
        r = results[mode][0]
        ratio = med[mode] / med[base]
        ceiling = (1 - pad[mode]) / (1 - pad[base])
        print(f"{mode:10s} {r['rows']:6d} {r['steps']:6d} {r['tokens']:8d} {pad[mode]:8.1%} {med[mode]:19.0f} "
              f"{per_token[mode]:10.0f} {ratio:11.2f}x {ceiling:7.2f}x {ratio / ceiling:8.0%}")
    ceiling = 1 / (1 - pad[base])
    print(f"padding ceiling 1/(1-p) with the baseline's padding p = {pad[base]:.1%}: {ceiling:.2f}x")
    for mode in modes[1:]:
        print(f"  {mode:8s} {med[mode] / med[base]:.2f}x = {med[mode] / med[base] / ceiling:.0%} of it; speed per "
              f"token, pads included, {per_token[mode] / per_token[base]:.2f}x the baseline's")
    step_ms = args.micro_batch_size * args.max_seq_len / per_token.get("packed", per_token[base]) * 1000
    print(f"packed mask per forward: detection {detect_ms:.2f} ms, whole block-diagonal mask {mask_ms:.2f} ms "
          f"(~{mask_ms / step_ms:.1%} of a packed step of ~{step_ms:.0f} ms): caching it cannot pay")


if __name__ == "__main__":
    main()
