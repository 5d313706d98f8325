"""The baseline the farm's training loop is measured against: a QLoRA script written the way a user writes one.

Default dtypes (no `dtype=`, no casts), transformers + peft + bitsandbytes as their READMEs show, the model's own
loss (`labels=`), a `for` loop with `loss.backward()` and `optimizer.step()`. Nothing of the farm's training code.
Used by tests/benchmarks/bench_farm_vs_script.py and scripts/gpu_check.py.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path


def plain_script(model_dir: Path, data_path: Path, *, steps: int, micro_batch: int, max_len: int, seed: int = 42,
                 lr: float = 2e-4, r: int = 8, alpha: int = 16, dropout: float = 0.05, bits: int = 4,
                 compute_dtype: str = "bfloat16", device: str = "cpu") -> dict:
    """Train `steps` steps of a LoRA on the chat rows in data_path; tokens/s of the loop (non-pad tokens)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, get_scheduler

    random.seed(seed)
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    kwargs = {"device_map": {"": device}} if device != "cpu" else {}
    if bits == 4:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, compute_dtype))
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if bits == 4:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    rows = [json.loads(line) for line in Path(data_path).read_text().splitlines() if line.strip()]
    examples = []
    for row in rows:
        ids = tok.apply_chat_template(row["messages"], tokenize=True, return_dict=False)
        examples.append(list(ids["input_ids"] if isinstance(ids, dict) else ids)[:max_len])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=steps)
    model.train()
    order, tokens = [], 0
    t0 = time.perf_counter()
    for _ in range(steps):
        if len(order) < micro_batch:
            order += random.sample(range(len(examples)), len(examples))
        batch, order = [examples[i] for i in order[:micro_batch]], order[micro_batch:]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), pad)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, e in enumerate(batch):
            ids[i, :len(e)], mask[i, :len(e)] = torch.tensor(e), 1
        ids, mask = ids.to(device), mask.to(device)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        loss.item()
        tokens += sum(map(len, batch))
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
