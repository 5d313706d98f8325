"""How a runner child process talks to the task that supervises it: JSON lines on stdout.

A line starting with ``@@farm `` carries one event; every other line is a log line. Event types:

- ``progress``: step, total_steps, loss, lr, tokens_per_s, eta_s, epoch, phase (train | extract)
- ``eval``: step, eval_loss, perplexity
- ``checkpoint``: step, path (a local folder the supervisor uploads to jobs/<id>/checkpoints/step-<k>/)
- ``log``: message
- ``done``: metrics (summary), provenance (base/dataset/source hashes, environment, timings, integrity)
- ``error``: code, message

The job file the supervisor writes for the runner (``job.json``) holds: job_id, attempt, spec (resolved),
base_model, finetuned_model, dataset, eval_dataset, continue_from, resume_from (local paths or null),
output_dir, checkpoint_dir.
"""

from __future__ import annotations

import json
import sys

EVENT_PREFIX = "@@farm "


def emit(event: dict, stream=None) -> None:
    """Write one event line (flushed at once so the supervisor sees progress live)."""
    stream = stream or sys.stdout
    stream.write(EVENT_PREFIX + json.dumps(event, separators=(",", ":"), default=str) + "\n")
    stream.flush()


def parse_line(line: str) -> dict | None:
    """The event on this line, or None for a plain log line."""
    if not line.startswith(EVENT_PREFIX):
        return None
    try:
        event = json.loads(line[len(EVENT_PREFIX):])
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "type" in event else None
