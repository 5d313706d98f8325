"""Training data: loss masks per format, length limits, eval split, packing that keeps examples apart, bad lines."""

from __future__ import annotations

import json

import pytest

from farm.errors import DatasetError
from farm.specs import TrainSpec
from farm.training.data import IGNORE_INDEX, DataStats, Example, prepare_data, read_rows, split_eval, tokenize_row, \
    tokenize_rows
from farm.training.packing import collate, pack_examples, to_rows

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from farm.training.model import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture
def plain_tokenizer(tiny_model_dir):
    """The same tokenizer without a chat template (a fresh copy: the module one keeps its template)."""
    from farm.training.model import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    tok.chat_template = None
    return tok


def trained_text(example: Example, tokenizer) -> str:
    """The text of the tokens that carry loss."""
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


def untrained_text(example: Example, tokenizer) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label == IGNORE_INDEX])


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def spec_for(path, fmt="chat", **training):
    dataset = {"path": str(path), "format": fmt}
    for key in ("eval_fraction", "too_long"):
        if key in training:
            dataset[key] = training.pop(key)
    return TrainSpec(name="t", base_model="/models/tiny", dataset=dataset, training=training)


CHAT = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What color is the cat?"},
    {"role": "assistant", "content": "The cat is red."},
    {"role": "user", "content": "And the dog?"},
    {"role": "assistant", "content": "The dog is blue."},
]}


# ------------------------------------------------------------------------------------------------- loss masks


def test_chat_with_template_trains_on_assistant_turns_only(tokenizer):
    ex = tokenize_row(CHAT, "chat", tokenizer)
    assert len(ex.input_ids) == len(ex.labels)
    # Each assistant turn as the template renders it: the content and the end-of-turn token that follows it.
    assert trained_text(ex, tokenizer) == "The cat is red.</s>\nThe dog is blue.</s>\n"
    rendered = tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)
    assert tokenizer.decode(ex.input_ids) == rendered
    assert "What color is the cat?" in untrained_text(ex, tokenizer)
    assert "<|assistant|>" in untrained_text(ex, tokenizer)


def test_chat_without_template_uses_the_default_format(plain_tokenizer):
    ex = tokenize_row(CHAT, "chat", plain_tokenizer)
    assert ex.input_ids[0] == plain_tokenizer.bos_token_id
    assert trained_text(ex, plain_tokenizer) == "The cat is red.</s>The dog is blue.</s>"
    prompt = untrained_text(ex, plain_tokenizer)
    assert "### User:\nWhat color is the cat?" in prompt and "### Assistant:\n" in prompt
    assert "Be brief." in prompt


def test_alpaca_trains_on_the_output(tokenizer):
    ex = tokenize_row({"instruction": "Repeat the word.", "input": "fox", "output": "fox fox fox"}, "alpaca", tokenizer)
    assert trained_text(ex, tokenizer) == "fox fox fox</s>"
    prompt = "<s>### Instruction:\nRepeat the word.\n\n### Input:\nfox\n\n### Response:\n"
    assert untrained_text(ex, tokenizer) == prompt
    no_input = tokenize_row({"instruction": "Say hi.", "output": "hi"}, "alpaca", tokenizer)
    assert "### Input" not in untrained_text(no_input, tokenizer)


def test_completion_trains_on_the_completion(tokenizer):
    ex = tokenize_row({"prompt": "Count from 3:", "completion": " 4 5 6"}, "completion", tokenizer)
    assert trained_text(ex, tokenizer) == " 4 5 6</s>"
    assert untrained_text(ex, tokenizer) == "<s>Count from 3:"


def test_text_trains_on_everything_but_the_first_token(tokenizer):
    ex = tokenize_row({"text": "The owl is gray."}, "text", tokenizer)
    assert ex.labels[0] == IGNORE_INDEX and ex.input_ids[0] == tokenizer.bos_token_id
    assert ex.labels[1:] == ex.input_ids[1:]
    assert trained_text(ex, tokenizer) == "The owl is gray.</s>"


@pytest.mark.parametrize("fmt", ["chat", "alpaca", "completion", "text"])
def test_no_example_predicts_its_own_first_token(tokenizer, fmt):
    from farm.tiny import dataset_rows

    for row in dataset_rows(fmt, n=8):
        assert tokenize_row(row, fmt, tokenizer).labels[0] == IGNORE_INDEX


# ------------------------------------------------------------------------------------------------- lengths, split


def test_truncate_and_drop_are_counted(tokenizer):
    rows = [(1, {"text": "The cat likes bread."}), (2, {"text": " ".join(["The dog is brown."] * 20)}),
            (3, {"text": " ".join(["The fox is red."] * 20)})]
    truncated = DataStats()
    out = tokenize_rows(rows, "text", tokenizer, 16, "truncate", truncated)
    assert (len(out), truncated.truncated, truncated.dropped) == (3, 2, 0)
    assert all(len(ex) <= 16 for ex in out)
    dropped = DataStats()
    out = tokenize_rows(rows, "text", tokenizer, 16, "drop", dropped)
    assert (len(out), dropped.truncated, dropped.dropped) == (1, 0, 2)


def test_truncation_that_cuts_off_every_target_drops_the_example(tokenizer):
    rows = [(1, {"prompt": "Count " * 40, "completion": " 1 2"})]
    stats = DataStats()
    assert tokenize_rows(rows, "completion", tokenizer, 12, "truncate", stats) == []
    assert (stats.truncated, stats.dropped, stats.dropped_no_target) == (1, 1, 1)


def test_prepare_data_reports_counts_and_refuses_an_empty_result(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "The owl is gray. " * 30}] * 3 + [{"text": "hi"}])
    data = prepare_data(spec_for(path, "text", max_seq_len=16, too_long="drop"), tokenizer, path)
    assert (data.stats.rows, data.stats.train_examples, data.stats.dropped) == (4, 1, 3)
    only_long = write_jsonl(tmp_path / "long.jsonl", [{"text": "The owl is gray. " * 30}])
    with pytest.raises(DatasetError, match=r"no training example is left: 1 of 1.*max_seq_len=16"):
        prepare_data(spec_for(only_long, "text", max_seq_len=16, too_long="drop"), tokenizer, only_long)


def test_eval_split_is_deterministic_for_a_seed():
    rows = list(range(100))
    train, held = split_eval(rows, 0.1, seed=7)
    assert (len(train), len(held)) == (90, 10)
    assert sorted(train + held) == rows
    assert split_eval(rows, 0.1, seed=7) == (train, held)
    assert split_eval(rows, 0.1, seed=8)[1] != held
    assert len(split_eval(rows[:5], 0.01, seed=0)[1]) == 1  # at least one eval example


def test_eval_comes_from_the_fraction_or_the_eval_file(tmp_path, tokenizer, dataset_file):
    train = dataset_file("text", n=40)
    data = prepare_data(spec_for(train, "text", eval_fraction=0.25, seed=3), tokenizer, train)
    assert (data.stats.train_examples, data.stats.eval_examples) == (30, 10)
    again = prepare_data(spec_for(train, "text", eval_fraction=0.25, seed=3), tokenizer, train)
    assert [e.input_ids for e in again.eval] == [e.input_ids for e in data.eval]
    held = dataset_file("text", n=7, seed=9, name="held")
    data = prepare_data(spec_for(train, "text"), tokenizer, train, held)
    assert (data.stats.train_examples, data.stats.eval_examples) == (40, 7)


# ------------------------------------------------------------------------------------------------- packing


def test_packing_fills_rows_without_splitting_or_losing_examples():
    examples = [Example([1] * n, [IGNORE_INDEX] + [1] * (n - 1)) for n in (5, 3, 7, 2, 6, 1, 4)]
    rows = pack_examples(examples, max_len=10)
    assert all(sum(len(e) for e in row) <= 10 for row in rows)
    assert sorted(id(e) for row in rows for e in row) == sorted(id(e) for e in examples)  # each exactly once
    # 28 tokens in rows of 10: best-fit decreasing needs the minimum, 3 rows (7+3, 6+4, 5+2+1); greedy in order 4.
    assert len(rows) == 3
    assert pack_examples(examples, max_len=10) == rows  # deterministic: a resumed run rebuilds the same rows
    assert to_rows(examples, 10, packing=False) == [[e] for e in examples]


def test_packed_batch_restarts_positions_and_masks_boundaries():
    a = Example([10, 11, 12], [IGNORE_INDEX, 11, 12])
    b = Example([20, 21], [IGNORE_INDEX, 21])
    batch = collate([[a, b], [b]], pad_id=0, packed=True)
    assert batch.attention_mask is None
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    # targets[t] = label of token t+1; a's last token must not learn b's first token.
    assert batch.targets.tolist()[0] == [11, 12, IGNORE_INDEX, 21, IGNORE_INDEX]
    assert batch.targets.tolist()[1] == [21, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert (batch.tokens, batch.target_tokens) == (7, 4)
    flat = collate([[a, b], [b]], pad_id=0, packed=True, flatten=True)
    assert flat.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1]] and flat.tokens == 7


def test_unpacked_batch_pads_right_with_a_mask():
    a = Example([10, 11, 12], [IGNORE_INDEX, 11, 12])
    b = Example([20, 21], [IGNORE_INDEX, 21])
    batch = collate([[a], [b]], pad_id=0, packed=False)
    assert batch.input_ids.tolist() == [[10, 11, 12], [20, 21, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch.targets.tolist() == [[11, 12, IGNORE_INDEX], [21, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch.position_ids is None


@pytest.fixture(scope="module")
def fp32_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype="float32").eval()


def test_packed_examples_get_the_same_logits_as_alone(fp32_model, tokenizer):
    """No attention crosses an example boundary: each packed example sees exactly what it sees alone."""
    import torch

    from farm.tiny import dataset_rows

    examples = [tokenize_row(r, "chat", tokenizer) for r in dataset_rows("chat", n=4, seed=1)]
    batch = collate([examples], tokenizer.pad_token_id, packed=True)
    with torch.no_grad():
        packed = fp32_model(**batch.model_inputs()).logits[0]
        start = 0
        for ex in examples:
            alone = fp32_model(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[start:start + len(ex)], alone, rtol=1e-4, atol=1e-4)
            start += len(ex)
        # Control: the same row without restarting positions lets later examples attend to earlier ones.
        leaky = fp32_model(input_ids=batch.input_ids, use_cache=False).logits[0]
    tail = slice(len(examples[0]), start)
    assert not torch.allclose(leaky[tail], packed[tail], atol=1e-3)


def test_packed_loss_equals_the_sum_of_separate_losses(fp32_model, tokenizer):
    import torch

    from farm.tiny import dataset_rows
    from farm.training.backend import loss_sum

    examples = [tokenize_row(r, "completion", tokenizer) for r in dataset_rows("completion", n=5, seed=2)]
    with torch.no_grad():
        packed = loss_sum(fp32_model, collate(pack_examples(examples, 64), tokenizer.pad_token_id, packed=True))
        padded = loss_sum(fp32_model, collate([[e] for e in examples], tokenizer.pad_token_id, packed=False))
        separate = sum(loss_sum(fp32_model, collate([[e]], tokenizer.pad_token_id, packed=False)) for e in examples)
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(padded, separate, rtol=1e-5, atol=1e-4)


def test_segment_plan_groups_examples_and_maps_every_token_back():
    import torch

    from tests.benchmarks.varlen_attention import segment_plan

    # Row 0: examples of 4 and 2 tokens; row 1: 3 tokens, then 3 of padding (positions restart: one more segment).
    positions = torch.tensor([[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]])
    plan, scatter = segment_plan(positions, rows=2, group_ratio=0.75)
    # Longest first; 3 >= 0.75 x 4 joins the 4-token group (padded at its end), 2 starts its own group.
    assert [(count, longest) for count, longest, _ in plan] == [(3, 4), (1, 2)]
    assert plan[0][2].tolist() == [0, 1, 2, 3, 6, 7, 8, 6, 9, 10, 11, 9]  # row 1's examples at flat 6 and 9
    gathered = torch.cat([gather for _, _, gather in plan])
    assert gathered[scatter].tolist() == list(range(12))  # every token comes back to its own place
    assert segment_plan(positions, rows=2) is segment_plan(positions, rows=2)  # one plan per position tensor


def test_varlen_attention_matches_the_masked_rows_and_each_example_alone(fp32_model, tokenizer, monkeypatch):
    """Attention per example (tests/benchmarks/varlen_attention.py, the packing benchmark's experiment): the same logits as each example alone and
    as sdpa's block-diagonal mask, the same gradients, one segment plan per forward and no mask built."""
    import torch
    from transformers import masking_utils

    from farm.tiny import dataset_rows
    from tests.benchmarks import varlen_attention as packing

    examples = [tokenize_row(r, "chat", tokenizer) for r in dataset_rows("chat", n=5, seed=3)]
    batch = collate([examples[:3], examples[3:]], tokenizer.pad_token_id, packed=True)  # row 1 padded
    builds, detections = [], []
    build, detect = packing._build_plan, masking_utils.find_packed_sequence_indices
    monkeypatch.setattr(packing, "_build_plan", lambda *a: builds.append(1) or build(*a))
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda p: detections.append(1) or detect(p))
    config = fp32_model.config

    def forward(grad_of):
        fp32_model.zero_grad(set_to_none=True)
        logits = fp32_model(**batch.model_inputs()).logits
        logits.float().square().mean().backward()
        return logits.detach(), grad_of.weight.grad.clone()

    q_proj = fp32_model.model.layers[0].self_attn.q_proj
    masked, masked_grad = forward(q_proj)
    assert len(detections) == 1  # sdpa: transformers detects the packing and builds the mask once per forward
    try:
        assert packing.use_varlen_attention(fp32_model)
        varlen, varlen_grad = forward(q_proj)
    finally:
        config._attn_implementation = "sdpa"
        fp32_model.zero_grad(set_to_none=True)
    assert len(detections) == 1 and len(builds) == 1  # varlen: no mask, one plan for all layers
    torch.testing.assert_close(varlen, masked, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(varlen_grad, masked_grad, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        for r, row in enumerate([examples[:3], examples[3:]]):
            start = 0
            for ex in row:
                alone = fp32_model(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0]
                torch.testing.assert_close(varlen[r, start:start + len(ex)], alone, rtol=1e-4, atol=1e-4)
                start += len(ex)


# ------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("line, fmt, message", [
    ('{"text": "ok"', "text", r"bad\.jsonl:3: not valid JSON"),
    ('["a list"]', "text", r"bad\.jsonl:3: each line must be a JSON object, got list"),
    ('{"txt": "typo"}', "text", r"bad\.jsonl:3: missing field 'text' \(format text\)"),
    ('{"text": 5}', "text", r"bad\.jsonl:3: field 'text' must be a string, got int"),
    ('{"prompt": "p"}', "completion", r"bad\.jsonl:3: missing field 'completion'"),
    ('{"instruction": "i", "output": ""}', "alpaca", r"bad\.jsonl:3: field 'output' is empty"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "chat", r"bad\.jsonl:3: no assistant message"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', "chat", r"bad\.jsonl:3: messages\[0\]\.role must be one of"),
    ('{"messages": "hello"}', "chat", r"bad\.jsonl:3: field 'messages' must be a non-empty list"),
])
def test_a_bad_line_is_named_with_its_number(tmp_path, line, fmt, message):
    from farm.tiny import dataset_rows

    good = dataset_rows(fmt, n=2)
    path = write_jsonl(tmp_path / "bad.jsonl", [*good, line, *good])
    with pytest.raises(DatasetError, match=message) as info:
        read_rows(path, fmt)
    assert info.value.field == "dataset.path"


def test_unreadable_files_are_refused_clearly(tmp_path):
    with pytest.raises(DatasetError, match="dataset file not found"):
        read_rows(tmp_path / "missing.jsonl", "text")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DatasetError, match="no examples"):
        read_rows(tmp_path / "empty.jsonl", "text")
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DatasetError, match=r"latin1\.jsonl:1: not UTF-8"):
        read_rows(tmp_path / "latin1.jsonl", "text")


def test_a_row_the_chat_template_rejects_is_named(tmp_path, tiny_model_dir):
    from farm.training.model import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('system messages are not supported') }}{% endif %}"
                         "{{ m['content'] }}{% endfor %}")
    rows = [(1, {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
            (2, {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}]})]
    with pytest.raises(DatasetError, match=r"d\.jsonl:2: cannot render this example.*system messages are not"):
        tokenize_rows(rows, "chat", tok, 64, "truncate", DataStats(), source=tmp_path / "d.jsonl")
