"""Training data: read a JSONL dataset, render each row as token ids with a loss mask, split off eval data.

Every format becomes `input_ids` plus `labels` of the same length, where -100 marks a token the loss ignores:

- chat: the conversation through the tokenizer's chat template (or a plain default one); loss on assistant turns only.
- alpaca: an instruction/input prompt then the output; loss on the output.
- completion: prompt then completion; loss on the completion.
- text: loss on every token.

`labels[0]` is always -100 (no example predicts its own first token), which is what lets packing put examples side
by side without one example's last token learning to predict the next example's first.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from farm.errors import DatasetError, ModelError

IGNORE_INDEX = -100
CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Example:
    """One tokenized example: ids and loss labels (-100 = no loss), same length."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @cached_property
    def target_count(self) -> int:
        """Tokens that carry loss once labels are shifted (labels[1:] not -100): counted once, not every step."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


@dataclass
class DataStats:
    """Counts reported in the log and in the adapter's provenance."""

    rows: int = 0
    train_examples: int = 0
    eval_examples: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_no_target: int = 0
    target_tokens: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class PreparedData:
    """Tokenized train and eval examples plus their counts."""

    train: list[Example]
    eval: list[Example] = field(default_factory=list)
    stats: DataStats = field(default_factory=DataStats)


# ---------------------------------------------------------------------------------------------------------------
# Reading


def _field_problem(row: dict, key: str, *, may_be_empty: bool = False, optional: bool = False) -> str | None:
    if key not in row:
        return None if optional else f"missing field {key!r}"
    if not isinstance(row[key], str):
        return f"field {key!r} must be a string, got {type(row[key]).__name__}"
    if not may_be_empty and not row[key].strip():
        return f"field {key!r} is empty"
    return None


def _chat_problem(row: dict) -> str | None:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return "field 'messages' must be a non-empty list of {role, content}"
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            return f"messages[{i}] must be an object with role and content"
        if msg.get("role") not in CHAT_ROLES:
            return f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {msg.get('role')!r}"
        if not isinstance(msg.get("content"), str):
            return f"messages[{i}].content must be a string"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message: chat examples train on assistant turns, so each needs at least one"
    return None


ROW_CHECKS = {
    "chat": _chat_problem,
    "alpaca": lambda r: (_field_problem(r, "instruction")
                         or _field_problem(r, "input", may_be_empty=True, optional=True)
                         or _field_problem(r, "output")),
    "completion": lambda r: _field_problem(r, "prompt", may_be_empty=True) or _field_problem(r, "completion"),
    "text": lambda r: _field_problem(r, "text"),
}


def read_rows(path: str | Path, fmt: str) -> list[tuple[int, dict]]:
    """(line number, row) for every row of a JSONL file, each checked against its format.

    Raise DatasetError naming the file and line of the first bad row.
    """
    path = Path(path)
    check = ROW_CHECKS.get(fmt)
    if check is None:
        raise DatasetError(f"unknown dataset format {fmt!r}: use one of {', '.join(ROW_CHECKS)}",
                           field="dataset.format")
    try:
        raw_lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        raise DatasetError(f"{path}: dataset file not found", field="dataset.path") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the dataset: {exc}", field="dataset.path") from None
    rows = []
    for lineno, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise DatasetError(f"{where}: not UTF-8 text; save the file as UTF-8", field="dataset.path") from None
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); each line must be one "
                               f"JSON object", field="dataset.path") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: each line must be a JSON object, got {type(row).__name__}",
                               field="dataset.path")
        problem = check(row)
        if problem:
            raise DatasetError(f"{where}: {problem} (format {fmt}); fix the line or change dataset.format",
                               field="dataset.path")
        rows.append((lineno, row))
    if not rows:
        raise DatasetError(f"{path}: the dataset has no examples (empty file?)", field="dataset.path")
    return rows


def split_eval(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval): a seeded random `fraction` of the rows (at least one) held out; the same seed, the same split."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(rows) * fraction))
    if n_eval >= len(rows):
        raise DatasetError(f"dataset.eval_fraction {fraction} of {len(rows)} examples leaves nothing to train on; "
                           "add examples or lower eval_fraction", field="dataset.eval_fraction")
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


# ---------------------------------------------------------------------------------------------------------------
# Tokenizing


class _Pieces:
    """Token ids and labels built piece by piece: text (tokenized without special tokens) or single token ids."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.labels: list[int] = []

    def text(self, text: str, train: bool) -> None:
        if text:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            self.ids += ids
            self.labels += ids if train else [IGNORE_INDEX] * len(ids)

    def token(self, token_id: int | None, train: bool) -> None:
        if token_id is not None:
            self.ids.append(token_id)
            self.labels.append(token_id if train else IGNORE_INDEX)


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _chat_with_template(row: dict, tokenizer) -> tuple[list[int], list[int]]:
    """Render with the model's own template; label the character spans each assistant turn adds.

    A turn's span is what the rendering of messages[:i+1] adds beyond messages[:i] plus the generation prompt,
    which is exactly what the model must produce at inference (content and end-of-turn token).
    """
    messages = row["messages"]
    full = _render(tokenizer, messages, False)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], True)
        upto = _render(tokenizer, messages[: i + 1], False)
        if not (full.startswith(upto) and upto.startswith(prefix)):
            raise ModelError(
                "the tokenizer's chat template does not render a conversation as a prefix of its continuation, so "
                "the assistant turns cannot be located for the loss mask; remove the template from "
                "tokenizer_config.json to use the farm's default chat format, or use the completion format"
            )
        spans.append((len(prefix), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for j, (start, _end) in enumerate(enc["offset_mapping"]):
        if any(lo <= start < hi for lo, hi in spans):
            labels[j] = ids[j]
    return ids, labels


def _chat_default(row: dict, tokenizer) -> tuple[list[int], list[int]]:
    """A plain format for tokenizers without a chat template: '### Role:' headers, eos closing assistant turns."""
    p = _Pieces(tokenizer)
    p.token(tokenizer.bos_token_id, False)
    for msg in row["messages"]:
        p.text(f"### {msg['role'].capitalize()}:\n", False)
        assistant = msg["role"] == "assistant"
        p.text(msg["content"], assistant)
        p.token(tokenizer.eos_token_id if assistant else None, True)
        p.text("\n\n", False)
    return p.ids, p.labels


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca prompt the output follows (the same text should be used at inference)."""
    prompt = f"### Instruction:\n{instruction}\n\n"
    if input_text.strip():
        prompt += f"### Input:\n{input_text}\n\n"
    return prompt + "### Response:\n"


def _prompt_and_target(prompt: str, target: str, tokenizer, train_prompt: bool = False) -> tuple[list, list]:
    p = _Pieces(tokenizer)
    p.token(tokenizer.bos_token_id, False)
    p.text(prompt, train_prompt)
    p.text(target, True)
    p.token(tokenizer.eos_token_id, True)
    return p.ids, p.labels


def tokenize_row(row: dict, fmt: str, tokenizer) -> Example:
    """One row as token ids and loss labels (see the module docstring for what each format trains on)."""
    if fmt == "chat":
        ids, labels = (_chat_with_template if tokenizer.chat_template else _chat_default)(row, tokenizer)
    elif fmt == "alpaca":
        ids, labels = _prompt_and_target(alpaca_prompt(row["instruction"], row.get("input", "")), row["output"],
                                         tokenizer)
    elif fmt == "completion":
        ids, labels = _prompt_and_target(row["prompt"], row["completion"], tokenizer)
    elif fmt == "text":
        ids, labels = _prompt_and_target("", row["text"], tokenizer)
    else:
        raise DatasetError(f"unknown dataset format {fmt!r}", field="dataset.format")
    if labels:
        labels[0] = IGNORE_INDEX
    return Example(ids, labels)


def has_target(example: Example) -> bool:
    return any(label != IGNORE_INDEX for label in example.labels)


def tokenize_rows(rows: list[tuple[int, dict]], fmt: str, tokenizer, max_seq_len: int, too_long: str,
                  stats: DataStats, source: str | Path = "dataset") -> list[Example]:
    """Tokenize (line number, row) pairs; truncate or drop those over max_seq_len; drop those with nothing to learn.

    Counts go into `stats` (truncated, dropped, dropped_no_target, target_tokens).
    """
    out = []
    for lineno, row in rows:
        try:
            ex = tokenize_row(row, fmt, tokenizer)
        except ModelError:
            raise
        except Exception as exc:  # a chat template may reject a conversation (roles must alternate, say)
            raise DatasetError(f"{source}:{lineno}: cannot render this example with the tokenizer: {exc}",
                               field="dataset.path") from None
        if len(ex) > max_seq_len:
            if too_long == "drop":
                stats.dropped += 1
                continue
            ex = Example(ex.input_ids[:max_seq_len], ex.labels[:max_seq_len])
            stats.truncated += 1
        if not has_target(ex):
            # Truncation cut off every trained token (or the row had none): the example would only add padding.
            stats.dropped += 1
            stats.dropped_no_target += 1
            continue
        stats.target_tokens += sum(label != IGNORE_INDEX for label in ex.labels)
        out.append(ex)
    return out


def prepare_data(spec, tokenizer, train_path: str | Path, eval_path: str | Path | None = None) -> PreparedData:
    """Read, split and tokenize the job's data per `spec` (a TrainSpec). Raise DatasetError when nothing is left."""
    fmt, params = spec.dataset.format, spec.training
    rows = read_rows(train_path, fmt)
    stats = DataStats(rows=len(rows))
    eval_rows: list[tuple[int, dict]] = []
    if eval_path is not None:
        eval_rows = read_rows(eval_path, fmt)
    elif spec.dataset.eval_fraction is not None:
        rows, eval_rows = split_eval(rows, spec.dataset.eval_fraction, params.seed)
    train = tokenize_rows(rows, fmt, tokenizer, params.max_seq_len, spec.dataset.too_long, stats, train_path)
    stats.train_examples = len(train)
    # Eval examples follow the same length rule but do not count in the training data's counts.
    eval_examples = tokenize_rows(eval_rows, fmt, tokenizer, params.max_seq_len, spec.dataset.too_long, DataStats(),
                                  eval_path or train_path)
    stats.eval_examples = len(eval_examples)
    if not train:
        raise DatasetError(
            f"{train_path}: no training example is left: {stats.dropped} of {len(rows)} were longer than "
            f"training.max_seq_len={params.max_seq_len} or had no tokens to learn; raise max_seq_len or use "
            "dataset.too_long: truncate", field="dataset.path")
    return PreparedData(train=train, eval=eval_examples, stats=stats)
