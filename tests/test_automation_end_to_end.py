"""Issue 14 end to end with a real Celery worker training tiny adapters: through the CLI (local service layer) and
through the API (a running `farm api` process): feedback to a retrained version with its lineage, dedupe and
--force, replay --verify and a refused replay, webhooks from the worker side, schedules over the API."""

from __future__ import annotations

import json
import re
import shutil
import time

import httpx
import pytest

from farm import service
from tests.test_automation import Receiver, feedback_file
from tests.test_cli_end_to_end import TOKENS, api_server, client_env, farm  # noqa: F401 (api_server: fixture)
from tests.test_end_to_end import write_spec


def wait_for_version(settings, name: str, version: int, timeout: float = 600) -> float:
    deadline = time.monotonic() + timeout
    while True:
        versions = [a.version for a in service.list_adapters(name, settings=settings)]
        if version in versions:
            return time.monotonic()
        assert time.monotonic() < deadline, f"{name}:{version} never published"
        time.sleep(0.2)


def test_cli_feedback_retrains_dedupes_and_replays(farm_stack, tiny_model_dir, tmp_path):
    settings = farm_stack.settings
    receiver = Receiver([500])  # the first POST fails: the sender retries
    env = {**client_env(farm_stack, "local"), "FARM_WEBHOOK_SECRET": "hook-key", "FARM_WEBHOOK_BACKOFF_SECONDS": "0.5"}
    farm_stack.env.update(FARM_WEBHOOK_SECRET="hook-key", FARM_WEBHOOK_BACKOFF_SECONDS="0.5")
    try:
        from farm.tiny import write_dataset

        model = tmp_path / "model"
        shutil.copytree(tiny_model_dir, model)
        data = write_dataset(tmp_path / "chat.jsonl", "chat", n=16, seed=5)
        spec = write_spec(tmp_path / "job.yaml", model, data, max_steps=4)
        spec.write_text(spec.read_text() + f"notify:\n  url: {receiver.url}\n  events: [succeeded]\n")
        farm_stack.start_worker()

        v1 = json.loads(farm(["submit", str(spec), "--wait", "--json"], env).stdout)
        assert v1["state"] == "succeeded" and v1["adapter"] == "e2e-bot:1", farm_stack.worker_logs()

        # dedupe: the same content again is that job (exit 0), unless --force
        again = farm(["submit", str(spec), "--json"], env)
        assert json.loads(again.stdout)["id"] == v1["id"] and json.loads(again.stdout)["deduplicated"] is True
        said = farm(["submit", str(spec)], env).stdout
        assert f"identical to job {v1['id']}" in said and "e2e-bot:1" in said

        # learning events: the 16th new row starts one retraining (default every=16), continue_from e2e-bot:1
        policy = json.loads(farm(["retrain", "e2e-bot", "--every", "16", "--replay", "0.5", "--json"], env).stdout)
        assert policy["policy"]["every"] == 16 and policy["retrain_job"] is None
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"messages": [{"role": "user", "content": "x"}]}\n')
        out = farm(["feedback", "e2e-bot", str(bad)], env, check=False)
        assert out.returncode == 2 and "bad.jsonl:1: no assistant message" in out.stderr
        first = json.loads(farm(["feedback", "e2e-bot", str(feedback_file(tmp_path / "a.jsonl", 10, 1)),
                                 "--json"], env).stdout)
        assert first["added"] == 10 and first["retrain_job"] is None
        started = time.monotonic()
        out = json.loads(farm(["feedback", "e2e-bot", str(feedback_file(tmp_path / "b.jsonl", 6, 2)), "--json"],
                              env).stdout)
        job_id = out["retrain_job"]
        assert job_id and out["pool_new"] == 0
        published = wait_for_version(settings, "e2e-bot", 2)
        view = service.get_job(job_id, settings=settings)
        print(f"\nfeedback row -> published adapter (every=16, tiny model, 4 steps): {published - started:.1f} s "
              f"(queued {(view.started_at - view.created_at).total_seconds():.1f} s, ran and published "
              f"{(view.finished_at - view.started_at).total_seconds():.1f} s)")
        lineage = json.loads(farm(["lineage", "e2e-bot:2", "--json"], env).stdout)
        assert lineage["parent"] == "e2e-bot:1" and lineage["origin"] == "retrain"
        assert len(lineage["feedback_events"]) == 16 and lineage["job_id"] == job_id
        provenance = json.loads(farm(["adapter", "e2e-bot:2", "--json"], env).stdout)["provenance"]["lineage"]
        assert provenance["continued_from"] == "e2e-bot:1" and provenance["origin"] == "retrain"
        assert provenance["feedback_events"] == lineage["feedback_events"]  # in metadata.json too
        shown = json.loads(farm(["retrain", "e2e-bot", "--json"], env).stdout)
        assert shown["pool_used"] == 16 and shown["runs"][0]["replay_rows"] == 8

        # replay: a deliberate rerun, never folded into the original; --verify compares the weights
        rep = json.loads(farm(["replay", "e2e-bot:1", "--verify", "--json"], env).stdout)
        assert rep["replay"] == "e2e-bot:3" and rep["job_id"] != v1["id"]
        assert rep["identical"] or rep["max_abs_diff"] < 1e-3, rep
        assert json.loads(farm(["lineage", "e2e-bot:3", "--json"], env).stdout)["replay_of"] == "e2e-bot:1"
        # a base model whose weights changed is refused, with both hashes
        weights = model / "model.safetensors"
        blob = bytearray(weights.read_bytes())
        blob[-1] ^= 1
        weights.write_bytes(bytes(blob))
        refused = farm(["replay", "e2e-bot:1"], env, check=False)
        assert refused.returncode == 2 and "changed since it was trained" in refused.stderr
        assert re.search(r"recorded sha256 [0-9a-f]{64}, now [0-9a-f]{64}", refused.stderr), refused.stderr

        # webhooks: sent from the worker side, retried after the 500, signed, each attempt recorded
        deadline = time.monotonic() + 60
        while True:
            hooks = json.loads(farm(["deliveries", v1["id"], "--json"], env).stdout)
            if hooks and hooks[0]["state"] == "delivered":
                break
            assert time.monotonic() < deadline, (hooks, farm_stack.worker_logs())
            time.sleep(0.5)
        assert [a["status_code"] for a in hooks[0]["attempts"]] == [500, 200]
        from farm.automation.webhooks import verify

        sent = [(h, b) for h, b in receiver.requests if json.loads(b)["id"] == v1["id"]]
        assert len(sent) == 2 and sent[0][0]["Idempotency-Key"] == sent[1][0]["Idempotency-Key"] == hooks[0]["id"]
        headers, body = sent[-1]
        assert verify(body, headers["X-Farm-Signature"], "hook-key") and json.loads(body)["state"] == "succeeded"
        # the retrained and replayed versions inherit notify: (their specs are the parent's)
        assert {json.loads(b)["id"] for _, b in receiver.requests} >= {v1["id"], job_id}
    finally:
        receiver.close()


def test_api_feedback_policy_schedule_and_force(farm_stack, tiny_model_dir, tmp_path, api_server):  # noqa: F811
    from farm.tiny import write_dataset

    settings = farm_stack.settings
    http = httpx.Client(base_url=api_server, headers={"Authorization": f"Bearer {TOKENS['ci']}"}, timeout=60)
    env = client_env(farm_stack, "remote", api_server)
    data = write_dataset(tmp_path / "chat.jsonl", "chat", n=16, seed=5)
    spec = write_spec(tmp_path / "job.yaml", tiny_model_dir, data, max_steps=4)
    farm_stack.start_worker()
    v1 = json.loads(farm(["submit", str(spec), "--wait", "--json"], env).stdout)
    assert v1["adapter"] == "e2e-bot:1", farm_stack.worker_logs()
    body = {**v1["spec"]}
    assert http.post("/v1/jobs", json=body).json()["deduplicated"] is True
    forced = http.post("/v1/jobs", json=body, params={"force": "true"}).json()
    assert forced["deduplicated"] is False and forced["id"] != v1["id"]
    http.post(f"/v1/jobs/{forced['id']}/cancel")
    # a 4-step job on a warm runner may finish before its cancel lands: then it published version 2
    ended = service.wait_for_job(forced["id"], timeout=300, settings=settings)
    assert ended.state in ("cancelled", "succeeded"), ended
    parent = 2 if ended.state == "succeeded" else 1
    child = parent + 1

    r = http.put("/v1/adapters/e2e-bot/retrain", json={"every": 4, "replay": 0, "max_steps": 2})
    assert r.status_code == 200 and r.json()["policy"]["every"] == 4
    bad = http.post("/v1/adapters/e2e-bot/feedback", content=b'{"messages": []}\n')
    assert bad.status_code == 422 and bad.json()["message"].startswith("feedback:1:")
    rows = feedback_file(tmp_path / "f.jsonl", 4, 3).read_bytes()
    out = http.post("/v1/adapters/e2e-bot/feedback", content=rows).json()
    assert out["added"] == 4 and out["retrain_job"]
    again = http.post("/v1/adapters/e2e-bot/feedback", content=rows).json()
    assert again["added"] == 0 and again["retrain_job"] is None  # a row sent twice counts once
    wait_for_version(settings, "e2e-bot", child)
    lineage = http.get("/v1/adapters/e2e-bot/lineage", params={"version": child}).json()
    assert lineage["parent"] == f"e2e-bot:{parent}" and len(lineage["feedback_events"]) == 4
    # the remote CLI: the same commands through the API
    out = json.loads(farm(["feedback", "e2e-bot", str(tmp_path / "f.jsonl"), "--json"], env).stdout)
    assert out["added"] == 0 and out["received"] == 4 and out["every"] == 4
    assert json.loads(farm(["lineage", f"e2e-bot:{child}", "--json"], env).stdout)["feedback_events"] == \
        lineage["feedback_events"]
    assert json.loads(farm(["retrain", "e2e-bot", "--json"], env).stdout)["pool_used"] == 4
    compared = http.get("/v1/adapters/e2e-bot/compare", params={"version": 1, "other": f"e2e-bot:{child}"}).json()
    assert compared["identical"] is False and compared["max_abs_diff"] > 0 and compared["tensor"]
    replayed = http.post("/v1/adapters/e2e-bot/replay", params={"version": 1})
    assert replayed.status_code == 201 and replayed.json()["deduplicated"] is False
    assert http.get("/v1/adapters/e2e-bot/lineage", params={"version": 1}).json()["origin"] == "submit"
    http.post(f"/v1/jobs/{replayed.json()['id']}/cancel")

    # schedules over the API (the remote CLI); their firing is tested with two beats in test_automation.py
    made = json.loads(farm(["schedule", "add", str(spec), "--every", "6h", "--name", "nightly", "--json"],
                           env).stdout)
    assert made["name"] == "nightly" and made["every_seconds"] == 21600
    bad = farm(["schedule", "add", str(spec), "--cron", "61 * * * *"], env, check=False)
    assert bad.returncode == 2 and "not a cron expression" in bad.stderr
    farm(["schedule", "pause", "nightly"], env)
    listed = json.loads(farm(["schedule", "list", "--json"], env).stdout)
    assert [(s["name"], s["paused"]) for s in listed] == [("nightly", True)]
    farm(["schedule", "rm", "nightly"], env)
    assert http.get("/v1/schedules").json() == []
    assert http.delete("/v1/schedules/nightly").status_code == 404
