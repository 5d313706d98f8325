"""The HTTP API in-process (FastAPI's TestClient) over the real catalog (SQLite, PostgreSQL), the real Redis and
a file:// or S3-over-HTTP store."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from api.app import create_app
from farm import service
from farm.catalog import repository as repo
from farm.catalog.models import Adapter, AdapterFile, Job, JobEvent
from farm.catalog.session import session_scope
from farm.errors import FarmError
from farm.queue import queue_depths
from farm.settings import FarmSettings
from farm.store import open_store
from farm.tiny import write_dataset
from tests.fixtures.api import TOKENS, adapter_files, publish_test_adapter

ALICE = {"Authorization": f"Bearer {TOKENS['alice']}"}


def make_settings(tmp_path, database_url: str, broker_url: str, **extra) -> FarmSettings:
    values = dict(home=tmp_path / "home", database_url=database_url, broker_url=broker_url,
                  store_url=f"file://{tmp_path}/store", s3_endpoint_url=None, work_dir=tmp_path / "work",
                  cache_dir=tmp_path / "cache", api_tokens=TOKENS, max_group_size=2)
    return FarmSettings(**{**values, **extra})


@pytest.fixture
def settings(tmp_path, sqlite_url, redis_url):
    return make_settings(tmp_path, sqlite_url, redis_url)


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings, poll_seconds=0.02)) as c:
        c.headers.update(ALICE)
        yield c


def train_spec(dataset: str, **overrides) -> dict:
    # A hub id as base model: the door checks local model folders only; workers fetch hub models.
    spec = {"kind": "train", "name": "bot", "base_model": "org/tiny-llama",
            "dataset": {"path": dataset, "format": "chat"}, "training": {"max_steps": 2}}
    spec.update(overrides)
    return spec


def upload(client, path, fmt="chat"):
    response = client.post("/v1/datasets", params={"format": fmt, "filename": path.name}, content=path.read_bytes())
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture
def dataset_ref(client, tmp_path):
    return upload(client, write_dataset(tmp_path / "train.jsonl", "chat", n=8))["uri"]


def job_rows(settings) -> list[Job]:
    with session_scope(settings.database_url) as session:
        return list(session.scalars(select(Job)))


# ------------------------------------------------------------------ auth


def _concrete(path: str) -> str:
    return (path.replace("{job_id}", "0123456789abcdef").replace("{name}", "bot").replace("{version}", "1")
            .replace("{path:path}", "README.md").replace("{path}", "README.md"))


def test_every_route_but_healthz_refuses_a_missing_or_wrong_token(settings):
    app = create_app(settings)
    plain = TestClient(app)
    checked = 0
    # Every documented operation (FastAPI lists each route it serves in the OpenAPI document).
    for path, operations in app.openapi()["paths"].items():
        if path == "/healthz":
            continue
        for method in operations:
            for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": f"Basic {TOKENS['bob']}"},
                            {"Authorization": "Bearer "}):
                response = plain.request(method.upper(), _concrete(path), headers=headers)
                assert response.status_code == 401, (method, path, headers, response.text)
                assert response.json()["code"] == "unauthorized"
                assert response.headers["www-authenticate"] == "Bearer"
            checked += 1
    assert checked >= 11
    assert plain.get("/healthz").status_code == 200
    assert plain.get("/v1/jobs", headers={"Authorization": f"Bearer {TOKENS['bob']}"}).status_code == 200


def test_openapi_documents_the_spec_body(client):
    doc = client.get("/openapi.json").json()
    body = doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    refs = {item["$ref"] for item in body["oneOf"]}
    assert refs == {"#/components/schemas/TrainSpec", "#/components/schemas/ExtractSpec"}
    train = doc["components"]["schemas"]["TrainSpec"]
    assert "Adapter name" in train["properties"]["name"]["description"]
    assert doc["components"]["schemas"]["LoraSpec"]["properties"]["r"]["description"]
    assert doc["paths"]["/v1/jobs"]["post"]["responses"]["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"}


def test_the_api_and_the_remote_client_never_import_torch():
    import subprocess
    import sys

    code = ("import sys, api.app, farm.client_http, farm.flower; api.app.create_app(); "
            "sys.exit(3 if 'torch' in sys.modules or 'transformers' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1]).returncode == 0


# ------------------------------------------------------------------ jobs


@pytest.fixture
def pg_client(tmp_path, catalog_url, redis_url):
    """The API over SQLite and over PostgreSQL."""
    settings = make_settings(tmp_path, catalog_url, redis_url)
    with TestClient(create_app(settings, poll_seconds=0.02)) as c:
        c.headers.update(ALICE)
        yield c, settings


def test_submit_list_get_cancel_on_both_catalogs(pg_client, tmp_path, redis_url):
    client, settings = pg_client
    ref = upload(client, write_dataset(tmp_path / "train.jsonl", "chat", n=8))["uri"]

    first = client.post("/v1/jobs", json=train_spec(ref))
    assert first.status_code == 201, first.text
    job = first.json()
    assert job["state"] == "queued" and job["submitted_by"] == "alice" and job["queue"] == "farm.cpu"
    assert job["spec"]["dataset"]["path"] == ref and job["spec"]["lora"]["r"] == 8  # defaults filled in
    # another max_steps: not identical in content, so not deduplicated into the first (issue 14)
    second = client.post("/v1/jobs", json=train_spec(ref, name="other", training={"max_steps": 3}),
                         headers={"Authorization": f"Bearer {TOKENS['bob']}"}).json()
    assert second["submitted_by"] == "bob"
    assert queue_depths(["farm.cpu"], redis_url) == {"farm.cpu": 2}  # the doorbell rang on the real broker

    assert [j["id"] for j in client.get("/v1/jobs").json()] == [second["id"], job["id"]]
    assert [j["name"] for j in client.get("/v1/jobs", params={"name": "other"}).json()] == ["other"]
    assert [j["id"] for j in client.get("/v1/jobs", params={"limit": 1, "offset": 1}).json()] == [job["id"]]
    assert client.get("/v1/jobs", params={"state": "running"}).json() == []
    assert client.get(f"/v1/jobs/{job['id'][:8]}").json()["id"] == job["id"]  # a unique prefix works

    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    again = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert again.status_code == 409
    assert again.json() == {"code": "invalid_state",
                            "message": f"job {job['id']} is already cancelled; nothing to cancel"}
    assert [j["state"] for j in client.get("/v1/jobs", params={"state": "cancelled"}).json()] == ["cancelled"]

    missing = client.get("/v1/jobs/ffffffffffff")
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    assert "farm jobs" in missing.json()["message"]


def test_bad_query_parameters_are_422_with_the_same_body_shape(client):
    for params, field in (({"limit": 0}, "limit"), ({"state": "sleeping"}, "state"), ({"offset": -1}, "offset")):
        response = client.get("/v1/jobs", params=params)
        assert response.status_code == 422
        body = response.json()
        assert body["code"] == "invalid_request" and body["field"] == field and body["message"].startswith(field)


def _service_error(spec, settings) -> FarmError:
    with pytest.raises(FarmError) as info:
        service.submit_job(spec, settings=settings, remote=True)  # the API's caller is remote (issue 11)
    return info.value


def test_bad_specs_are_422_with_the_services_message_and_nothing_is_recorded(client, settings, tmp_path,
                                                                             dataset_ref, redis_url):
    bad_lines = tmp_path / "bad.jsonl"
    bad_lines.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                         '{"messages": [{"role": "user", "content": "no answer"}]}\n'
                         "not json at all\n")
    bad_specs = {
        "unknown key": train_spec(dataset_ref, lorra={"r": 4}),
        "bad value": train_spec(dataset_ref, lora={"r": 0}),
        "bad dataset lines": train_spec(str(bad_lines)),
        "unknown store dataset": train_spec("store:datasets/" + "0" * 64 + ".jsonl"),
        "missing base model": train_spec(dataset_ref, base_model=str(tmp_path / "no-such-model")),
        "too many devices": train_spec(dataset_ref, resources={"gpus": 4}, deepspeed={"stage": 2}),
        "no kind": {"name": "bot"},
    }
    expected_codes = {"unknown key": "invalid_spec", "bad value": "invalid_spec",
                      "bad dataset lines": "invalid_dataset", "unknown store dataset": "invalid_dataset",
                      "missing base model": "invalid_model",
                      "too many devices": "unschedulable", "no kind": "invalid_spec"}
    for label, spec in bad_specs.items():
        response = client.post("/v1/jobs", json=spec)
        assert response.status_code == 422, (label, response.text)
        body = response.json()
        local = _service_error(spec, settings)
        assert body == local.to_dict(), label  # same code, message and field as the service (and the CLI)
        assert body["code"] == expected_codes[label], (label, body)

    assert "lorra: unknown key" in client.post("/v1/jobs", json=bad_specs["unknown key"]).json()["message"]
    lines = client.post("/v1/jobs", json=bad_specs["bad dataset lines"]).json()
    # issue 11: a server path is refused without reading it (its lines are checked at upload)
    assert "must be uploaded first" in lines["message"] and "no assistant message" not in lines["message"]
    assert lines["field"] == "dataset.path"
    assert "FARM_MAX_GROUP_SIZE" in client.post("/v1/jobs", json=bad_specs["too many devices"]).json()["message"]

    # Bodies that are not a spec mapping at all
    as_text = client.post("/v1/jobs", content=b'"/etc/passwd"', headers={"Content-Type": "application/json"})
    assert as_text.status_code == 422 and as_text.json()["message"] == "spec: expected a mapping of fields, got str"
    not_json = client.post("/v1/jobs", content=b"{kind: train", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 422 and "not valid JSON" in not_json.json()["message"]

    assert job_rows(settings) == []
    assert queue_depths(["farm.cpu"], redis_url) == {"farm.cpu": 0}


def test_a_yaml_body_is_accepted(client, dataset_ref):
    import yaml

    response = client.post("/v1/jobs", content=yaml.safe_dump(train_spec(dataset_ref)),
                           headers={"Content-Type": "application/yaml"})
    assert response.status_code == 201, response.text


def test_events_after_and_the_stream_ending_with_the_job(client, settings, dataset_ref):
    job = client.post("/v1/jobs", json=train_spec(dataset_ref)).json()
    with session_scope(settings.database_url) as session:
        claim = repo.claim_job(session, job["id"], "w1", 60)
    with session_scope(settings.database_url) as session:
        repo.record_progress(session, claim, {"step": 1, "total_steps": 2, "loss": 2.5})
    with session_scope(settings.database_url) as session:
        repo.fail_job(session, claim, "runner_crashed", "the runner exited with status 1")

    events = client.get(f"/v1/jobs/{job['id']}/events").json()
    assert [(e["type"], e["state"]) for e in events] == [("state", "queued"), ("state", "running"),
                                                         ("progress", None), ("state", "failed")]
    later = client.get(f"/v1/jobs/{job['id']}/events", params={"after": events[1]["id"]}).json()
    assert [e["id"] for e in later] == [e["id"] for e in events[2:]]

    with client.stream("GET", f"/v1/jobs/{job['id']}/events/stream", params={"after": events[0]["id"]}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        body = response.read().decode()
    from farm.client_http import parse_sse

    messages = list(parse_sse(iter(body.split("\n"))))
    assert [name for name, _ in messages] == ["state", "progress", "state", "end"]
    assert [json.loads(data)["id"] for _, data in messages[:-1]] == [e["id"] for e in events[1:]]
    final = json.loads(messages[-1][1])
    assert final["state"] == "failed" and final["error"]["code"] == "runner_crashed"
    # A reconnecting browser's Last-Event-ID resumes after that event.
    resumed = client.get(f"/v1/jobs/{job['id']}/events/stream", headers={"Last-Event-ID": str(events[2]["id"])})
    assert [name for name, _ in parse_sse(iter(resumed.text.split("\n")))] == ["state", "end"]
    assert client.get("/v1/jobs/ffffffff/events/stream").status_code == 404


# ------------------------------------------------------------------ datasets


def test_dataset_upload_is_validated_and_stored_content_addressed(client, settings, tmp_path):
    good = write_dataset(tmp_path / "good.jsonl", "alpaca", n=5)
    stored = upload(client, good, fmt="alpaca")
    sha = hashlib.sha256(good.read_bytes()).hexdigest()
    assert stored == {"uri": f"store:datasets/{sha}.jsonl", "sha256": sha, "size": good.stat().st_size,
                      "examples": 5, "format": "alpaca"}
    store = open_store(settings.store_url, settings)
    assert store.get_bytes(f"datasets/{sha}.jsonl") == good.read_bytes()
    assert upload(client, good, fmt="alpaca") == stored  # same bytes, same object

    before = store.list_keys("datasets/")
    bad = b'{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n{"oops"\n'
    response = client.post("/v1/datasets", params={"format": "alpaca", "filename": "mine.jsonl"}, content=bad)
    assert response.status_code == 422
    body = response.json()
    assert body["code"] == "invalid_dataset" and body["field"] == "dataset.path"
    assert "mine.jsonl:2: missing field 'output' (format alpaca)" in body["message"]
    assert "mine.jsonl:3: not valid JSON" in body["message"]
    assert "farm-upload-" not in body["message"]  # the server's temp path is not shown
    assert client.post("/v1/datasets", params={"format": "chat"}, content=b"").json()["code"] == "invalid_dataset"
    wrong_format = client.post("/v1/datasets", params={"format": "csv"}, content=good.read_bytes())
    assert wrong_format.status_code == 422 and wrong_format.json()["field"] == "format"
    # The good file declared as chat fails on its first line: nothing half-stored
    as_chat = client.post("/v1/datasets", params={"format": "chat"}, content=good.read_bytes())
    assert as_chat.status_code == 422 and "uploaded dataset:1: missing field 'messages'" in as_chat.json()["message"]
    assert store.list_keys("datasets/") == before


# ------------------------------------------------------------------ adapters


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_adapters_list_provenance_and_file_downloads_on_a_file_store(client, settings):
    v1_files, v2_files = adapter_files("one"), adapter_files("two")
    assert publish_test_adapter(settings, "bot", v1_files) == 1
    assert publish_test_adapter(settings, "bot", v2_files) == 2
    publish_test_adapter(settings, "other", adapter_files("three"))

    listed = client.get("/v1/adapters").json()
    assert isinstance(listed, list), listed
    assert [(a["name"], a["version"]) for a in listed] == [("bot", 2), ("bot", 1), ("other", 1)]
    assert [a["version"] for a in client.get("/v1/adapters", params={"name": "bot"}).json()] == [2, 1]

    latest = client.get("/v1/adapters/bot").json()
    assert latest["version"] == 2 and latest["metrics"] == {"train_loss": 1.5}
    v1 = client.get("/v1/adapters/bot/v1").json()
    assert v1 == client.get("/v1/adapters/bot/1").json()
    files = {f["path"]: f for f in v1["files"]}
    assert set(files) == set(v1_files) | {"checksums.json"}
    for rel, data in v1_files.items():
        assert files[rel]["sha256"] == _sha(data) and files[rel]["size"] == len(data)
        assert files[rel]["url"] is None  # file:// store: no presigned URLs, the files route serves them
        response = client.get(f"/v1/adapters/bot/1/files/{rel}")
        assert response.status_code == 200 and response.content == data
        assert response.headers["x-farm-sha256"] == _sha(data)
    manifest = json.loads(client.get("/v1/adapters/bot/1/files/checksums.json").content)
    assert manifest["files"]["adapter_model.safetensors"]["sha256"] == _sha(v1_files["adapter_model.safetensors"])

    for path, code in (("/v1/adapters/bot/1/files/nope.bin", 404), ("/v1/adapters/bot/1/files/../v2/README.md", 404),
                       ("/v1/adapters/bot/1/files/%2e%2e/v2/README.md", 404), ("/v1/adapters/bot/9", 404),
                       ("/v1/adapters/ghost", 404), ("/v1/adapters/bot/latest", 422)):
        response = client.get(path)
        assert response.status_code == code, (path, response.text)
        assert response.json()["code"] in ("not_found", "invalid_spec")


def test_download_urls_on_s3_return_the_published_bytes(tmp_path, sqlite_url, redis_url, s3_store_url):
    settings = make_settings(tmp_path, sqlite_url, redis_url, store_url=s3_store_url.url,
                             s3_endpoint_url=s3_store_url.endpoint_url, s3_region="us-east-1")
    files = adapter_files("s3")
    publish_test_adapter(settings, "bot", files)
    with TestClient(create_app(settings)) as client:
        client.headers.update(ALICE)
        view = client.get("/v1/adapters/bot/1", params={"url_expires_s": 600}).json()
        assert view["uri"].startswith(s3_store_url.url)
        for entry in view["files"]:
            assert entry["url"].startswith(s3_store_url.endpoint_url) and "Expires=" in entry["url"]
            downloaded = httpx.get(entry["url"]).content  # no API token: the URL carries its own signature
            assert _sha(downloaded) == entry["sha256"]
            if entry["path"] in files:
                assert downloaded == files[entry["path"]]
        # The files route works on S3 too, and refuses bytes that differ from the catalog's record.
        assert client.get("/v1/adapters/bot/1/files/README.md").content == files["README.md"]
        open_store(settings.store_url, settings).put_bytes(b"tampered", "adapters/bot/v1/README.md")
        tampered = client.get("/v1/adapters/bot/1/files/README.md")
        assert tampered.status_code == 502 and tampered.json()["code"] == "checksum_mismatch"


# ------------------------------------------------------------------ health and metrics


def test_healthz_needs_no_token_and_reports_each_dependency(settings, tmp_path):
    ok = TestClient(create_app(settings)).get("/healthz")
    assert ok.status_code == 200 and ok.json() == {"status": "ok", "checks": {"catalog": "ok", "broker": "ok"}}

    down = settings.model_copy(update={"broker_url": "redis://:hunter2@127.0.0.1:1/0",
                                       "database_url": f"sqlite:///{tmp_path}/empty/never-migrated.db"})
    response = TestClient(create_app(down)).get("/healthz")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["broker"].startswith("unreachable") and checks["catalog"].startswith("unreachable")
    assert "hunter2" not in response.text and "127.0.0.1" not in response.text


def _samples(text: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_parse_and_count_jobs_queues_durations_adapters(client, settings, dataset_ref):
    for _ in range(2):  # force: the second is identical in content and would be deduplicated (issue 14)
        client.post("/v1/jobs", json=train_spec(dataset_ref), params={"force": "true"})
    publish_test_adapter(settings, "bot", adapter_files("m"))  # one job succeeded, with a duration

    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = _samples(response.text)
    assert samples[("farm_jobs", (("state", "queued"),))] == 2
    assert samples[("farm_jobs", (("state", "succeeded"),))] == 1
    assert samples[("farm_jobs", (("state", "failed"),))] == 0
    assert samples[("farm_queue_depth", (("queue", "farm.cpu"),))] == 2
    assert samples[("farm_broker_up", ())] == 1
    assert samples[("farm_adapter_versions", (("kind", "train"),))] == 1
    labels = (("kind", "train"), ("state", "succeeded"))
    assert samples[("farm_job_duration_seconds_count", labels)] == 1
    for le in ("86400.0", "+Inf"):
        bucket = ("farm_job_duration_seconds_bucket", (("kind", "train"), ("le", le), ("state", "succeeded")))
        assert samples[bucket] == 1

    broker_down = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    down = TestClient(create_app(broker_down), headers=ALICE).get("/metrics")
    assert down.status_code == 200 and _samples(down.text)[("farm_broker_up", ())] == 0


# ------------------------------------------------------------------ secrets


def test_tokens_never_reach_logs_events_or_the_catalog(client, settings, dataset_ref, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    job = client.post("/v1/jobs", json=train_spec(dataset_ref)).json()
    client.get(f"/v1/jobs/{job['id']}/events")
    client.post(f"/v1/jobs/{job['id']}/cancel")
    client.get("/v1/jobs", headers={"Authorization": f"Bearer {TOKENS['bob']}x"})  # a near miss
    publish_test_adapter(settings, "bot", adapter_files("s"))
    client.get("/v1/adapters/bot/1")
    client.get("/metrics")

    with session_scope(settings.database_url) as session:
        rows = [session.scalars(select(model)).all() for model in (Job, JobEvent, Adapter, AdapterFile)]
        dumped = json.dumps([[{c.name: getattr(r, c.name) for c in r.__table__.columns} for r in group]
                             for group in rows], default=str)
    assert job["submitted_by"] == "alice" and '"submitted_by": "alice"' in dumped
    for token in TOKENS.values():
        assert token not in dumped
        assert token not in caplog.text
        assert token not in "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file()
                                    and p.suffix in (".json", ".jsonl", ".md", ".log"))
