"""The farm's training loop against a plain transformers + peft script: same model, data, spec and seed.

    .venv/bin/python tests/benchmarks/bench_farm_vs_script.py [--steps 30] [--repeats 2] [--threads 2]

Runs, side by side in one process tree, (a) a plain 4-bit QLoRA script (the baseline, written here with nothing of
the farm's training code) and (b) the same job through the whole farm: submit -> Redis -> a Celery worker in its
own process -> runner -> artifact in the store -> catalog. Prints both training tokens/s (non-pad tokens per
second of the training loop), their ratio, and the farm's fixed overhead (submit-to-published wall time minus its
training loop). Target: ratio >= 0.97. Needs the machine's Redis (db 13).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SPEC = {
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
    "quantization": {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "float32"},
}


def plain_script(model_dir: Path, data_path: Path, steps: int, mbs: int, seq: int, seed: int) -> dict:
    """The baseline: what a user would write by hand with transformers + peft + bitsandbytes."""
    import random

    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, get_scheduler

    random.seed(seed)
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    q = SPEC["quantization"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=q["type"], bnb_4bit_use_double_quant=q["double_quant"],
        bnb_4bit_compute_dtype=torch.float32))
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = SPEC["lora"]
    model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    rows = [json.loads(line) for line in data_path.read_text().splitlines() if line.strip()]
    examples = [tok.apply_chat_template(r["messages"], tokenize=True, return_dict=False)[:seq] for r in rows]
    examples = [list(e["input_ids"]) if isinstance(e, dict) else list(e) for e in examples]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    sched = get_scheduler("cosine", opt, num_warmup_steps=0, num_training_steps=steps)
    model.train()
    order, tokens, t0 = [], 0, time.perf_counter()
    for step in range(steps):
        if len(order) < mbs:
            order += random.sample(range(len(examples)), len(examples))
        batch, order = [examples[i] for i in order[:mbs]], order[mbs:]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), tok.pad_token_id)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, e in enumerate(batch):
            ids[i, :len(e)], mask[i, :len(e)] = torch.tensor(e), 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        tokens += int(mask.sum())
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def through_the_farm(root: Path, model_dir: Path, data_path: Path, steps: int, mbs: int, seq: int, seed: int,
                     threads: int) -> dict:
    import yaml

    from farm import service
    from tests.fixtures.farm import make_stack

    stack = make_stack(root)
    stack.env["OMP_NUM_THREADS"] = str(threads)
    try:
        stack.start_worker()
        spec = {"kind": "train", "name": "bench", "base_model": str(model_dir),
                "dataset": {"path": str(data_path), "format": "chat"}, **SPEC,
                "training": {"max_steps": steps, "lr": 2e-4, "micro_batch_size": mbs, "grad_accum": 1,
                             "max_seq_len": seq, "seed": seed}}
        spec_path = root / "bench.yaml"
        spec_path.write_text(yaml.safe_dump(spec))
        t0 = time.perf_counter()
        job = service.submit_job(spec_path, settings=stack.settings)
        job = service.wait_for_job(job.id, poll_seconds=0.05, settings=stack.settings)
        wall = time.perf_counter() - t0
        if job.state != "succeeded":
            raise SystemExit(f"farm job {job.state}: {job.error}\n{stack.worker_logs()}")
        adapter = service.get_adapter(job.adapter, settings=stack.settings)
        train_s = adapter.provenance["timings"]["train_seconds"]
        tokens = adapter.metrics["tokens"]
        return {"tokens": tokens, "seconds": train_s, "tokens_per_s": tokens / train_s, "wall": wall}
    finally:
        stack.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from farm.tiny import build_tiny_model, write_dataset

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_tiny_model(tmp / "model", hidden_size=256, num_layers=4, num_heads=8,
                                     intermediate_size=688, vocab_size=512)
        data = write_dataset(tmp / "chat.jsonl", "chat", n=256, seed=0)
        plain, farm_runs = [], []
        for i in range(args.repeats):  # interleaved, so drifting machine load hits both alike
            plain.append(plain_script(model_dir, data, args.steps, args.micro_batch, args.seq, seed=42))
            farm_runs.append(through_the_farm(tmp / f"farm{i}", model_dir, data, args.steps, args.micro_batch,
                                              args.seq, 42, args.threads))
            print(f"run {i}: plain {plain[-1]['tokens_per_s']:.0f} tok/s, farm {farm_runs[-1]['tokens_per_s']:.0f} "
                  f"tok/s", flush=True)
        import statistics

        ratios = [f["tokens_per_s"] / p["tokens_per_s"] for p, f in zip(plain, farm_runs)]
        med_plain = statistics.median(r["tokens_per_s"] for r in plain)
        med_farm = statistics.median(r["tokens_per_s"] for r in farm_runs)
        overhead = statistics.median(r["wall"] - r["seconds"] for r in farm_runs)
        print(f"plain script  : {med_plain:8.0f} tokens/s (median of {len(plain)})")
        print(f"farm          : {med_farm:8.0f} tokens/s (median of {len(farm_runs)})")
        print(f"ratio farm/plain per pair: {', '.join(f'{r:.3f}' for r in ratios)}; "
              f"median {statistics.median(ratios):.3f}  (target >= 0.97)")
        print(f"farm fixed overhead (submit to published, minus the training loop): {overhead:.2f} s")


if __name__ == "__main__":
    main()
