"""The broker side of a `farm submit`, prepared on the other core while this process records the job.

A local submit does two independent slow things before it can ring: load the catalog's libraries (SQLAlchemy, the
models) to validate and record the job, and load the broker's (Celery, kombu, redis) and connect. Run one after
the other they are most of the command's time; here the second runs in a process forked at the start of the
command, in parallel on a second core. The order of the invariant stays: the helper sends nothing until this
process has committed the job and hands it the job id (`ring`), then it sends the message with Celery as
farm.queue always does and reports back. Without a helper (one core, or any other caller of the service layer),
or when it died, the caller rings itself (`ring` returns False).

Why by hand: no library runs part of one short command's imports in parallel, and threads cannot (the GIL
holds through an import). The helper is forked before any thread, connection or open database exists, ignores
Ctrl-C (this process owns the terminal), writes nothing to the terminal, and ends when this process hands it a
job, discards it, or exits (end of file on its pipe). It never touches the catalog.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass


@dataclass
class _Helper:
    pid: int
    requests: int  # the write end of the helper's request pipe
    replies: int  # the read end of its reply pipe
    broker_url: str


_helper: _Helper | None = None


def start(broker_url: str) -> bool:
    """Fork the helper for `broker_url` when this host gives the process at least two cores; True if it runs."""
    global _helper
    import threading

    if _helper is not None:
        return True
    if not hasattr(os, "fork") or len(os.sched_getaffinity(0)) < 2 or threading.active_count() > 1:
        return False  # one core: nothing to gain; another thread: a fork could inherit a lock it holds
    request_r, request_w = os.pipe()
    reply_r, reply_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the helper
        try:
            os.close(request_w)
            os.close(reply_r)
            _serve(request_r, reply_w, broker_url)
        finally:
            os._exit(0)  # never this process's atexit hooks or buffered output
    os.close(request_r)
    os.close(reply_w)
    _helper = _Helper(pid, request_w, reply_r, broker_url)
    return True


def running(broker_url: str) -> bool:
    """Whether a helper for `broker_url` is connecting or connected (the caller then need not warm up itself)."""
    return _helper is not None and _helper.broker_url == broker_url


def ring(job_id: str, queue: str, label: str, broker_url: str) -> bool:
    """Have the helper send job `job_id`'s doorbell (call it after the job's commit). True when it was sent; False
    when no helper serves this broker or it is gone (the caller rings itself); a broker error raises
    ConnectionError with the helper's message."""
    global _helper
    helper, _helper = _helper, None
    if helper is None:
        return False
    if helper.broker_url != broker_url:
        _close(helper)
        return False
    reply = b""
    try:
        os.write(helper.requests, json.dumps({"job_id": job_id, "queue": queue, "label": label}).encode() + b"\n")
        while not reply.endswith(b"\n"):
            chunk = os.read(helper.replies, 4096)
            if not chunk:
                break
            reply += chunk
    except OSError:
        reply = b""
    finally:
        _close(helper)
    if not reply.endswith(b"\n"):
        return False  # it died before answering: the caller rings; a duplicate message is harmless (the claim)
    answer = json.loads(reply)
    if answer.get("sent"):
        return True
    raise ConnectionError(answer.get("error") or "the broker did not take the message")


def discard() -> None:
    """End the helper without a message (the submit found a duplicate, or failed)."""
    global _helper
    helper, _helper = _helper, None
    if helper is not None:
        _close(helper)


def _close(helper: _Helper) -> None:
    for fd in (helper.requests, helper.replies):
        try:
            os.close(fd)
        except OSError:
            pass
    try:
        os.waitpid(helper.pid, 0)
    except ChildProcessError:
        pass


def _serve(requests: int, replies: int, broker_url: str) -> None:
    """The helper's whole life: load Celery, connect, wait for one job id, send its message, say how it went."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    from farm.queue import ring_doorbell, warm_doorbell
    from farm.settings import get_settings

    settings = get_settings().model_copy(update={"broker_url": broker_url})
    warm_doorbell(settings)
    with os.fdopen(requests, "rb") as reader:
        line = reader.readline()
    if not line:
        return  # discarded, or the submit ended without a job
    request = json.loads(line)
    try:
        ring_doorbell(request["job_id"], request["queue"], settings=settings, label=request["label"])
        answer = {"sent": True}
    except Exception as exc:
        answer = {"sent": False, "error": f"{type(exc).__name__}: {exc}"}
    os.write(replies, json.dumps(answer).encode() + b"\n")
