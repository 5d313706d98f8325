"""How a runner child process talks to the task that supervises it: JSON lines on stdout.

A line starting with ``@@farm `` carries one event; every other line is a log line. Event types:

- ``progress``: step, total_steps, loss, lr, tokens_per_s, eta_s, epoch, phase (train | extract)
- ``eval``: step, eval_loss, perplexity
- ``checkpoint``: step, path (a local folder the supervisor uploads to jobs/<id>/checkpoints/step-<k>/)
- ``log``: message
- ``done``: metrics (summary), provenance (base/dataset/source hashes, environment, timings, integrity)
- ``error``: code, message

A co-training runner (workers/cotrain_runner.py) speaks for several jobs: each event carries ``job_id``,
``progress`` carries ``group_size``, and ``left`` (job_id, reason) answers a leave request read from its stdin.

The job file the supervisor writes for the runner (``job.json``) holds: job_id, attempt, spec (resolved),
base_model, finetuned_model, dataset, eval_dataset, continue_from, resume_from (local paths or null),
output_dir, checkpoint_dir.
"""

from __future__ import annotations

import json
import sys

from farm.errors import SpecError

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


def parse_job(job: dict, spec_cls, required_keys: tuple[str, ...], what: str):
    """The job file's spec as `spec_cls`; SpecError naming the missing keys or the bad fields."""
    from pydantic import ValidationError

    if not isinstance(job, dict):
        raise SpecError(f"job file: expected a JSON object, got {type(job).__name__}")
    missing = [k for k in required_keys if job.get(k) in (None, "")]
    if missing:
        raise SpecError(f"job file: missing {', '.join(missing)} (the supervisor writes these; see "
                        "farm/runner_protocol.py)", field=missing[0])
    try:
        return spec_cls.model_validate(job["spec"])
    except ValidationError as exc:
        lines = [f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors()]
        raise SpecError(f"job spec is not a valid {what} spec:\n" + "\n".join(lines)) from None
