"""Spec validation at the door: every bad input gets a message naming the field (or file and line)."""

from __future__ import annotations

import pytest

from farm.errors import SpecError
from farm.specs import ExtractSpec, TrainSpec, load_spec, parse_spec, queue_for, spec_hash

GOOD = {"kind": "train", "name": "support-bot", "base_model": "./models/tiny", "dataset": {"path": "d.jsonl"}}


def with_(base: dict, path: str, value) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    node = out
    *parents, leaf = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return out


def test_the_issue_example_parses_with_defaults_filled_in():
    spec = parse_spec({
        "kind": "train", "name": "support-bot", "base_model": "./models/tiny-llama",
        "dataset": {"path": "./data/train.jsonl", "format": "chat"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"},
        "quantization": {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"},
        "training": {"epochs": 1, "max_steps": 20, "lr": 2.0e-4, "micro_batch_size": 2, "grad_accum": 2,
                     "max_seq_len": 256, "seed": 42},
        "resources": {"gpus": 0},
    })
    assert isinstance(spec, TrainSpec)
    assert spec.training.lr_scheduler == "cosine" and spec.dataset.too_long == "truncate"
    assert queue_for(spec) == "farm.cpu"
    assert len(spec_hash(spec)) == 64


BAD_SPECS = [
    (with_(GOOD, "colour", "red"), r"colour: unknown key"),
    (with_(GOOD, "lora.rank", 8), r"lora\.rank: unknown key"),
    (with_(GOOD, "name", "../etc"), r"name: String should match pattern"),
    (with_(GOOD, "name", "Support Bot"), r"name: String should match pattern"),
    ({k: v for k, v in GOOD.items() if k != "kind"}, r"kind: missing"),
    (with_(GOOD, "kind", "finetune"), r"kind: must be 'train' or 'extract'"),
    ({k: v for k, v in GOOD.items() if k != "base_model"}, r"base_model: Field required"),
    (with_(GOOD, "lora.r", 0), r"lora\.r: Input should be greater than or equal to 1"),
    (with_(GOOD, "lora.target_modules", []), r"lora: target_modules is empty"),
    (with_(GOOD, "dataset.format", "sharegpt"), r"dataset\.format: Input should be 'chat', 'alpaca'"),
    (with_(GOOD, "quantization.bits", 3), r"quantization\.bits: Input should be 4, 8 or 16"),
    (with_(GOOD, "training.lr", -1), r"training\.lr: Input should be greater than 0"),
    (with_(GOOD, "training.micro_batch_size", "two"), r"training\.micro_batch_size: Input should be a valid integer"),
    (with_(with_(GOOD, "dataset.eval_path", "e.jsonl"), "dataset.eval_fraction", 0.1),
     r"dataset: give eval_path or eval_fraction, not both"),
    (with_(GOOD, "dataset.eval_fraction", 0.9), r"dataset\.eval_fraction: Input should be less than 0\.5"),
    (with_(GOOD, "resources.gpus", 2), r"needs a `deepspeed:` section"),
    (with_(GOOD, "resources.gpus", -1), r"resources\.gpus: Input should be greater than or equal to 0"),
    (with_(with_(GOOD, "deepspeed", {"stage": 2}), "quantization.bits", 8), r"8-bit quantization cannot be sharded"),
    (with_(GOOD, "deepspeed", {"stage": 2, "offload_params": True}), r"deepspeed: offload_params needs stage 3"),
    (with_(GOOD, "deepspeed", {"stage": 3, "offload_params": True}), r"ZeRO-3 parameter offload does not work"),
    ({"kind": "extract", "name": "x", "base_model": "a", "finetuned_model": "b"}, r"give exactly one of rank or energy"),
    ({"kind": "extract", "name": "x", "base_model": "a", "finetuned_model": "b", "rank": 8, "energy": 0.9},
     r"give exactly one of rank or energy"),
    ({"kind": "extract", "name": "x", "base_model": "a", "finetuned_model": "b", "rank": 256},
     r"rank 256 is larger than max_rank 128"),
    ({"kind": "extract", "name": "x", "base_model": "a", "finetuned_model": "b", "energy": 1.5},
     r"energy: Input should be less than or equal to 1"),
    (["kind", "train"], r"expected a mapping of fields, got list"),
]


@pytest.mark.parametrize("data,message", BAD_SPECS, ids=[m for _, m in BAD_SPECS])
def test_bad_spec_is_refused_with_a_message_naming_the_field(data, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(data)


def test_every_problem_is_reported_at_once():
    bad = with_(with_(GOOD, "lora.r", 0), "training.lr", 0)
    with pytest.raises(SpecError) as err:
        parse_spec(bad)
    assert "lora.r" in err.value.message and "training.lr" in err.value.message


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("kind: train\nname: x\nlora: {r: 8\n  alpha: 16\n")
    with pytest.raises(SpecError, match=r"job\.yaml: line \d+: not valid YAML"):
        load_spec(path)


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match=r"no such spec file"):
        load_spec(tmp_path / "nope.yaml")


def test_relative_paths_resolve_against_the_spec_folder(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "t.jsonl").write_text("{}\n")
    (tmp_path / "job.yaml").write_text("kind: train\nname: x\nbase_model: ./models/m\ndataset: {path: ./data/t.jsonl}\n")
    spec = load_spec(tmp_path / "job.yaml")
    assert spec.dataset.path == str(tmp_path / "data" / "t.jsonl")
    assert spec.base_model == str(tmp_path / "models" / "m")


def test_hub_ids_stay_as_they_are(tmp_path):
    (tmp_path / "job.yaml").write_text("kind: extract\nname: x\nbase_model: org/base\nfinetuned_model: org/ft\nrank: 4\n")
    spec = load_spec(tmp_path / "job.yaml")
    assert isinstance(spec, ExtractSpec) and spec.base_model == "org/base"


def test_queues_follow_resources():
    assert queue_for(parse_spec(with_(GOOD, "resources", {"gpus": 1}))) == "farm.gpu.1"
    assert queue_for(parse_spec(with_(with_(GOOD, "resources", {"gpus": 4}), "deepspeed", {"stage": 2}))) == "farm.gpu.4"
    assert queue_for(parse_spec(with_(with_(GOOD, "resources", {"cpu_slots": 2}), "deepspeed", {}))) == "farm.cpu.2"


def test_dataset_paths_without_dot_resolve_against_the_spec_folder(tmp_path, monkeypatch):
    monkeypatch.chdir("/")
    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "job.yaml").write_text("kind: train\nname: x\nbase_model: models/m\ndataset: {path: data/t.jsonl}\n")
    spec = load_spec(tmp_path / "job.yaml")
    assert spec.dataset.path == str(tmp_path / "data" / "t.jsonl")
    assert spec.base_model == str(tmp_path / "models" / "m")


def test_field_docstrings_are_the_descriptions_pydantic_would_give():
    """farm.schemas.document_fields reads field docstrings from one parse of each module; every spec and schema
    field's description must be what pydantic's own `use_attribute_docstrings` extraction gives."""
    import inspect

    from pydantic import BaseModel
    from pydantic._internal._docs_extraction import extract_docstrings_from_cls

    from farm import schemas, specs

    checked = 0
    for module in (specs, schemas):
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if not issubclass(cls, BaseModel) or cls.__module__ != module.__name__:
                continue
            for name, doc in extract_docstrings_from_cls(cls, use_inspect=True).items():
                field = cls.model_fields.get(name)
                if field is None:
                    continue
                declared = cls.__dict__.get(name)
                if getattr(declared, "description", None) not in (None, doc):
                    continue  # an explicit Field(description=...) wins, as with pydantic
                assert field.description == doc, f"{cls.__name__}.{name}"
                checked += 1
    assert checked > 50
