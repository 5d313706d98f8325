"""The forked helper that loads Celery and connects while `farm submit` records its job (farm/doorbell_helper.py):
it sends exactly the doorbell it is handed, nothing when discarded, and a caller falls back to ringing itself
when it is gone. Runs in a subprocess: forking the pytest process (threads, open connections) proves nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the helper runs only with two cores")

SCRIPT = """
import json, os, sys
from farm import doorbell_helper
url, action = sys.argv[1], sys.argv[2]
out = {"started": doorbell_helper.start(url), "running": doorbell_helper.running(url)}
pid = doorbell_helper._helper.pid if doorbell_helper._helper else None
if action == "ring":
    out["rang"] = doorbell_helper.ring("job-1", "farm.test", "train t job-1", url)
elif action == "other-broker":
    out["rang"] = doorbell_helper.ring("job-1", "farm.test", "train t job-1", url + "9")
elif action == "killed":
    os.kill(pid, 9)
    out["rang"] = doorbell_helper.ring("job-1", "farm.test", "train t job-1", url)
elif action == "discard":
    doorbell_helper.discard()
elif action == "down":
    try:
        doorbell_helper.ring("job-1", "farm.test", "train t job-1", url)
    except ConnectionError as exc:
        out["error"] = str(exc)
out["reaped"] = pid is None or not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
out["celery_here"] = "celery" in sys.modules
print(json.dumps(out))
"""


def run(url: str, action: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, url, action], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.fixture
def broker(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    client.delete("farm.test")
    yield redis_url, client
    client.delete("farm.test")


def messages(client) -> list[dict]:
    import base64

    raw = [json.loads(m) for m in client.lrange("farm.test", 0, -1)]
    return [{"args": json.loads(base64.b64decode(m["body"]))[0], "shadow": m["headers"].get("shadow")} for m in raw]


def test_the_helper_sends_the_doorbell_it_is_handed(broker):
    url, client = broker
    out = run(url, "ring")
    assert out["started"] and out["running"] and out["rang"] and out["reaped"]
    assert not out["celery_here"]  # Celery was loaded in the helper only
    assert messages(client) == [{"args": ["job-1"], "shadow": "train t job-1"}]


def test_a_discarded_helper_sends_nothing(broker):
    url, client = broker
    out = run(url, "discard")
    assert out["started"] and out["reaped"] and messages(client) == []


def test_a_dead_helper_or_another_broker_leaves_the_ringing_to_the_caller(broker):
    url, client = broker
    assert run(url, "killed")["rang"] is False
    assert run(url, "other-broker")["rang"] is False
    assert messages(client) == []


def test_a_broker_that_cannot_be_reached_is_an_error_for_the_caller():
    out = run("redis://127.0.0.1:9/0", "down")
    assert "error" in out and out["reaped"] and not out["celery_here"]
