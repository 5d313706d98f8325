"""Extraction through the whole farm: submit -> worker -> runner -> artifact with checksums -> catalog row whose
lineage names the fine-tuned source model and its hash; the pulled adapter reproduces the fine-tune's logits."""

from __future__ import annotations

import pytest
import yaml

from farm import service
from farm.errors import ModelError


def make_finetune(base_dir, dest, rank=4, seed=3):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "down_proj.weight")):
                out_f, in_f = param.shape
                param += 0.05 * torch.randn(out_f, rank) @ torch.randn(rank, in_f)
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(dest)
    return model


def test_extraction_job_publishes_an_adapter_that_reproduces_the_finetune(farm_stack, tiny_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    settings = farm_stack.settings
    ft_dir = tmp_path / "medic-ft"
    finetuned = make_finetune(tiny_model_dir, ft_dir)
    spec_path = tmp_path / "extract.yaml"
    spec_path.write_text(yaml.safe_dump({"kind": "extract", "name": "medic-extracted", "base_model": str(tiny_model_dir),
                                         "finetuned_model": str(ft_dir), "rank": 8, "max_rank": 16}))
    farm_stack.start_worker()
    job = service.submit_job(spec_path, settings=settings)
    final = service.wait_for_job(job.id, timeout=600, settings=settings)
    assert final.state == "succeeded", (final.error, farm_stack.worker_logs())
    progress = [e.data for e in service.job_events(job.id, settings=settings) if e.type == "progress"]
    assert progress and progress[-1]["phase"] == "extract" and progress[-1]["step"] == progress[-1]["total_steps"]

    adapter = service.get_adapter("medic-extracted:1", settings=settings)
    assert adapter.kind == "extract" and adapter.source_model == str(ft_dir)
    assert adapter.source_model_sha256 and adapter.source_model_sha256 != adapter.base_model_sha256
    assert adapter.provenance["source_model"]["sha256"] == adapter.source_model_sha256
    assert "training_metrics.json" in {f.path for f in adapter.files}

    dest = tmp_path / "pulled"
    service.pull_adapter("medic-extracted:1", dest, settings=settings)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 7, 19, 33, 60, 2, 11]])
    with torch.no_grad():
        base_logits = base(ids).logits
        want = finetuned(ids).logits
        got = PeftModel.from_pretrained(base, dest)(ids).logits
    assert not torch.allclose(base_logits, want, atol=1e-3)
    assert torch.allclose(got, want, atol=1e-3), (got - want).abs().max()


def test_mismatched_models_are_refused_at_submit(farm_stack, tiny_model_dir, tmp_path):
    from farm.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other", hidden_size=32, intermediate_size=64)
    spec = {"kind": "extract", "name": "bad", "base_model": str(tiny_model_dir), "finetuned_model": str(other),
            "rank": 4}
    with pytest.raises(ModelError) as err:
        service.submit_job(spec, settings=farm_stack.settings)
    assert "shape" in err.value.message or "mismatch" in err.value.message
    assert service.list_jobs(settings=farm_stack.settings) == []
