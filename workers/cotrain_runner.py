"""The runner child process of a co-training group: `python -m workers.cotrain_runner GROUP_JSON_PATH`.

The group file holds ``{"jobs": [job file, ...]}`` (each as farm/runner_protocol.py describes a job file). The
runner trains them together (farm.training.cotrain) and reports every job's events on stdout, each with its
``job_id``. Its stdin is the control channel: one JSON object a line, ``{"op": "join", "job": {...}}`` or
``{"op": "leave", "job_id": ..., "reason": ...}``, read between training steps. Exit status 0 when every job has
left (done, failed alone, or told to leave); 1 after a failure of the whole group, reported as an `error` event
for each job still in it.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import traceback
from pathlib import Path

from farm.errors import FarmError, SpecError
from farm.runner_protocol import emit

TRACEBACK_LINES = 15


def read_group(path: str | Path) -> list[dict]:
    """The group file's jobs; SpecError when it is missing, not JSON, or holds no training job."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"{path}: group file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(f"{path}: unreadable group file: {exc}") from None
    jobs = doc.get("jobs") if isinstance(doc, dict) else None
    if not isinstance(jobs, list) or not jobs or not all(isinstance(j, dict) for j in jobs):
        raise SpecError(f"{path}: expected {{\"jobs\": [job, ...]}} with at least one job")
    for job in jobs:
        kind = job.get("spec", {}).get("kind") if isinstance(job.get("spec"), dict) else None
        if kind != "train":
            raise SpecError(f"{path}: job {job.get('job_id')}: only training jobs co-train (spec.kind {kind!r})",
                            field="kind")
    return jobs


class ControlChannel:
    """Control messages from a stream (stdin), read by a thread and handed over between steps."""

    def __init__(self, stream):
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            line = line.strip()
            if not line:
                continue
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                print(f"control: not JSON, ignored: {line[:200]}", file=sys.stderr)
                continue
            if isinstance(message, dict):
                self._queue.put(message)

    def __call__(self) -> list[dict]:
        messages = []
        while True:
            try:
                messages.append(self._queue.get_nowait())
            except queue.Empty:
                return messages


def main(argv: list[str] | None = None) -> int:
    """Run the group named on the command line; return the exit status."""
    from workers.runner import limit_threads

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m workers.cotrain_runner GROUP_JSON_PATH", file=sys.stderr)
        return 2
    job_ids: list[str] = []  # every job this runner was given, in order
    ended: set[str] = set()  # those that reported done, error or left

    def report(event: dict) -> None:
        if event.get("type") in ("done", "error", "left"):
            ended.add(str(event.get("job_id")))
        emit(event)

    def control() -> list[dict]:
        messages = channel()
        job_ids.extend(str(m["job"].get("job_id")) for m in messages
                       if m.get("op") == "join" and isinstance(m.get("job"), dict))
        return messages

    try:
        jobs = read_group(argv[0])
        job_ids.extend(str(j.get("job_id")) for j in jobs)
        limit_threads()
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        from farm.training.cotrain import CoTrainer

        channel = ControlChannel(sys.stdin)
        CoTrainer(jobs, report, control).run()
    except Exception as exc:
        if isinstance(exc, FarmError):
            code, message = exc.code, exc.message
        else:
            code = "runner_crashed"
            message = "\n".join(traceback.format_exc().rstrip().splitlines()[-TRACEBACK_LINES:])
        # Every job still in the group fails with it (each may get another attempt, alone or in a new group).
        if not job_ids:  # the group file itself was unusable
            emit({"type": "error", "code": code, "message": message})
        for job_id in dict.fromkeys(job_ids):
            if job_id not in ended:
                emit({"type": "error", "code": code, "message": message, "job_id": job_id})
        return 1
    return 0


if __name__ == "__main__":
    from workers.runner import exit_now

    exit_now(main())
