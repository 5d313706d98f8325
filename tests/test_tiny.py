"""The tiny model and datasets behave like the real thing: they load through the stock paths and are deterministic."""

from __future__ import annotations

import json

import pytest

from farm.datasets import validate_dataset
from farm.tiny import build_tiny_model, dataset_rows, write_dataset

FORMATS = ["chat", "alpaca", "completion", "text"]

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_tiny_model_loads_like_a_hub_model(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "llama"
    assert (tiny_model_dir / "model.safetensors").is_file()
    assert None not in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    ids = tokenizer("The cat is red.")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "The cat is red."
    # The trained BPE merges whole words of the corpus: far fewer tokens than bytes.
    assert len(ids) < len("The cat is red.") / 2
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), model.config.vocab_size)


def test_tiny_tokenizer_has_a_chat_template(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "user", "content": "What color is the cat?"}, {"role": "assistant", "content": "red"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<s><|user|>\nWhat color is the cat?</s>\n<|assistant|>\nred</s>\n"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n") and text.startswith(prompt)


def test_same_seed_same_model_other_seed_other_weights(tmp_path):
    a = build_tiny_model(tmp_path / "a", seed=1)
    b = build_tiny_model(tmp_path / "b", seed=1)
    c = build_tiny_model(tmp_path / "c", seed=2)
    weights = lambda d: (d / "model.safetensors").read_bytes()  # noqa: E731
    assert weights(a) == weights(b)
    assert weights(a) != weights(c)
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_model_size_follows_the_arguments(tmp_path):
    from transformers import AutoConfig

    path = build_tiny_model(tmp_path / "m", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=48)
    config = AutoConfig.from_pretrained(path)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 1, 2)
    assert config.intermediate_size == 48


@pytest.mark.parametrize("fmt", FORMATS)
def test_written_datasets_pass_the_farms_validation(tmp_path, fmt):
    path = write_dataset(tmp_path / f"{fmt}.jsonl", fmt, n=20, seed=5)
    info = validate_dataset(path, fmt)
    assert info.examples == 20 and info.format == fmt
    again = write_dataset(tmp_path / "again.jsonl", fmt, n=20, seed=5)
    assert again.read_bytes() == path.read_bytes()
    assert write_dataset(tmp_path / "other.jsonl", fmt, n=20, seed=6).read_bytes() != path.read_bytes()


def test_datasets_hold_a_learnable_mapping():
    # The same question always gets the same answer: a pattern a few steps of training can pick up.
    answers = {}
    for row in dataset_rows("chat", n=200, seed=0):
        question, answer = row["messages"][-2]["content"], row["messages"][-1]["content"]
        answers.setdefault(question, set()).add(answer)
    assert all(len(a) == 1 for a in answers.values())
    assert len(answers) > 5


def test_dataset_fixture_writes_jsonl(dataset_file):
    path = dataset_file("alpaca", n=3)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 3 and set(rows[0]) == {"instruction", "input", "output"}


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset format 'csv'"):
        write_dataset(tmp_path / "x.jsonl", "csv")
