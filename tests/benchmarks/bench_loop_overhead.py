"""The farm's training loop against a plain PyTorch script on the same model and data: tokens/s, side by side.

Run:  .venv/bin/python tests/benchmarks/bench_loop_overhead.py [--steps 40] [--repeats 5] [--threads 1]

The plain script is what one would write by hand: the same 4-bit base + LoRA (transformers + peft directly),
AdamW, a cosine schedule, the model's own loss (`labels=`), `loss.item()` every step. The farm side is
`run_training` on the same spec; its throughput is real tokens over the wall time of the whole training phase
(progress events, history and all), not just the steps. The target is a ratio of at least 0.97.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from farm.specs import TrainSpec  # noqa: E402
from farm.tiny import build_tiny_model, write_dataset  # noqa: E402


def make_spec(model: Path, data: Path, args) -> TrainSpec:
    return TrainSpec(name="bench", base_model=str(model), dataset={"path": str(data), "format": "chat"},
                     training={"max_steps": args.steps, "micro_batch_size": args.micro_batch_size, "lr": 1e-3,
                               "max_seq_len": 256})


def farm_run(root: Path, spec: TrainSpec) -> float:
    from farm.training.run import run_training

    job = {"job_id": "bench", "attempt": 1, "spec": spec.model_dump(mode="json"), "base_model": spec.base_model,
           "dataset": spec.dataset.path, "eval_dataset": None, "continue_from": None, "resume_from": None,
           "output_dir": str(root / "output"), "checkpoint_dir": str(root / "checkpoints")}
    events: list[dict] = []
    run_training(job, events.append)
    done = next(e for e in events if e["type"] == "done")
    return done["metrics"]["tokens"] / done["provenance"]["timings"]["train_seconds"]


def plain_run(spec: TrainSpec) -> float:
    """A hand-written loop over the same micro-batches as the farm's (its tokens and its data order)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, get_scheduler

    from farm.training.data import prepare_data
    from farm.training.loop import EpochPlan

    tokenizer = AutoTokenizer.from_pretrained(spec.base_model)
    examples = prepare_data(spec, tokenizer, spec.dataset.path).train
    torch.manual_seed(0)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(spec.base_model, quantization_config=q, dtype=torch.bfloat16)
    for module in model.modules():  # same CPU workaround as the farm (farm/training/model.py)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    sched = get_scheduler("cosine", opt, num_warmup_steps=0, num_training_steps=spec.training.max_steps)
    model.train()
    plan = EpochPlan([[e] for e in examples], spec.training.micro_batch_size, 1, spec.training.seed)
    batches = [[row[0] for row in window[0]] for window in plan.windows(0)]
    pad = tokenizer.pad_token_id
    tokens, start = 0, time.perf_counter()
    for step in range(spec.training.max_steps):
        batch = batches[step % len(batches)]
        length = max(len(e) for e in batch)
        ids = torch.tensor([e.input_ids + [pad] * (length - len(e)) for e in batch])
        labels = torch.tensor([e.labels + [-100] * (length - len(e)) for e in batch])
        mask = torch.tensor([[1] * len(e) + [0] * (length - len(e)) for e in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        tokens += sum(len(e) for e in batch)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "model", hidden_size=args.hidden, num_layers=args.layers, num_heads=8,
                                 intermediate_size=args.hidden * 8 // 3)
        data = write_dataset(root / "chat.jsonl", "chat", n=512, seed=0)
        spec = make_spec(model, data, args)
        plain_run(make_spec(model, data, argparse.Namespace(**{**vars(args), "steps": 3})))  # warm up
        results: dict[str, list[float]] = {"plain": [], "farm": []}
        for r in range(args.repeats):
            results["plain"].append(plain_run(spec))
            results["farm"].append(farm_run(root / f"farm-{r}", spec))
            print(f"repeat {r + 1}: plain {results['plain'][-1]:8.0f} tokens/s   farm {results['farm'][-1]:8.0f} "
                  "tokens/s", flush=True)
    plain, farm = statistics.median(results["plain"]), statistics.median(results["farm"])
    print()
    print(f"model: hidden {args.hidden}, {args.layers} layers, 4-bit + LoRA r8; {args.steps} steps of "
          f"{args.micro_batch_size}; median of {args.repeats}; {torch.get_num_threads()} threads")
    print(f"plain script: {plain:8.0f} tokens/s")
    print(f"farm loop:    {farm:8.0f} tokens/s")
    print(f"ratio farm / plain: {farm / plain:.3f} (target >= 0.97)")


if __name__ == "__main__":
    main()
