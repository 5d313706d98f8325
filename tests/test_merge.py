"""Merging an adapter into its base (issue 13): the merged model is a standard transformers folder whose logits are
the base + adapter logits, within bf16 tolerance."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def make_adapter(base_dir, dest, seed=3):
    """A LoRA with random (non-zero) B matrices, saved by stock PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(dest)
    return dest


def test_merged_logits_equal_base_plus_adapter_and_folder_loads(tiny_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from farm.merge.run import merge_adapter

    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    out = tmp_path / "merged"
    facts = merge_adapter(tiny_model_dir, adapter, out, dtype="bfloat16", max_shard_size="100KB")
    assert facts["tokenizer"] and facts["dtype"] == "bfloat16"
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()  # sharded
    assert (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert not list(out.glob("adapter_*")), "the merged folder must not look like an adapter"

    ids = torch.tensor([[1, 5, 9, 23, 42, 7, 11, 3]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    with torch.no_grad():
        plain = base(ids).logits.float()
        expected = PeftModel.from_pretrained(base, adapter)(ids).logits.float()
        merged = AutoModelForCausalLM.from_pretrained(out)(ids).logits.float()
    assert merged.dtype == torch.float32 and merged.shape == expected.shape
    scale = expected.abs().max().item()
    # bf16 keeps 8 bits of mantissa; rounding differs between W + BA merged and W x + B(A x) through every layer
    # (measured: 2.3% of the largest logit on this model)
    assert (merged - expected).abs().max().item() <= 0.05 * scale
    assert (plain - expected).abs().max().item() > 0.2 * scale, "the adapter must change the logits"
    AutoTokenizer.from_pretrained(out)

    # In float32 the merge is exact up to summation order.
    merge_adapter(tiny_model_dir, adapter, tmp_path / "merged32", dtype="float32")
    base32 = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        expected32 = PeftModel.from_pretrained(base32, adapter)(ids).logits
        merged32 = AutoModelForCausalLM.from_pretrained(tmp_path / "merged32")(ids).logits
    assert torch.allclose(merged32, expected32, atol=1e-4)


def test_merge_refuses_a_folder_that_is_not_an_adapter(tiny_model_dir, tmp_path):
    from farm.errors import ModelError
    from farm.merge.run import merge_adapter

    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a PEFT adapter folder"):
        merge_adapter(tiny_model_dir, tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_merge_job_refuses_a_base_that_changed_since_training(tiny_model_dir, tmp_path):
    from farm.errors import ModelError
    from farm.merge.run import run_merge

    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    events = []
    job = {"job_id": "j1", "base_model": str(tiny_model_dir), "adapter": str(adapter),
           "output_dir": str(tmp_path / "out"),
           "spec": {"kind": "merge", "name": "bot-merged", "adapter": "bot:1", "base_model": "org/tiny",
                    "base_model_sha256": "0" * 64}}
    with pytest.raises(ModelError, match=r"org/tiny is not the model bot:1 was trained on"):
        run_merge(job, events.append)
    assert not (tmp_path / "out").exists() and not any(e["type"] == "done" for e in events)
