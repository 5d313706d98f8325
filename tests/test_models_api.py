"""POST /v1/merges and GET /v1/jobs/{id}/checkpoints (issue 13), in-process over the real catalog and Redis."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from tests.fixtures.api import TOKENS, publish_test_adapter
from tests.test_api import make_settings


@pytest.fixture
def client(tmp_path, sqlite_url, redis_url, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = make_settings(tmp_path, sqlite_url, redis_url)
    with TestClient(create_app(settings, poll_seconds=0.02)) as c:
        c.headers.update({"Authorization": f"Bearer {TOKENS['alice']}"})
        c.settings = settings
        yield c


def test_merge_route_queues_a_merge_job_pinned_to_the_adapter(client):
    import redis

    publish_test_adapter(client.settings, "bot", {"adapter_config.json": b"{}"})
    job = client.post("/v1/merges", json={"adapter": "bot", "dtype": "float16"})
    assert job.status_code == 201, job.text
    body = job.json()
    assert body["kind"] == "merge" and body["name"] == "bot-merged" and body["submitted_by"] == "alice"
    assert body["spec"]["adapter"] == "bot:1" and body["spec"]["base_model"] == "org/tiny"
    assert body["spec"]["dtype"] == "float16"
    assert "org/tiny@main is not in this machine's Hub cache" in body["notes"][0]  # said, not hidden
    assert redis.Redis.from_url(client.settings.broker_url).llen("farm.cpu") == 1
    assert client.get(f"/v1/jobs/{body['id']}/checkpoints").json() == []


def test_merge_route_refuses_bad_input_and_queues_nothing(client):
    import redis

    assert client.post("/v1/merges", json={"adapter": "nothing"}).json()["code"] == "not_found"
    assert client.post("/v1/merges", json={"adapter": "bot", "dtype": "int4"}).status_code == 422
    publish_test_adapter(client.settings, "merged", {"config.json": b"{}"}, kind="merge")
    refused = client.post("/v1/merges", json={"adapter": "merged:1"})
    assert refused.status_code in (400, 422) and "already a merged model" in refused.json()["message"]
    publish_test_adapter(client.settings, "bot", {"adapter_config.json": b"{}"})
    bad_name = client.post("/v1/merges", json={"adapter": "bot", "name": "Bad Name"})
    assert bad_name.json()["code"] == "invalid_spec" and "name" in bad_name.json()["message"]
    assert client.get("/v1/jobs/ffffffff/checkpoints").status_code == 404
    assert redis.Redis.from_url(client.settings.broker_url).llen("farm.cpu") == 0
