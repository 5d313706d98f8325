"""Dataset validation: every line of every format is checked; errors name the file and the line."""

from __future__ import annotations

import hashlib
import json

import pytest

from farm.datasets import validate_dataset
from farm.errors import DatasetError

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def write(tmp_path, lines, name="d.jsonl"):
    path = tmp_path / name
    path.write_bytes(b"".join((l if isinstance(l, bytes) else (l if isinstance(l, str) else json.dumps(l)).encode())
                              + b"\n" for l in lines))
    return path


def test_valid_file_digest_and_count(tmp_path):
    path = write(tmp_path, [CHAT, CHAT, ""])
    info = validate_dataset(path, "chat")
    assert info.examples == 2 and info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("fmt,row", [
    ("alpaca", {"instruction": "add", "input": "1 2", "output": "3"}),
    ("alpaca", {"instruction": "say hi", "output": "hi"}),
    ("completion", {"prompt": "2+2=", "completion": "4"}),
    ("text", {"text": "once upon a time"}),
])
def test_each_format_accepts_its_fields(tmp_path, fmt, row):
    assert validate_dataset(write(tmp_path, [row]), fmt).examples == 1


BAD_LINES = [
    ("chat", '{"messages": [', r"d\.jsonl:2: not valid JSON"),
    ("chat", "[1, 2]", r"d\.jsonl:2: each line must be a JSON object, got list"),
    ("chat", {"text": "x"}, r"d\.jsonl:2: missing field 'messages'"),
    ("chat", {"messages": []}, r"d\.jsonl:2: field 'messages' must be a non-empty list"),
    ("chat", {"messages": [{"role": "bot", "content": "x"}]}, r"d\.jsonl:2: messages\[0\]\.role must be one of"),
    ("chat", {"messages": [{"role": "assistant", "content": 3}]}, r"d\.jsonl:2: messages\[0\]\.content must be a string"),
    ("chat", {"messages": [{"role": "user", "content": "x"}]}, r"d\.jsonl:2: no assistant message"),
    ("alpaca", {"instruction": "x"}, r"d\.jsonl:2: missing field 'output'"),
    ("alpaca", {"instruction": "", "output": "y"}, r"d\.jsonl:2: field 'instruction' is empty"),
    ("completion", {"prompt": "x", "completion": ["y"]}, r"d\.jsonl:2: field 'completion' must be a string"),
    ("text", {"text": "   "}, r"d\.jsonl:2: field 'text' is empty"),
    ("chat", b"\xff\xfe{}", r"d\.jsonl:2: not UTF-8 text"),
]


@pytest.mark.parametrize("fmt,line,message", BAD_LINES, ids=[m for *_, m in BAD_LINES])
def test_bad_line_is_named(tmp_path, fmt, line, message):
    good = {"chat": CHAT, "alpaca": {"instruction": "a", "output": "b"}, "completion": {"prompt": "a", "completion": "b"},
            "text": {"text": "a"}}[fmt]
    with pytest.raises(DatasetError, match=message):
        validate_dataset(write(tmp_path, [good, line, good]), fmt)


def test_several_bad_lines_are_reported_together(tmp_path):
    with pytest.raises(DatasetError) as err:
        validate_dataset(write(tmp_path, [CHAT, "{", CHAT, "{"]), "chat")
    assert "d.jsonl:2" in err.value.message and "d.jsonl:4" in err.value.message


def test_missing_empty_and_folder(tmp_path):
    with pytest.raises(DatasetError, match="dataset file not found"):
        validate_dataset(tmp_path / "none.jsonl", "chat")
    with pytest.raises(DatasetError, match="has no examples"):
        validate_dataset(write(tmp_path, [""]), "chat")
    with pytest.raises(DatasetError, match="must be a JSONL file, not a folder"):
        validate_dataset(tmp_path, "chat")
    with pytest.raises(DatasetError, match="unknown dataset format"):
        validate_dataset(write(tmp_path, [CHAT]), "sharegpt")
