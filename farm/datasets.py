"""Dataset validation at the door: every line parses and has its format's fields. No torch here.

The file is read once: the sha256 (its digest in provenance and its key in the store) is computed while the lines
are checked.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from farm.errors import DatasetError
from farm.limits import InputTooComplex, check_structure

CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_REPORTED_ERRORS = 5
MAX_LINE_BYTES = 64 * 1024 * 1024
"""Longest line (one example) accepted; a longer one is reported, not read into memory whole."""


@dataclass(frozen=True)
class DatasetInfo:
    """What the catalog records about a dataset file."""

    path: str
    sha256: str
    size: int
    examples: int
    format: str


def _str_field(row: dict, key: str, *, required: bool = True, allow_empty: bool = False) -> str | None:
    if key not in row:
        if required:
            return f"missing field {key!r}"
        return None
    value = row[key]
    if not isinstance(value, str):
        return f"field {key!r} must be a string, got {type(value).__name__}"
    if not allow_empty and required and not value.strip():
        return f"field {key!r} is empty"
    return None


def _check_chat(row: dict) -> str | None:
    messages = row.get("messages")
    if messages is None:
        return "missing field 'messages' (a list of {role, content})"
    if not isinstance(messages, list) or not messages:
        return "field 'messages' must be a non-empty list of {role, content}"
    has_assistant = False
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            return f"messages[{i}] must be an object with role and content"
        role = msg.get("role")
        if role not in CHAT_ROLES:
            return f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}"
        if not isinstance(msg.get("content"), str):
            return f"messages[{i}].content must be a string"
        has_assistant |= role == "assistant"
    if not has_assistant:
        return "no assistant message: chat examples train on assistant turns, so each needs at least one"
    return None


def _check_alpaca(row: dict) -> str | None:
    return (_str_field(row, "instruction") or _str_field(row, "input", required=False, allow_empty=True)
            or _str_field(row, "output"))


def _check_completion(row: dict) -> str | None:
    return _str_field(row, "prompt", allow_empty=True) or _str_field(row, "completion")


def _check_text(row: dict) -> str | None:
    return _str_field(row, "text")


CHECKS = {"chat": _check_chat, "alpaca": _check_alpaca, "completion": _check_completion, "text": _check_text}


def _lines(fh, digest):
    """(line number, bytes, 0) per line, or (line number, b"", its length) for a line over MAX_LINE_BYTES, which
    is hashed as it streams but never held whole. Every byte goes through `digest`."""
    lineno = 0
    while True:
        raw = fh.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        lineno += 1
        digest.update(raw)
        if len(raw) <= MAX_LINE_BYTES or raw.endswith(b"\n"):
            yield lineno, raw, 0
            continue
        length = len(raw)
        while raw and not raw.endswith(b"\n"):
            raw = fh.readline(1024 * 1024)
            digest.update(raw)
            length += len(raw)
        yield lineno, b"", length


def validate_dataset(path: str | Path, fmt: str) -> DatasetInfo:
    """Check every line of a JSONL dataset against its format; raise DatasetError naming file and line."""
    path = Path(path)
    check = CHECKS.get(fmt)
    if check is None:
        raise DatasetError(f"unknown dataset format {fmt!r}: use one of {', '.join(CHECKS)}", field="dataset.format")
    if not path.exists():
        raise DatasetError(f"{path}: dataset file not found (dataset.path is resolved against the spec's folder)",
                           field="dataset.path")
    if not path.is_file():
        raise DatasetError(f"{path}: dataset.path must be a JSONL file, not a folder", field="dataset.path")
    digest, size, examples, errors = hashlib.sha256(), 0, 0, []
    with path.open("rb") as fh:
        for lineno, raw, too_long in _lines(fh, digest):
            size += too_long or len(raw)
            if len(errors) >= MAX_REPORTED_ERRORS:
                continue
            if too_long:
                errors.append(f"{path}:{lineno}: line of {too_long} bytes is longer than the limit of "
                              f"{MAX_LINE_BYTES} bytes per example; split or shorten it")
                continue
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
                check_structure(row, max_int_digits=None, allow_nul=True)
            except UnicodeDecodeError:
                errors.append(f"{path}:{lineno}: not UTF-8 text")
                continue
            except json.JSONDecodeError as exc:
                errors.append(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            except RecursionError:
                errors.append(f"{path}:{lineno}: not usable: nested too deeply; flatten the example")
                continue
            except InputTooComplex as exc:
                errors.append(f"{path}:{lineno}: not usable: {exc}")
                continue
            except ValueError as exc:  # a number of more than 4300 digits (Python's int conversion limit)
                errors.append(f"{path}:{lineno}: not usable JSON ({str(exc).split(':')[0]})")
                continue
            if not isinstance(row, dict):
                errors.append(f"{path}:{lineno}: each line must be a JSON object, got {type(row).__name__}")
                continue
            problem = check(row)
            if problem:
                errors.append(f"{path}:{lineno}: {problem} (format {fmt})")
                continue
            examples += 1
    if errors:
        more = " (further lines not checked)" if len(errors) >= MAX_REPORTED_ERRORS else ""
        raise DatasetError("\n".join(errors) + more + "\nFix these lines and submit again.", field="dataset.path")
    if examples == 0:
        raise DatasetError(f"{path}: the dataset has no examples (empty file?)", field="dataset.path")
    return DatasetInfo(path=str(path), sha256=digest.hexdigest(), size=size, examples=examples, format=fmt)
