"""farm.model_files reads model folders without torch: configs, safetensors headers, hashes, architecture checks.

The models here are written with safetensors.numpy (a Llama-like layout), so these tests need neither torch nor
transformers.
"""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from farm import model_files
from farm.errors import ModelError

HIDDEN, INTER, VOCAB = 8, 12, 16


def llama_tensors(layers: int = 2, hidden: int = HIDDEN, tied: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    t = {"model.embed_tokens.weight": rng.standard_normal((VOCAB, hidden), dtype=np.float32),
         "model.norm.weight": np.ones(hidden, dtype=np.float32)}
    if not tied:
        t["lm_head.weight"] = rng.standard_normal((VOCAB, hidden), dtype=np.float32)
    for i in range(layers):
        p = f"model.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[f"{p}.self_attn.{name}.weight"] = rng.standard_normal((hidden, hidden), dtype=np.float32)
        t[f"{p}.mlp.gate_proj.weight"] = rng.standard_normal((INTER, hidden), dtype=np.float32)
        t[f"{p}.mlp.up_proj.weight"] = rng.standard_normal((INTER, hidden), dtype=np.float32)
        t[f"{p}.mlp.down_proj.weight"] = rng.standard_normal((hidden, INTER), dtype=np.float32)
        t[f"{p}.input_layernorm.weight"] = np.ones(hidden, dtype=np.float32)
    return t


def write_model(path, tensors=None, config=None, shards: int = 1):
    path.mkdir(parents=True, exist_ok=True)
    tensors = llama_tensors() if tensors is None else tensors
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
           "vocab_size": VOCAB, "tie_word_embeddings": "lm_head.weight" not in tensors}
    cfg.update(config or {})
    (path / "config.json").write_text(json.dumps(cfg))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"))
        return path
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(path / fname))
        weight_map.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


@pytest.fixture
def model(tmp_path):
    return write_model(tmp_path / "model")


def test_importing_model_files_does_not_import_torch():
    code = "import sys, farm.model_files, farm.extraction.validate; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_resolve_model_dir(model, tmp_path):
    assert model_files.resolve_model_dir(str(model)) == model.resolve()
    assert model_files.resolve_model_dir("s3://bucket/models/llama") is None
    assert model_files.resolve_model_dir("meta-llama/Llama-3-8B") is None
    assert model_files.resolve_model_dir(str(tmp_path / "nowhere")) is None
    with pytest.raises(ModelError, match="is a file; give the model's directory"):
        model_files.resolve_model_dir(str(model / "config.json"))


def test_read_config(model, tmp_path):
    assert model_files.read_config(model)["model_type"] == "llama"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match=r"config\.json: missing"):
        model_files.read_config(empty)
    (empty / "config.json").write_text('{"model_type": "llama",\n  oops}')
    with pytest.raises(ModelError, match=r"config\.json: line 2: not valid JSON"):
        model_files.read_config(empty)
    (empty / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match="expected a JSON object, got list"):
        model_files.read_config(empty)
    with pytest.raises(ModelError, match="no such model directory"):
        model_files.read_config(tmp_path / "missing")


def test_weight_files_single_and_sharded(model, tmp_path):
    assert [p.name for p in model_files.weight_files(model)] == ["model.safetensors"]
    sharded = write_model(tmp_path / "sharded", shards=3)
    assert [p.name for p in model_files.weight_files(sharded)] == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    # a shard the index names is gone: the download is incomplete
    (sharded / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ModelError, match="model-00002-of-00003.safetensors.*incomplete"):
        model_files.weight_files(sharded)


def test_weight_files_requires_safetensors(tmp_path):
    folder = tmp_path / "pt"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ModelError, match=r"no \*\.safetensors weight files.*pytorch_model\.bin.*safe_serialization"):
        model_files.weight_files(folder)
    with pytest.raises(ModelError, match="no such model directory"):
        model_files.weight_files(tmp_path / "missing")


def test_read_tensor_index_from_headers(tmp_path):
    model = write_model(tmp_path / "sharded", shards=2)
    index = model_files.read_tensor_index(model)
    assert len(index) == len(llama_tensors())
    q = index["model.layers.1.self_attn.q_proj.weight"]
    assert (q.dtype, q.shape, q.numel) == ("F32", (HIDDEN, HIDDEN), HIDDEN * HIDDEN)
    assert index["model.layers.0.mlp.down_proj.weight"].shape == (HIDDEN, INTER)
    assert {info.file.name for info in index.values()} == {"model-00001-of-00002.safetensors",
                                                           "model-00002-of-00002.safetensors"}


def test_corrupt_safetensors_header_names_the_file(model):
    weights = model / "model.safetensors"
    weights.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(ModelError, match=r"model\.safetensors: not a safetensors file"):
        model_files.read_tensor_index(model)
    weights.write_bytes(struct.pack("<Q", 5) + b"{oops")
    with pytest.raises(ModelError, match=r"model\.safetensors: corrupt safetensors header"):
        model_files.read_tensor_index(model)
    weights.write_bytes(b"abc")
    with pytest.raises(ModelError, match="too short to be a safetensors file"):
        model_files.read_tensor_index(model)


def test_linear_module_names_exclude_embeddings_head_and_norms(model):
    names = model_files.linear_module_names(model)
    assert len(names) == 2 * 7
    assert "model.layers.0.self_attn.q_proj" in names and "model.layers.1.mlp.down_proj" in names
    assert not any("embed" in n or "lm_head" in n or "norm" in n for n in names)


def test_check_target_modules(model):
    assert len(model_files.check_target_modules(model, "all-linear")) == 14
    assert model_files.check_target_modules(model, ["q_proj", "v_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert model_files.check_target_modules(model, ["model.layers.1.mlp.up_proj"]) == ["model.layers.1.mlp.up_proj"]
    with pytest.raises(ModelError) as err:
        model_files.check_target_modules(model, ["q_proj", "qkv_proj", "dense"])
    message = str(err.value)
    assert "'qkv_proj', 'dense' match no layer" in message and "'q_proj'" not in message.split("available")[0]
    assert "available: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in message
    assert err.value.field == "target_modules"


def test_sha256_weights(tmp_path):
    model = write_model(tmp_path / "m", shards=2)
    combined, per_file = model_files.sha256_weights(model)
    files = sorted(p.name for p in model.glob("*.safetensors"))
    assert sorted(per_file) == files
    for name in files:
        assert per_file[name] == hashlib.sha256((model / name).read_bytes()).hexdigest()
    expected = hashlib.sha256("".join(f"{n} {per_file[n]}\n" for n in files).encode()).hexdigest()
    assert combined == expected
    # a changed weight changes both digests; config.json is not a weight file
    (model / "config.json").write_text("{}")
    assert model_files.sha256_weights(model)[0] == combined
    tensors = llama_tensors()
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2
    other = write_model(tmp_path / "other", tensors=tensors, shards=2)
    assert model_files.sha256_weights(other)[0] != combined


def test_check_same_architecture(tmp_path, model):
    same = write_model(tmp_path / "same")
    model_files.check_same_architecture(model, same)

    other_type = write_model(tmp_path / "mistral", config={"model_type": "mistral"})
    with pytest.raises(ModelError, match="`model_type` differs.*'llama'.*'mistral'"):
        model_files.check_same_architecture(model, other_type)

    reshaped = llama_tensors()
    reshaped["model.layers.1.mlp.gate_proj.weight"] = np.zeros((INTER + 2, HIDDEN), dtype=np.float32)
    wider = write_model(tmp_path / "wider", tensors=reshaped)
    with pytest.raises(ModelError, match=r"tensor model\.layers\.1\.mlp\.gate_proj\.weight: shape \[12, 8\] in "
                                         r"the base .* but \[14, 8\] in the fine-tuned"):
        model_files.check_same_architecture(model, wider)

    fewer = llama_tensors()
    del fewer["model.layers.1.mlp.up_proj.weight"]
    missing = write_model(tmp_path / "missing", tensors=fewer)
    with pytest.raises(ModelError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight is in the base model .* "
                                         "but not in the fine-tuned"):
        model_files.check_same_architecture(model, missing)
    with pytest.raises(ModelError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight is in the fine-tuned model "
                                         ".* but not in the base model"):
        model_files.check_same_architecture(missing, model)

    deeper = write_model(tmp_path / "deeper", tensors=llama_tensors(layers=3))
    with pytest.raises(ModelError, match=r"tensor model\.layers\.2\..* is in the fine-tuned model .* but not in "
                                         r"the base model .*\(and 7 more\)"):
        model_files.check_same_architecture(model, deeper)


def test_tensor_byte_ranges_point_at_the_data(tmp_path):
    tensors = llama_tensors()
    model = write_model(tmp_path / "m", tensors=tensors, shards=2)
    for name, info in model_files.read_tensor_index(model).items():
        with info.file.open("rb") as f:
            f.seek(info.offset)
            data = f.read(info.nbytes)
        assert data == tensors[name].tobytes(), name


def test_truncated_shard_is_reported(model):
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelError, match=r"model\.safetensors: tensor .* lies outside the file \(truncated download"):
        model_files.read_tensor_index(model)


def test_training_and_extraction_hash_a_base_model_alike(tiny_model_dir):
    """One base model, one hash in provenance, whatever kind of job recorded it."""
    from farm.training.integrity import weight_file_digests

    assert weight_file_digests(tiny_model_dir) == model_files.sha256_weights(tiny_model_dir)
