"""Extraction: a fine-tuned model minus its base, factored into a LoRA that stock peft loads.

Tiny Llama models are built from a config, changed in known ways (a low-rank delta, a long-tail delta, a bias,
an embedding row), saved with save_pretrained, extracted, and loaded back with PeftModel.from_pretrained.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from farm.errors import ModelError
from farm.extraction import svd
from farm.extraction.extract import extract_adapter
from farm.extraction.run import run_extraction
from farm.extraction.validate import validate_extract_spec
from farm.model_files import sha256_weights
from farm.specs import ExtractSpec

VOCAB = 128


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine, OpenMP threads that wait for each other in every small
    factorization op can make these tests ten times slower; results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(hidden=64, inter=176, layers=2, **kw) -> LlamaConfig:
    return LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, **kw)


def make_pair(tmp: Path, cfg: LlamaConfig, change) -> tuple[Path, Path, LlamaForCausalLM]:
    """Save a seeded base and a copy changed by `change(model)`; return both folders and the fine-tuned model."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(tmp / "base")
    ft = LlamaForCausalLM(cfg)
    ft.load_state_dict(base.state_dict())
    with torch.no_grad():
        change(ft)
    ft.save_pretrained(tmp / "ft")
    return tmp / "base", tmp / "ft", ft.eval()


def low_rank(shape, rank, scale, seed) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g) / rank


def with_spectrum(shape, spectrum, seed) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = min(shape)
    u = torch.linalg.qr(torch.randn(shape[0], n, generator=g)).Q
    v = torch.linalg.qr(torch.randn(shape[1], n, generator=g)).Q
    return (u * spectrum[:n]) @ v.T


def spec_for(base: Path, ft: Path, **kw) -> ExtractSpec:
    kw.setdefault("rank", 8)
    return ExtractSpec(name="extracted", base_model=str(base), finetuned_model=str(ft), **kw)


def load_checked(base_dir: Path, adapter_dir: Path) -> PeftModel:
    """Stock PeftModel.from_pretrained, then proof that the file holds exactly the keys peft wants."""
    # peft 0.21 warns that lora_B.bias is "1-D, maybe unsharded" (a false alarm for lora_bias) and that layers
    # without a base bias cannot be merged (the extraction notes that itself)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
        wanted = get_peft_model_state_dict(model)
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    assert set(saved) == set(wanted)
    result = set_peft_model_state_dict(model, saved)  # loading again gives the raw load result
    assert result.unexpected_keys == []
    assert [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k] == []
    return model


def logits(model, seed=1) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def true_rho(delta: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    """rho against the exact SVD: ||dW − BA|| / ||dW − [dW]_r||."""
    s = torch.linalg.svdvals(delta.double())
    optimum = math.sqrt(float((s[b.shape[1]:] ** 2).sum()))
    return float(torch.linalg.matrix_norm(delta.double() - b.double() @ a.double())) / optimum


# ---------------------------------------------------------------- the factorization and its certificate

LONG_TAIL = {
    "power-law": lambda i: i ** -0.5,
    "low-rank + tail": lambda i: torch.where(i <= 8, 10.0 / i, 0.05 * i ** -0.3),
    "exponential": lambda i: torch.exp(-i / 20),
}


@pytest.mark.parametrize("kind", sorted(LONG_TAIL))
def test_randomized_rho_bound_holds_against_exact_svd(kind):
    i = torch.arange(1, 257, dtype=torch.float32)
    delta = with_spectrum((256, 704), LONG_TAIL[kind](i), seed=3)
    for rank in (8, 16, 32):
        low = svd.factor_randomized(delta, rank=rank, seed=rank)
        rho = true_rho(delta, low.B, low.A)
        assert low.method == "randomized"
        assert rho <= low.rho + 1e-6, f"the certificate {low.rho} is below the true rho {rho}"
        assert low.rho <= svd.RHO_TARGET
        assert math.isclose(low.error, float(torch.linalg.matrix_norm(delta - low.B @ low.A)), rel_tol=1e-3)


def test_energy_rank_matches_exact_svd():
    i = torch.arange(1, 257, dtype=torch.float32)
    for k, spectrum in enumerate((i ** -1.0, torch.exp(-i / 20), i ** -0.7)):
        delta = with_spectrum((256, 704), spectrum, seed=k)
        for energy in (0.5, 0.8, 0.9, 0.95):
            fast = svd.factor_randomized(delta, energy=energy, max_rank=64, seed=k)
            exact = svd.factor_exact(delta, energy=energy, max_rank=64)
            assert fast.rank == exact.rank, (k, energy)


def test_exact_low_rank_delta_is_recovered_exactly():
    delta = low_rank((256, 704), 6, 1.0, seed=0)
    low = svd.factor_randomized(delta, rank=16)
    assert low.relative_error < 1e-5 and low.rho == 1.0
    assert float(torch.linalg.matrix_norm(delta - low.B @ low.A)) < 1e-5 * float(torch.linalg.matrix_norm(delta))


# ---------------------------------------------------------------- whole models through peft

def test_low_rank_delta_extracts_and_loads_in_peft(tmp_path):
    changed = {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj"}

    def change(model):
        for k, name in enumerate(sorted(changed)):
            module = model.get_submodule(name)
            module.weight += low_rank(module.weight.shape, 4, 0.2, seed=k)

    base, ft, ft_model = make_pair(tmp_path, tiny_config(), change)
    out = tmp_path / "adapter"
    result = extract_adapter(spec_for(base, ft, rank=8), base, ft, out)

    assert {r.module for r in result.extracted} == changed
    assert all(r.skipped == "unchanged" for r in result.layers if r.module not in changed)
    assert len(result.layers) == 14 and result.summary()["skipped"] == 11
    assert max(r.relative_error for r in result.extracted) < 1e-5
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(changed)
    assert config["r"] == config["lora_alpha"] == 8 and config["rank_pattern"] == {}
    assert not config["lora_bias"] and config["modules_to_save"] is None

    model = load_checked(base, out)
    assert torch.allclose(logits(model), logits(ft_model), atol=1e-4)
    with model.disable_adapter():
        assert not torch.allclose(logits(model), logits(ft_model), atol=1e-2)

    metrics = json.loads((out / "training_metrics.json").read_text())
    row = next(r for r in metrics["layers"] if r["module"] == "model.layers.0.mlp.down_proj")
    assert row["rank"] == 8 and row["rho"] == 1.0 and row["relative_error"] < 1e-5 and row["seconds"] >= 0
    assert {"module", "rank", "retained_energy", "relative_error", "rho", "seconds"} <= set(row)


def test_long_tail_layers_meet_rho_against_exact_svd(tmp_path):
    i = torch.arange(1, 257, dtype=torch.float32)
    deltas = {}

    def change(model):
        for k, (name, module) in enumerate(model.named_modules()):
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                spectrum = 0.02 * torch.where(i <= 6, 8.0 / i, i ** -0.4)
                deltas[name] = with_spectrum(module.weight.shape, spectrum, seed=k)
                module.weight += deltas[name]

    base, ft, _ = make_pair(tmp_path, tiny_config(hidden=256, inter=704, layers=1), change)
    out = tmp_path / "adapter"
    result = extract_adapter(spec_for(base, ft, rank=16), base, ft, out)
    saved = load_file(out / "adapter_model.safetensors")
    assert {r.module for r in result.extracted} == set(deltas)
    for name, delta in deltas.items():
        # the delta as saved (base and fine-tuned weights are float32 round-offs of base + delta)
        b, a = saved[f"base_model.model.{name}.lora_B.weight"], saved[f"base_model.model.{name}.lora_A.weight"]
        rho = true_rho(delta, b, a)
        assert rho <= svd.RHO_TARGET, (name, rho)
    assert result.summary()["max_rho"] <= svd.RHO_TARGET


def test_energy_mode_varies_ranks_through_rank_pattern(tmp_path):
    i = torch.arange(1, 65, dtype=torch.float32)
    speeds = {"model.layers.0.self_attn.q_proj": 2.0, "model.layers.0.self_attn.v_proj": 6.0,
              "model.layers.1.self_attn.o_proj": 12.0}

    def change(model):
        for k, (name, speed) in enumerate(speeds.items()):
            module = model.get_submodule(name)
            module.weight += with_spectrum(module.weight.shape, 0.05 * torch.exp(-i / speed), seed=k)

    base, ft, ft_model = make_pair(tmp_path, tiny_config(), change)
    fast = extract_adapter(spec_for(base, ft, rank=None, energy=0.95, max_rank=32), base, ft, tmp_path / "fast")
    exact = extract_adapter(spec_for(base, ft, rank=None, energy=0.95, max_rank=32, svd="exact"), base, ft,
                            tmp_path / "exact")
    ranks = {r.module: r.rank for r in fast.extracted}
    assert ranks == {r.module: r.rank for r in exact.extracted}
    assert len(set(ranks.values())) == 3, ranks  # a faster decay needs fewer directions
    config = json.loads((tmp_path / "fast" / "adapter_config.json").read_text())
    for name, rank in ranks.items():
        assert config["rank_pattern"].get(name, config["r"]) == rank
        assert config["alpha_pattern"].get(name, config["lora_alpha"]) == rank  # scaling 1
    model = load_checked(base, tmp_path / "fast")
    for name, rank in ranks.items():
        layer = model.base_model.model.get_submodule(name)
        assert layer.r["default"] == rank and layer.scaling["default"] == 1.0


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_changed_bias_embeddings_head_and_norm(tmp_path, tied):
    def change(model):
        layer0 = model.model.layers[0]
        layer0.self_attn.v_proj.bias += 0.2  # bias only: the weight stays as it was
        layer0.self_attn.q_proj.weight += low_rank(layer0.self_attn.q_proj.weight.shape, 2, 0.3, seed=1)
        layer0.mlp.down_proj.weight += low_rank(layer0.mlp.down_proj.weight.shape, 2, 0.3, seed=2)
        model.model.embed_tokens.weight[:10] += 0.5
        model.model.layers[1].post_attention_layernorm.weight += 0.1
        if not tied:
            model.lm_head.weight[3] -= 0.5

    cfg = tiny_config(attention_bias=True, tie_word_embeddings=tied)
    base, ft, ft_model = make_pair(tmp_path, cfg, change)
    out = tmp_path / "adapter"
    result = extract_adapter(spec_for(base, ft, rank=4), base, ft, out)

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_bias"] is True
    expected_saved = {"model.embed_tokens", "model.layers.1.post_attention_layernorm"}
    if not tied:
        expected_saved.add("lm_head")
    assert set(config["modules_to_save"]) == expected_saved
    assert config["ensure_weight_tying"] is tied
    v_proj = next(r for r in result.layers if r.module == "model.layers.0.self_attn.v_proj")
    assert v_proj.skipped is None and v_proj.bias_changed and v_proj.rank == 1
    assert any("without a base bias" in note for note in result.notes)  # mlp layers have no bias

    model = load_checked(base, out)
    assert torch.allclose(logits(model), logits(ft_model), atol=1e-4)


def test_bf16_sharded_fine_tuned_model(tmp_path):
    cfg = tiny_config()
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).to(torch.bfloat16)
    base.save_pretrained(tmp_path / "base")
    ft = LlamaForCausalLM(cfg).to(torch.bfloat16)
    ft.load_state_dict(base.state_dict())
    with torch.no_grad():
        for k, layer in enumerate(ft.model.layers):
            layer.mlp.up_proj.weight += low_rank(layer.mlp.up_proj.weight.shape, 4, 0.3, seed=k).to(torch.bfloat16)
    ft.save_pretrained(tmp_path / "ft", max_shard_size="60KB")
    assert len(list((tmp_path / "ft").glob("*.safetensors"))) > 1

    result = extract_adapter(spec_for(tmp_path / "base", tmp_path / "ft", rank=8), tmp_path / "base",
                             tmp_path / "ft", tmp_path / "adapter")
    assert [r.module for r in result.extracted] == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}

    model = load_checked(tmp_path / "base", tmp_path / "adapter")
    ft = ft.float().eval()
    with model.disable_adapter():
        before = (logits(model.float()) - logits(ft)).norm()
    after = (logits(model.float()) - logits(ft)).norm()
    assert after < 0.05 * before  # bf16 round-off is a flat noise tail a rank-8 adapter leaves out


def test_targets_limit_extraction_and_report_the_rest(tmp_path):
    def change(model):
        for name in ("q_proj", "k_proj"):
            module = model.model.layers[0].self_attn.get_submodule(name)
            module.weight += low_rank(module.weight.shape, 2, 0.3, seed=len(name))

    base, ft, _ = make_pair(tmp_path, tiny_config(), change)
    result = extract_adapter(spec_for(base, ft, target_modules=["q_proj", "v_proj"]), base, ft, tmp_path / "a")
    assert [r.module for r in result.extracted] == ["model.layers.0.self_attn.q_proj"]
    assert len(result.layers) == 4
    assert result.changed_untargeted == ["model.layers.0.self_attn.k_proj"]
    assert any("not in target_modules" in note for note in result.notes)


def test_identical_models_have_nothing_to_extract(tmp_path):
    base, ft, _ = make_pair(tmp_path, tiny_config(layers=1), lambda model: None)
    with pytest.raises(ModelError, match="equals the base model .* on every targeted layer: nothing to extract"):
        extract_adapter(spec_for(base, ft), base, ft, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_run_extraction_reports_progress_and_provenance(tmp_path):
    def change(model):
        model.model.layers[0].mlp.gate_proj.weight += low_rank((176, 64), 3, 0.2, seed=0)

    base, ft, _ = make_pair(tmp_path, tiny_config(layers=1), change)
    events = []
    job = {"job_id": "j1", "attempt": 1, "spec": spec_for(base, ft).model_dump(mode="json"),
           "base_model": str(base), "finetuned_model": str(ft), "output_dir": str(tmp_path / "out")}
    run_extraction(job, events.append)

    progress = [e for e in events if e["type"] == "progress"]
    assert [e["step"] for e in progress] == list(range(1, 8))
    assert all(e["total_steps"] == 7 and e["phase"] == "extract" and "layer" in e and e["eta_s"] >= 0
               for e in progress)
    done = events[-1]
    assert done["type"] == "done"
    m = done["metrics"]
    assert (m["layers"], m["skipped"], m["mean_rank"], m["max_rho"]) == (1, 6, 8.0, 1.0)
    assert m["peak_rss_mb"] > 0 and m["seconds"] > 0
    prov = done["provenance"]
    assert (prov["base_model_sha256"], prov["base_model_files"]) == sha256_weights(base)
    assert (prov["source_model_sha256"], prov["source_model_files"]) == sha256_weights(ft)
    assert {"python", "torch", "safetensors", "peft", "host"} <= set(prov["environment"])
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_run_extraction_rejects_a_bad_job(tmp_path):
    from farm.errors import SpecError

    with pytest.raises(SpecError, match="missing finetuned_model, output_dir"):
        run_extraction({"job_id": "j", "spec": {}, "base_model": str(tmp_path)}, lambda e: None)
    job = {"job_id": "j", "spec": {"kind": "extract", "name": "x", "base_model": "a", "finetuned_model": "b"},
           "base_model": str(tmp_path), "finetuned_model": str(tmp_path / "gone"), "output_dir": str(tmp_path / "o")}
    with pytest.raises(SpecError, match="exactly one of rank or energy"):
        run_extraction(job, lambda e: None)
    job["spec"]["rank"] = 4
    with pytest.raises(ModelError, match="gone: model folder not found"):
        run_extraction(job, lambda e: None)


# ---------------------------------------------------------------- submit-time validation (torch-free)

@pytest.fixture(scope="module")
def saved_pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pair")

    def change(model):
        model.model.layers[0].self_attn.q_proj.weight += 0.01

    base, ft, _ = make_pair(tmp, tiny_config(), change)
    return base, ft


def test_validate_extract_spec_summarizes_a_good_pair(saved_pair):
    base, ft = saved_pair
    summary = validate_extract_spec(spec_for(base, ft, rank=16))
    assert summary["layers"] == 14 and summary["notes"] == []
    assert summary["shapes"]["down_proj"] == [64, 176] and summary["shapes"]["k_proj"] == [32, 64]


def test_validate_skips_remote_models_with_a_note(saved_pair):
    base, _ = saved_pair
    summary = validate_extract_spec(spec_for(base, "s3://models/ft"))
    assert summary["layers"] == 14
    assert summary["notes"] == ["finetuned_model: s3://models/ft is not a local directory; the worker checks it "
                                "after fetching it"]
    summary = validate_extract_spec(spec_for("org/base-model", "s3://models/ft"))
    assert summary["layers"] is None and len(summary["notes"]) == 2


def test_validate_rejects_bad_models(saved_pair, tmp_path):
    base, ft = saved_pair
    cases = []

    cases.append((spec_for(base, tmp_path / "nowhere"), "finetuned_model", r"finetuned_model: .*nowhere: no such "
                                                                            "model directory"))
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes((ft / "model.safetensors").read_bytes())
    cases.append((spec_for(no_config, ft), "base_model", r"base_model: .*no_config/config\.json: missing"))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((ft / "config.json").read_text())
    cases.append((spec_for(base, no_weights), "finetuned_model", r"no \*\.safetensors weight files"))

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config(inter=192)).save_pretrained(tmp_path / "wider")
    cases.append((spec_for(base, tmp_path / "wider"), "finetuned_model",
                  r"tensor model\.layers\.0\.mlp\.down_proj\.weight: shape \[64, 176\] in the base model .* but "
                  r"\[64, 192\] in the fine-tuned"))
    LlamaForCausalLM(tiny_config(layers=1)).save_pretrained(tmp_path / "shallow")
    cases.append((spec_for(base, tmp_path / "shallow"), "finetuned_model",
                  r"tensor model\.layers\.1\..* is in the base model .* but not in the fine-tuned model"))
    cases.append((spec_for(base, ft, target_modules=["q_proj", "qkv"]), "target_modules",
                  r"'qkv' match no layer .*available: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"))
    quantized = tmp_path / "int8"
    quantized.mkdir()
    (quantized / "config.json").write_text((base / "config.json").read_text())
    tensors = load_file(base / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"].to(torch.int8)
    save_file(tensors, str(quantized / "model.safetensors"))
    cases.append((spec_for(quantized, quantized), "base_model",
                  r"tensor model\.layers\.0\.self_attn\.q_proj\.weight \(I8\) is not floating point"))
    cases.append((spec_for(base, ft, rank=48, max_rank=64), "rank",
                  r"rank: 48 is larger than layer model\.layers\.0\.self_attn\.k_proj's min\(out, in\) = 32"))

    for spec, field, pattern in cases:
        with pytest.raises(ModelError, match=pattern) as err:
            validate_extract_spec(spec)
        assert err.value.field == field, (field, str(err.value))
