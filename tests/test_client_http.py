"""HttpClient against a real API server (uvicorn in its own process) on the real catalog, Redis and store.

Every bad input raises the same error class with the same message as the local client; datasets are uploaded;
pulls are verified before anything appears at the destination.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from pydantic import SecretStr

from farm.catalog import repository as repo
from farm.catalog.session import create_all, session_scope
from farm.client import LocalClient, get_client
from farm.client_http import HttpClient
from farm.errors import AuthError, ChecksumMismatch, DatasetError, FarmError, InvalidState, StoreError
from farm.settings import FarmSettings
from farm.store import open_store
from farm.tiny import write_dataset
from tests.fixtures.api import TOKENS, adapter_files, publish_test_adapter

REPO_ROOT = Path(__file__).resolve().parents[1]
HTTP_REDIS_DB = int(os.environ.get("FARM_TEST_HTTP_REDIS_DB", "12"))


@dataclass
class ApiServer:
    url: str
    settings: FarmSettings  # what the server runs with (the test reads and writes the same catalog and store)
    log: Path
    proc: subprocess.Popen

    def client(self, token: str | None = TOKENS["alice"], **kwargs) -> HttpClient:
        secret = SecretStr(token) if token is not None else None
        return HttpClient(self.settings.model_copy(update={"api_url": self.url, "api_token": secret}), **kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_api_server(root: Path, extra_env: dict[str, str] | None = None) -> ApiServer:
    """`api.app.serve` in a child process with FARM_* settings under `root`; returns once /healthz answers."""
    root.mkdir(parents=True, exist_ok=True)
    database_url = f"sqlite:///{root}/catalog.db"
    create_all(database_url)
    env_settings = {
        "FARM_HOME": str(root / "home"),
        "FARM_DATABASE_URL": database_url,
        "FARM_BROKER_URL": f"redis://127.0.0.1:6379/{HTTP_REDIS_DB}",
        "FARM_STORE_URL": f"file://{root}/store",
        "FARM_WORK_DIR": str(root / "work"),
        "FARM_MAX_GROUP_SIZE": "2",
        "FARM_API_TOKENS": json.dumps(TOKENS),
        **(extra_env or {}),
    }
    port = _free_port()
    log = root / "api.log"
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        [sys.executable, "-c", f"from api.app import serve; serve('127.0.0.1', {port})"],
        env={**os.environ, **env_settings, "PYTHONPATH": pythonpath}, cwd=REPO_ROOT,
        stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_api_server(proc)
            raise RuntimeError(f"the API server did not start:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)
    settings = FarmSettings(**{**{k[5:].lower(): v for k, v in env_settings.items()}, "api_tokens": TOKENS})
    return ApiServer(url=url, settings=settings, log=log, proc=proc)


def stop_api_server(proc: subprocess.Popen) -> None:
    from tests.fixtures.farm import stop_process_group

    stop_process_group(proc, timeout=20)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import redis

    broker = redis.Redis.from_url(f"redis://127.0.0.1:6379/{HTTP_REDIS_DB}")
    broker.flushdb()  # the doorbells these tests ring are never answered: leave none behind
    srv = start_api_server(tmp_path_factory.mktemp("api-file"))
    yield srv
    stop_api_server(srv.proc)
    broker.flushdb()


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c


def write_spec(path: Path, **overrides) -> Path:
    spec = {"kind": "train", "name": "remote-bot", "base_model": "org/tiny-llama",
            "dataset": {"path": "./data/train.jsonl", "format": "chat"}, "training": {"max_steps": 2}}
    spec.update(overrides)
    path.write_text(yaml.safe_dump(spec))
    return path


# ------------------------------------------------------------------ submit


def test_bad_submissions_raise_what_the_local_client_raises_and_record_nothing(server, client, tmp_path):
    good = write_dataset(tmp_path / "data" / "train.jsonl", "chat", n=6)
    bad_lines = tmp_path / "data" / "bad.jsonl"
    bad_lines.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}\n'
                         '{"messages": "hello"}\n')
    (tmp_path / "broken.yaml").write_text("kind: train\nname: [unclosed\n")
    specs = {
        "unknown key": write_spec(tmp_path / "unknown.yaml", lorra={"r": 4}),
        "bad value": write_spec(tmp_path / "value.yaml", training={"lr": -1}),
        "not yaml": tmp_path / "broken.yaml",
        "no spec file": tmp_path / "missing.yaml",
        "bad dataset line": write_spec(tmp_path / "lines.yaml", dataset={"path": str(bad_lines)}),
        "no dataset file": write_spec(tmp_path / "nodata.yaml", dataset={"path": "./data/none.jsonl"}),
        "bad eval line": write_spec(tmp_path / "eval.yaml", dataset={"path": "./data/train.jsonl",
                                                                      "eval_path": "./data/bad.jsonl"}),
        "no base model": write_spec(tmp_path / "model.yaml", base_model="./models/none"),
        "too many GPUs": write_spec(tmp_path / "gpus.yaml", resources={"gpus": 4}, deepspeed={"stage": 2}),
        "unknown parent": write_spec(tmp_path / "parent.yaml", continue_from="ghost:3"),
    }
    local = LocalClient(server.settings)
    for label, path in specs.items():
        with pytest.raises(FarmError) as expected:
            local.submit(path)
        with pytest.raises(FarmError) as got:
            client.submit(path)
        assert type(got.value) is type(expected.value), (label, got.value, expected.value)
        assert (got.value.message, got.value.field) == (expected.value.message, expected.value.field), label

    assert client.list_jobs() == []
    # No bad file was stored; the good one may be (content-addressed, as a local submit leaves it).
    stored = open_store(server.settings.store_url, server.settings).list_keys("datasets/")
    assert set(stored) <= {f"datasets/{hashlib.sha256(good.read_bytes()).hexdigest()}.jsonl"}


def test_submit_uploads_local_datasets_then_get_list_events_cancel(server, client, tmp_path):
    train = write_dataset(tmp_path / "data" / "train.jsonl", "chat", n=6, seed=1)
    held_out = write_dataset(tmp_path / "data" / "eval.jsonl", "chat", n=3, seed=2)
    spec = write_spec(tmp_path / "job.yaml", name="uploaded",
                      dataset={"path": "./data/train.jsonl", "eval_path": "./data/eval.jsonl", "format": "chat"})

    job = client.submit(spec)
    sha = hashlib.sha256(train.read_bytes()).hexdigest()
    assert job.state == "queued" and job.submitted_by == "alice"
    assert job.spec["dataset"]["path"] == f"store:datasets/{sha}.jsonl"
    eval_sha = hashlib.sha256(held_out.read_bytes()).hexdigest()
    assert job.spec["dataset"]["eval_path"] == f"store:datasets/{eval_sha}.jsonl"
    store = open_store(server.settings.store_url, server.settings)
    assert store.get_bytes(f"datasets/{sha}.jsonl") == train.read_bytes()

    # `notes` (what the door could not check) belong to the submit's answer only
    assert client.get_job(job.id[:10]) == job.model_copy(update={"notes": []})
    assert [j.id for j in client.list_jobs(name="uploaded")] == [job.id]
    assert client.list_jobs(name="uploaded", state="running") == []
    assert [e.state for e in client.job_events(job.id)] == ["queued"]

    cancelled = client.cancel(job.id)
    assert cancelled.state == "cancelled"
    assert client.wait(job.id).state == "cancelled"
    with pytest.raises(InvalidState, match="already cancelled; nothing to cancel"):
        client.cancel(job.id)
    events = client.job_events(job.id)
    assert [e.state for e in events] == ["queued", "cancelled"]
    assert [e.state for e in client.job_events(job.id, after=events[0].id)] == ["cancelled"]


def test_follow_events_streams_until_the_job_ends(server, client, tmp_path):
    write_dataset(tmp_path / "data" / "train.jsonl", "chat", n=4)
    job = client.submit(write_spec(tmp_path / "job.yaml", name="followed"))
    stream = client.follow_events(job.id)
    assert next(stream).state == "queued"

    # The job moves on while the client listens (what a worker does through the catalog).
    url = server.settings.database_url
    with session_scope(url) as session:
        claim = repo.claim_job(session, job.id, "w-test", 60)
    with session_scope(url) as session:
        repo.record_progress(session, claim, {"step": 1, "total_steps": 1, "loss": 1.0})
    with session_scope(url) as session:
        repo.fail_job(session, claim, "runner_crashed", "exit status 1")

    rest = list(stream)  # ends by itself when the job is terminal
    assert [(e.type, e.state) for e in rest] == [("state", "running"), ("progress", None), ("state", "failed")]
    assert client.wait(job.id).error.code == "runner_crashed"


def test_upload_dataset_checks_lines_before_sending(server, client, tmp_path):
    good = write_dataset(tmp_path / "t.jsonl", "text", n=3)
    stored = client.upload_dataset(good, "text")
    assert stored.examples == 3 and stored.uri == f"store:datasets/{stored.sha256}.jsonl"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(DatasetError) as info:
        client.upload_dataset(bad, "text", field="dataset.eval_path")
    assert f"{bad}:2: field 'text' must be a string, got int (format text)" in info.value.message
    assert info.value.field == "dataset.eval_path"


# ------------------------------------------------------------------ pull


def test_pull_downloads_verifies_and_places_the_adapter(server, client, tmp_path):
    files = adapter_files("pull")
    version = publish_test_adapter(server.settings, "pulled", files)

    result = client.pull(f"pulled:{version}", tmp_path / "out")
    assert result.name == "pulled" and result.version == version and Path(result.dest) == (tmp_path / "out").resolve()
    for rel, data in files.items():
        assert (tmp_path / "out" / rel).read_bytes() == data
    assert {f.path for f in result.files} == set(files) | {"checksums.json"}
    assert json.loads((tmp_path / "out" / "checksums.json").read_text())["files"]["README.md"]["sha256"] == \
        hashlib.sha256(files["README.md"]).hexdigest()
    assert [a.version for a in client.list_adapters("pulled")] == [version]
    assert client.get_adapter("pulled").version == version

    with pytest.raises(StoreError, match="not empty"):
        client.pull("pulled", tmp_path / "out")

    # A stored file altered after publishing: refused, and nothing appears at the destination.
    store = open_store(server.settings.store_url, server.settings)
    store.put_bytes(b"not the published weights", f"adapters/pulled/v{version}/adapter_model.safetensors")
    with pytest.raises(ChecksumMismatch, match="adapter_model.safetensors"):
        client.pull("pulled", tmp_path / "again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_pull_over_presigned_urls_from_an_s3_store(tmp_path, s3_store_url):
    srv = start_api_server(tmp_path / "api-s3", s3_store_url.env)
    try:
        files = adapter_files("s3-pull")
        publish_test_adapter(srv.settings, "cloud", files)
        with srv.client() as client:
            assert all(f.url for f in client.get_adapter("cloud:1").files)
            client.pull("cloud:1", tmp_path / "cloud")
        for rel, data in files.items():
            assert (tmp_path / "cloud" / rel).read_bytes() == data
        # The bytes came from the store's URLs, not through the API.
        assert "/files/" not in srv.log.read_text(errors="replace")
    finally:
        stop_api_server(srv.proc)


# ------------------------------------------------------------------ plumbing


def test_get_client_picks_http_when_an_api_url_is_set(server):
    remote = {"api_url": server.url, "api_token": SecretStr(TOKENS["bob"])}
    chosen = get_client(server.settings.model_copy(update=remote))
    assert isinstance(chosen, HttpClient)
    assert isinstance(get_client(server.settings.model_copy(update={"api_url": None})), LocalClient)


def test_auth_errors_and_an_unreachable_api_are_clear(server):
    with server.client(token="wrong") as wrong, pytest.raises(AuthError, match="unknown API token"):
        wrong.list_jobs()
    with server.client(token=None) as anonymous, pytest.raises(AuthError, match="missing API token"):
        anonymous.list_adapters()
    closed = server.settings.model_copy(update={"api_url": f"http://127.0.0.1:{_free_port()}",
                                              "api_token": SecretStr("x")})
    with HttpClient(closed) as nowhere, pytest.raises(FarmError, match="cannot reach the farm API"):
        nowhere.get_job("abc")


def test_tokens_never_reach_the_server_log(server):
    with server.client() as alice, server.client(token=TOKENS["bob"] + "-wrong") as intruder:
        alice.list_jobs()
        with pytest.raises(AuthError):
            intruder.list_jobs()
    log = server.log.read_text(errors="replace")
    assert "GET /v1/jobs" in log  # the access log is there...
    for token in TOKENS.values():
        assert token not in log  # ...without any token in it
