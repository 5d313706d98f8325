"""The HTTP API as a hostile client finds it (issue 11): a table of bad requests, each answered with the right
status and a short message, leaving no job row, no stored object and no file behind, and the server healthy.

In-process (FastAPI's TestClient) on the real SQLite catalog, the real Redis and a file:// store; the download
checks also run on S3 over HTTP (moto), and the log redaction on a real uvicorn in its own process.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.app import create_app
from farm import datasets as datasets_module
from farm.catalog.models import Job
from farm.catalog.session import session_scope
from farm.queue import queue_depths
from farm.settings import FarmSettings
from farm.store import open_store
from farm.tiny import write_dataset
from tests.fixtures.api import TOKENS, adapter_files, publish_test_adapter

ALICE = {"Authorization": f"Bearer {TOKENS['alice']}"}
MAX_BODY = 64 * 1024
MAX_UPLOAD = 256 * 1024
MAX_RESPONSE = 8 * 1024  # no error body may be larger than this, whatever the input


@dataclass
class Case:
    label: str
    method: str
    path: str
    status: int
    code: str | None = None
    kwargs: dict = field(default_factory=dict)
    spec: dict | None = None  # a JSON spec body (built from the good spec by `spec` overrides)
    not_in_message: tuple[str, ...] = ()


def _deep(n: int) -> str:
    return "[" * n + "]" * n


def _laughs(levels: int) -> str:
    doc = 'a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for i in range(1, levels + 1):
        doc += f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]\n"
    return doc


def _chunks(data: bytes, size: int = 16 * 1024):
    for i in range(0, len(data), size):
        yield data[i:i + size]


@pytest.fixture
def farm(tmp_path, sqlite_url, redis_url, tiny_model_dir):
    roots = tmp_path / "models"
    roots.mkdir()
    settings = FarmSettings(home=tmp_path / "home", database_url=sqlite_url, broker_url=redis_url,
                            store_url=f"file://{tmp_path}/store", s3_endpoint_url=None, work_dir=tmp_path / "work",
                            cache_dir=tmp_path / "cache", api_tokens=TOKENS, max_group_size=2,
                            model_roots=[roots], api_max_body_bytes=MAX_BODY, api_max_upload_bytes=MAX_UPLOAD)
    with TestClient(create_app(settings, poll_seconds=0.02)) as client:
        client.headers.update(ALICE)
        good = write_dataset(tmp_path / "train.jsonl", "chat", n=4)
        ref = client.post("/v1/datasets", content=good.read_bytes()).json()["uri"]
        version = publish_test_adapter(settings, "bot", adapter_files("h"))
        yield client, settings, ref, version, tmp_path


def _good_spec(ref: str) -> dict:
    return {"kind": "train", "name": "bot", "base_model": "org/tiny-llama",
            "dataset": {"path": ref, "format": "chat"}, "training": {"max_steps": 2}}


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "catalog" not in p.name}


def _job_count(settings) -> int:
    with session_scope(settings.database_url) as session:
        return session.scalar(select(func.count()).select_from(Job))


def _cases(ref: str, version: int, tiny_model_dir: Path) -> list[Case]:
    def spec(**over) -> dict:
        out = _good_spec(ref)
        for key, value in over.items():
            if "." in key:
                outer, inner = key.split(".")
                out[outer] = {**out[outer], inner: value}
            else:
                out[key] = value
        return out

    yaml_h = {"Content-Type": "application/yaml"}
    json_h = {"Content-Type": "application/json"}
    good_yaml = json.dumps(_good_spec(ref))
    adapter = f"/v1/adapters/bot/{version}/files"
    cases = [
        # remote callers may not name the server's files (finding 5)
        Case("server file as dataset", "POST", "/v1/jobs", 422, "invalid_dataset",
             spec=spec(**{"dataset.path": "/etc/passwd"})),
        Case("proc file as dataset", "POST", "/v1/jobs", 422, "invalid_dataset",
             spec=spec(**{"dataset.path": "/proc/self/environ"})),
        Case("relative server path", "POST", "/v1/jobs", 422, "invalid_dataset",
             spec=spec(**{"dataset.path": "train.jsonl"})),
        Case("dotdot server path", "POST", "/v1/jobs", 422, "invalid_dataset",
             spec=spec(**{"dataset.path": "../../../etc/passwd"})),
        Case("server file as eval set", "POST", "/v1/jobs", 422, "invalid_dataset",
             spec=spec(**{"dataset.eval_path": "/etc/hosts"})),
        Case("file url dataset", "POST", "/v1/jobs", 422, "invalid_dataset",
             spec=spec(**{"dataset.path": "file:///etc/passwd"})),
        Case("store ref with dotdot", "POST", "/v1/jobs", 422, "invalid_dataset",
             spec=spec(**{"dataset.path": "store:../../etc/passwd"})),
        Case("store ref absolute", "POST", "/v1/jobs", 422, "invalid_dataset",
             spec=spec(**{"dataset.path": "store:/etc/passwd"})),
        Case("store ref empty part", "POST", "/v1/jobs", 422, "invalid_dataset",
             spec=spec(**{"dataset.path": "store:datasets//x.jsonl"})),
        Case("store ref dotdot inside", "POST", "/v1/jobs", 422, "invalid_dataset",
             spec=spec(**{"dataset.path": "store:datasets/../jobs/x"})),
        Case("server folder as model", "POST", "/v1/jobs", 422, "invalid_model", spec=spec(base_model="/etc"),
             not_in_message=("config.json", "no such")),
        Case("real model outside roots", "POST", "/v1/jobs", 422, "invalid_model",
             spec=spec(base_model=str(tiny_model_dir))),
        Case("file url model", "POST", "/v1/jobs", 422, "invalid_model", spec=spec(base_model="file:///etc")),
        Case("dotdot model", "POST", "/v1/jobs", 422, "invalid_model", spec=spec(base_model="../../../etc")),
        Case("home model", "POST", "/v1/jobs", 422, "invalid_model", spec=spec(base_model="~root/.cache")),
        Case("dotdot out of roots", "POST", "/v1/jobs", 422, "invalid_model",
             spec=spec(base_model=str(tiny_model_dir.parent) + "/../../etc")),
        Case("extract from a server folder", "POST", "/v1/jobs", 422, "invalid_model",
             spec={"kind": "extract", "name": "x", "base_model": "org/a", "finetuned_model": "/etc", "rank": 4}),
        # NUL bytes (finding 8)
        Case("NUL in base_model", "POST", "/v1/jobs", 422, "invalid_spec", spec=spec(base_model="org/tiny\x00x")),
        Case("NUL in base_revision", "POST", "/v1/jobs", 422, "invalid_spec", spec=spec(base_revision="main\x00")),
        Case("NUL in description", "POST", "/v1/jobs", 422, "invalid_spec", spec=spec(description="a\x00b")),
        Case("NUL in a key", "POST", "/v1/jobs", 422, "invalid_spec", spec={**_good_spec(ref), "x\x00": 1}),
        Case("NUL in store ref", "POST", "/v1/jobs", 422, "invalid_spec",
             spec=spec(**{"dataset.path": "store:datasets/\x00.jsonl"})),
        # amplification (finding 6)
        Case("billion laughs 7", "POST", "/v1/jobs", 422, "invalid_spec",
             kwargs={"content": _laughs(7), "headers": yaml_h}),
        Case("billion laughs 9", "POST", "/v1/jobs", 422, "invalid_spec",
             kwargs={"content": _laughs(9), "headers": yaml_h}),
        Case("alias budget", "POST", "/v1/jobs", 422, "invalid_spec",
             kwargs={"content": "a: &x 1\nb: [" + ",".join(["*x"] * 200) + "]\n", "headers": yaml_h}),
        Case("huge unknown key", "POST", "/v1/jobs", 422, "invalid_spec", spec={**_good_spec(ref), "k" * 50_000: 1}),
        Case("many unknown keys", "POST", "/v1/jobs", 422, "invalid_spec",
             spec={**_good_spec(ref), **{f"unknown{i}": i for i in range(2000)}}),
        Case("huge kind value", "POST", "/v1/jobs", 422, "invalid_spec", spec={"kind": "x" * 50_000}),
        Case("huge string body", "POST", "/v1/jobs", 422, "invalid_spec",
             kwargs={"content": json.dumps("x" * 60_000), "headers": json_h}),
        Case("huge bad name", "POST", "/v1/jobs", 422, "invalid_spec", spec=spec(name="N" * 50_000)),
        # nesting and numbers (finding 7)
        Case("JSON nested 30000", "POST", "/v1/jobs", 422, "invalid_spec",
             kwargs={"content": _deep(30_000), "headers": json_h}),
        Case("YAML nested 30000", "POST", "/v1/jobs", 422, "invalid_spec",
             kwargs={"content": _deep(30_000), "headers": yaml_h}),
        Case("JSON nested 70 in a field", "POST", "/v1/jobs", 422, "invalid_spec",
             spec=spec(lora=json.loads(_deep(70)))),
        Case("JSON 5000-digit number", "POST", "/v1/jobs", 422, "invalid_spec",
             kwargs={"content": '{"kind": "train", "x": ' + "9" * 5000 + "}", "headers": json_h}),
        Case("YAML 5000-digit number", "POST", "/v1/jobs", 422, "invalid_spec",
             kwargs={"content": "kind: train\nx: " + "9" * 5000 + "\n", "headers": yaml_h}),
        Case("40-digit number", "POST", "/v1/jobs", 422, "invalid_spec", spec=spec(lora={"r": 10 ** 40})),
        Case("python tag in YAML", "POST", "/v1/jobs", 422, "invalid_spec",
             kwargs={"content": "kind: !!python/object/apply:os.system ['true']\n", "headers": yaml_h}),
        Case("not JSON", "POST", "/v1/jobs", 422, "invalid_spec", kwargs={"content": b"\xff\xfe{", "headers": json_h}),
        # size limits (finding 9)
        Case("spec body over the limit", "POST", "/v1/jobs", 413, "payload_too_large",
             kwargs={"content": good_yaml + " " * MAX_BODY, "headers": json_h}),
        Case("chunked spec body over the limit", "POST", "/v1/jobs", 413, "payload_too_large",
             kwargs={"content": _chunks((good_yaml + " " * MAX_BODY).encode()), "headers": json_h}),
        Case("upload over the limit", "POST", "/v1/datasets", 413, "payload_too_large",
             kwargs={"content": b'{"text": "x"}\n' * (MAX_UPLOAD // 10)}),
        Case("chunked upload over the limit", "POST", "/v1/datasets", 413, "payload_too_large",
             kwargs={"content": _chunks(b'{"text": "x"}\n' * (MAX_UPLOAD // 10))}),
        Case("cancel with a body over the limit", "POST", "/v1/jobs/abc/cancel", 413, "payload_too_large",
             kwargs={"content": b"x" * (MAX_BODY + 1)}),
        # hostile dataset uploads (finding 7)
        Case("upload nested 30000", "POST", "/v1/datasets", 422, "invalid_dataset",
             kwargs={"params": {"format": "text"}, "content": ('{"text": ' + _deep(30_000) + "}\n").encode()}),
        Case("upload 5000-digit number", "POST", "/v1/datasets", 422, "invalid_dataset",
             kwargs={"params": {"format": "text"}, "content": ('{"text": ' + "7" * 5000 + "}\n").encode()}),
        Case("upload not UTF-8", "POST", "/v1/datasets", 422, "invalid_dataset",
             kwargs={"params": {"format": "text"}, "content": b'{"text": "\xff\xfe"}\n'}),
        Case("upload bad format", "POST", "/v1/datasets", 422, "invalid_request",
             kwargs={"params": {"format": "pickle"}, "content": b'{"text": "x"}\n'}),
        Case("upload huge filename", "POST", "/v1/datasets", 422, "invalid_request",
             kwargs={"params": {"filename": "f" * 5000}, "content": b'{"text": "x"}\n'}),
        Case("upload NUL filename", "POST", "/v1/datasets", 422, "invalid_dataset",
             kwargs={"params": {"filename": "a\x00b", "format": "text"}, "content": b"not json\n"},
             not_in_message=("\x00",)),
        # downloads and lookups
        Case("download traversal", "GET", f"{adapter}/../../../../etc/passwd", 404),
        Case("download unknown huge name", "GET", f"{adapter}/{'z' * 6000}", 404, "not_found"),
        Case("job id huge", "GET", "/v1/jobs/" + "0" * 6000, 404, "not_found"),
        Case("token in the query", "GET", "/v1/jobs", 401, "unauthorized",
             kwargs={"params": {"token": TOKENS["alice"]}, "headers": {"Authorization": ""}}),
    ]
    return cases


def test_hostile_requests_are_refused_cleanly(farm, tiny_model_dir, redis_url):
    client, settings, ref, version, tmp_path = farm
    cases = _cases(ref, version, tiny_model_dir)
    assert len(cases) >= 40
    jobs_before, files_before = _job_count(settings), _files(tmp_path)
    depth_before = queue_depths(["farm.cpu"], redis_url)
    for case in cases:
        kwargs = dict(case.kwargs)
        if case.spec is not None:
            kwargs["json"] = case.spec
        response = client.request(case.method, case.path, **kwargs)
        assert response.status_code == case.status, (case.label, response.status_code, response.text[:500])
        assert len(response.content) <= MAX_RESPONSE, (case.label, len(response.content))
        body = response.json()
        if case.code is not None:
            assert body["code"] == case.code, (case.label, body)
        assert "Traceback" not in body["message"], case.label
        for text in case.not_in_message:
            assert text not in body["message"], (case.label, body["message"])
        assert _job_count(settings) == jobs_before, case.label
        assert _files(tmp_path) == files_before, (case.label, _files(tmp_path) ^ files_before)
        assert client.get("/healthz").status_code == 200, case.label
    assert queue_depths(["farm.cpu"], redis_url) == depth_before
    # and a good spec still goes through
    assert client.post("/v1/jobs", json=_good_spec(ref)).status_code == 201


def test_messages_about_server_paths_do_not_say_what_exists(farm, tiny_model_dir):
    client, _settings, ref, _version, tmp_path = farm
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "config.json").write_text("{}")
    pairs = [("dataset", {"dataset": {"path": str(tmp_path / "train.jsonl"), "format": "chat"}},
              {"dataset": {"path": str(tmp_path / "absent.jsonl"), "format": "chat"}}),
             ("model", {"base_model": str(tmp_path / "exists")}, {"base_model": str(tmp_path / "absent")}),
             ("model dir", {"base_model": str(tiny_model_dir)}, {"base_model": str(tiny_model_dir) + "x"})]
    for label, real, fake in pairs:
        a = client.post("/v1/jobs", json={**_good_spec(ref), **real}).json()
        b = client.post("/v1/jobs", json={**_good_spec(ref), **fake}).json()
        real_ref = real.get("base_model") or real["dataset"]["path"]
        fake_ref = fake.get("base_model") or fake["dataset"]["path"]
        assert a["message"].replace(repr(real_ref), "X") == b["message"].replace(repr(fake_ref), "X"), label


def test_a_local_model_under_the_roots_is_accepted(farm, tiny_model_dir):
    import shutil

    client, settings, ref, _version, _tmp = farm
    inside = Path(settings.model_roots[0]) / "tiny"
    shutil.copytree(tiny_model_dir, inside)
    response = client.post("/v1/jobs", json={**_good_spec(ref), "base_model": str(inside)})
    assert response.status_code == 201, response.text
    # a symlink inside the roots that points outside them is not a way out
    (Path(settings.model_roots[0]) / "escape").symlink_to(tiny_model_dir)
    response = client.post("/v1/jobs", json={**_good_spec(ref), "name": "b2",
                                             "base_model": str(Path(settings.model_roots[0]) / "escape")})
    assert response.status_code == 422 and response.json()["code"] == "invalid_model"


def test_an_overlong_dataset_line_is_refused_without_reading_it_whole(farm, monkeypatch):
    client, _settings, _ref, _version, tmp_path = farm
    monkeypatch.setattr(datasets_module, "MAX_LINE_BYTES", 1000)
    body = b'{"text": "ok"}\n' + b'{"text": "' + b"x" * 5000 + b'"}\n'
    response = client.post("/v1/datasets", params={"format": "text"}, content=body)
    assert response.status_code == 422
    assert ":2: line of 5013 bytes is longer than the limit of 1000" in response.json()["message"]


@pytest.mark.parametrize("damage", ["flip", "missing"])
def test_downloads_are_checked_against_the_catalog_on_a_file_store(farm, damage):
    client, settings, _ref, version, _tmp = farm
    store = open_store(settings.store_url, settings)
    key = f"adapters/bot/v{version}/adapter_model.safetensors"
    ok = client.get(f"/v1/adapters/bot/{version}/files/adapter_model.safetensors")
    assert ok.status_code == 200 and ok.content == adapter_files("h")["adapter_model.safetensors"]
    path = store.root / key
    if damage == "flip":
        data = bytearray(path.read_bytes())
        data[100] ^= 1
        path.write_bytes(bytes(data))
    else:
        path.unlink()
    response = client.get(f"/v1/adapters/bot/{version}/files/adapter_model.safetensors")
    assert response.status_code == 502, response.text
    body = response.json()
    assert body["code"] == ("checksum_mismatch" if damage == "flip" else "store_error")
    assert "adapter_model.safetensors" in body["message"] and str(store.root) not in body["message"]
    assert client.get("/healthz").status_code == 200


def test_downloads_are_checked_against_the_catalog_on_s3(s3_store_url, sqlite_url, redis_url, tmp_path):
    settings = FarmSettings(store_url=s3_store_url.url, s3_endpoint_url=s3_store_url.endpoint_url,
                            s3_region="us-east-1", home=tmp_path / "home", database_url=sqlite_url,
                            broker_url=redis_url, work_dir=tmp_path / "work", cache_dir=tmp_path / "cache",
                            api_tokens=TOKENS)
    version = publish_test_adapter(settings, "bot", adapter_files("s"))
    store = open_store(settings.store_url, settings)
    key = f"adapters/bot/v{version}/README.md"
    with TestClient(create_app(settings)) as client:
        client.headers.update(ALICE)
        assert client.get(f"/v1/adapters/bot/{version}/files/README.md").status_code == 200
        store.put_bytes(b"# not the published readme\n", key)
        damaged = client.get(f"/v1/adapters/bot/{version}/files/README.md")
        assert damaged.status_code == 502 and damaged.json()["code"] == "checksum_mismatch"
        store.delete(key)
        missing = client.get(f"/v1/adapters/bot/{version}/files/README.md")
        assert missing.status_code == 502 and missing.json()["code"] == "store_error"


def test_tokens_in_urls_and_headers_stay_out_of_the_server_log(tmp_path):
    import httpx

    from tests.test_client_http import start_api_server, stop_api_server

    server = start_api_server(tmp_path / "api")
    secret = TOKENS["bob"]
    try:
        httpx.get(f"{server.url}/v1/jobs", params={"token": secret, "api_key": secret}, timeout=10)
        httpx.get(f"{server.url}/v1/jobs", params={"limit": 1}, headers={"Authorization": f"Bearer {secret}"},
                  timeout=10)
        httpx.get(f"{server.url}/v1/jobs/{secret}", headers={"Authorization": f"Bearer {secret}"}, timeout=10)
    finally:
        stop_api_server(server.proc)
    log = server.log.read_text(errors="replace")
    assert "GET /v1/jobs?<redacted>" in log, log[-2000:]
    assert f"token={secret}" not in log and f"Bearer {secret}" not in log
    assert os.environ.get("FARM_API_TOKENS", "") not in log or not os.environ.get("FARM_API_TOKENS")


def test_the_local_cli_refuses_hostile_specs_and_datasets_without_a_traceback(tmp_path, tiny_model_dir):
    import subprocess
    import sys

    import yaml

    from farm.catalog.migrate import upgrade_database

    repo_root = Path(__file__).resolve().parents[1]
    db = f"sqlite:///{tmp_path}/catalog.db"
    upgrade_database(db)
    env = {**os.environ, "FARM_DATABASE_URL": db, "FARM_STORE_URL": f"file://{tmp_path}/store",
           "FARM_HOME": str(tmp_path / "home"), "FARM_BROKER_URL": "redis://127.0.0.1:1/0",
           "PYTHONPATH": str(repo_root)}
    env.pop("FARM_API_URL", None)

    def spec_with(dataset_line: str) -> dict:
        data = tmp_path / f"d{abs(hash(dataset_line)) % 10 ** 8}.jsonl"
        data.write_text(dataset_line + "\n")
        return {"kind": "train", "name": "bot", "base_model": str(tiny_model_dir),
                "dataset": {"path": str(data), "format": "text"}}

    specs = {
        "nested spec": _deep(30_000),
        "billion laughs": _laughs(9),
        "nested dataset line": yaml.safe_dump(spec_with('{"text": ' + _deep(30_000) + "}")),
        "huge number in a line": yaml.safe_dump(spec_with('{"text": ' + "7" * 5000 + "}")),
    }
    for label, text in specs.items():
        path = tmp_path / f"{label.replace(' ', '_')}.yaml"
        path.write_text(text)
        out = subprocess.run([sys.executable, "-m", "farm.cli.main", "submit", str(path)], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, (label, out.returncode, out.stderr[-2000:])
        assert "Traceback" not in out.stderr and len(out.stderr) < 4000, (label, out.stderr[-2000:])
