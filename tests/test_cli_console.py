"""The CLI as a new user meets it (issue 16): --version, FARM_HOME as the one home, a missing or unmigrated catalog
as one line (no stray file), output to a pipe not wrapped, `farm events` as a table / JSON / followed, finished jobs
with their final and eval loss, `farm submit --wait` saying that no worker serves the queue, `farm logs`, and the
HTTP client retrying idempotent calls through 502/503/504 and dropped connections."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from pydantic import SecretStr

from farm import service
from farm.catalog import repository as repo
from farm.catalog.migrate import upgrade_database
from farm.catalog.session import session_scope
from farm.client_http import HttpClient
from farm.errors import FarmError
from farm.settings import FarmSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
E2E_REDIS_DB = int(os.environ.get("FARM_TEST_E2E_REDIS_DB", "13"))


def farm(args, env, cwd, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "farm.cli.main", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def clean_env(**farm_env) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    return {**env, "PYTHONPATH": str(REPO_ROOT), **farm_env}


@pytest.fixture
def home(tmp_path):
    """A migrated farm home (FARM_HOME only: the catalog and store live under it)."""
    root = tmp_path / "farmhome"
    env = clean_env(FARM_HOME=str(root), FARM_BROKER_URL=f"redis://127.0.0.1:6379/{E2E_REDIS_DB}")
    out = farm(["db", "upgrade"], env, tmp_path)
    assert out.returncode == 0, out.stderr
    assert (root / "catalog.db").is_file() and not (tmp_path / ".farm").exists()
    return env, FarmSettings(home=root, broker_url=env["FARM_BROKER_URL"])


def finished_job(settings: FarmSettings, name: str = "a-rather-long-adapter-name-that-would-wrap-at-80-columns") -> str:
    """A job that ran 3 steps with an eval and succeeded (the catalog's own calls, as a worker makes them)."""
    with session_scope(settings.database_url) as session:
        job_id = repo.create_job(session, kind="train", name=name, queue="farm.cpu", spec={"kind": "train"},
                                 spec_hash="2" * 64, max_attempts=3).id
    with session_scope(settings.database_url) as session:
        claim = repo.claim_job(session, job_id, "w@host/pid1", 60)
        for step, loss in ((1, 2.123456789012345), (2, 1.98765432101234), (3, 1.5432109876543)):
            repo.record_progress(session, claim, {"step": step, "total_steps": 3, "loss": loss, "lr": 1e-4,
                                                 "tokens_per_s": 1000.0 + step, "eta_s": 3 - step})
            if step == 2:
                repo.record_progress(session, claim, {"step": 2, "eval_loss": 1.87654321, "perplexity": 6.5},
                                     event_type="eval")
        adapter = repo.reserve_adapter_version(session, claim, name=name, kind="train", spec_hash="2" * 64)
        repo.publish_adapter(session, claim, files=[], provenance={}, metrics={"final_loss": 1.5432109876543})
        assert adapter.version == 1
    return job_id


def test_version_and_shell_completion():
    env = clean_env()
    out = farm(["--version"], env, REPO_ROOT)
    assert out.returncode == 0 and out.stdout.strip().startswith("farm 0.")
    out = farm(["--help"], env, REPO_ROOT)
    assert "--install-completion" in out.stdout


def test_a_missing_or_unmigrated_catalog_is_one_line_and_leaves_no_stray_file(tmp_path):
    env = clean_env()
    out = farm(["jobs"], env, tmp_path)
    assert out.returncode == 1 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "no catalog at" in lines[0] and "farm up" in lines[0], out.stderr
    assert not (tmp_path / ".farm").exists(), "a stray catalog file was created"

    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "catalog.db").write_bytes(b"")  # a file, never migrated
    out = farm(["show", "abc"], clean_env(FARM_HOME=str(tmp_path / "h")), tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and "farm db upgrade" in lines[0], out.stderr


def test_tables_are_not_wrapped_and_finished_jobs_show_final_and_eval_loss(home, tmp_path):
    env, settings = home
    name = "a-rather-long-adapter-name-that-would-wrap-at-80-columns"
    job_id = finished_job(settings, name)
    out = farm(["jobs"], env, tmp_path)
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if job_id[:12] in line)
    assert name in row and "final loss 1.543" in row and "eval loss 1.877" in row, out.stdout
    assert "eta" not in row and " lr " not in row

    table = farm(["events", job_id[:10]], env, tmp_path).stdout
    assert "loss=2.123 " in table and "2.123456789" not in table and "eval_loss=1.877" in table
    assert len(table.splitlines()) == 1 + 2 + 3 + 1 + 1  # header, queued + running, 3 progress, eval, succeeded
    events = json.loads(farm(["events", job_id, "--json"], env, tmp_path).stdout)
    assert [e["type"] for e in events] == ["state", "state", "progress", "progress", "eval", "progress", "state"]
    followed = farm(["events", job_id, "-f"], env, tmp_path, timeout=60)
    assert followed.returncode == 0 and followed.stdout.count("progress") == 3 and "succeeded" in followed.stdout


def test_submit_wait_says_when_no_worker_serves_the_queue(home, tmp_path):
    import redis

    env, settings = home
    redis.Redis.from_url(settings.broker_url).flushdb()
    (tmp_path / "train.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n")
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"kind": "train", "name": "lonely", "base_model": "org/tiny-llama",
                                    "dataset": {"path": "train.jsonl", "format": "chat"},
                                    "resources": {"gpus": 1}, "training": {"max_steps": 2}}))
    proc = subprocess.Popen([sys.executable, "-m", "farm.cli.main", "submit", str(spec), "--wait"], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        seen = ""
        while time.monotonic() < deadline and "no worker serves" not in seen:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
            seen += line
        assert "no worker serves the queue farm.gpu.1" in seen, seen
        assert "`farm worker --gpus all`" in seen
    finally:
        proc.kill()
        proc.wait()
        redis.Redis.from_url(settings.broker_url).flushdb()


def test_logs_prints_an_attempts_log_from_the_store(home, tmp_path):
    from farm.job_logs import job_log_key
    from farm.store import open_store

    env, settings = home
    job_id = finished_job(settings, "logged")
    store = open_store(settings.store_url, settings)
    store.put_bytes(b"loading base\nstep 1 loss 2.1\n", job_log_key(job_id, 1))
    out = farm(["logs", job_id[:8]], env, tmp_path)
    assert out.returncode == 0 and out.stdout == "loading base\nstep 1 loss 2.1\n", out.stderr
    out = farm(["logs", job_id, "--attempt", "2"], env, tmp_path)
    assert out.returncode == 1 and "no log for attempt 2 (attempts with a log: 1)" in out.stderr


# ------------------------------------------------------------------ the HTTP client's retries


class _Flaky(BaseHTTPRequestHandler):
    """Answers each path's first `failures` requests with 503 (a proxy in front of a restarting API), then 200."""

    failures: dict[str, int] = {}
    hits: dict[tuple[str, str], int] = {}

    def _answer(self):
        key = (self.command, self.path.split("?")[0])
        _Flaky.hits[key] = _Flaky.hits.get(key, 0) + 1
        if _Flaky.hits[key] <= _Flaky.failures.get(key[1], 0):
            self.send_response(503)
            self.end_headers()
            self.wfile.write(b"upstream restarting")
            return
        body = json.dumps([]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


def test_http_client_retries_idempotent_calls_on_503_and_refused_connections():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    _Flaky.failures, _Flaky.hits = {"/v1/jobs": 3, "/v1/jobs/abc/cancel": 1}, {}
    try:
        client = HttpClient(FarmSettings(api_url=url, api_token=SecretStr("t")))
        client.backoff_s = 0.01
        assert client.list_jobs() == []
        assert _Flaky.hits[("GET", "/v1/jobs")] == 4
        with pytest.raises(FarmError, match="HTTP 503"):  # a POST is never sent twice
            client.cancel("abc")
        assert _Flaky.hits[("POST", "/v1/jobs/abc/cancel")] == 1
        _Flaky.failures["/v1/jobs"] = 99
        _Flaky.hits.clear()
        with pytest.raises(FarmError, match="503"):
            client.list_jobs()
        assert _Flaky.hits[("GET", "/v1/jobs")] == 1 + client.retries
    finally:
        server.shutdown()

    # an API that is down (connection refused) and comes back while the client backs off: the call succeeds
    port = server.server_address[1]
    server.server_close()
    _Flaky.failures, _Flaky.hits = {}, {}
    client = HttpClient(FarmSettings(api_url=url, api_token=SecretStr("t")))
    client.backoff_s = 0.2
    revived: list[ThreadingHTTPServer] = []

    def revive():
        revived.append(ThreadingHTTPServer(("127.0.0.1", port), _Flaky))
        revived[0].serve_forever()

    timer = threading.Timer(0.3, revive)
    timer.daemon = True
    timer.start()
    try:
        assert client.list_jobs() == []
        assert _Flaky.hits[("GET", "/v1/jobs")] == 1
    finally:
        if revived:
            revived[0].shutdown()
            revived[0].server_close()


def test_events_follow_logs_and_jobs_through_the_api(tmp_path):
    """The same commands with only FARM_API_URL and FARM_API_TOKEN: no catalog, broker or store on the client."""
    from farm.job_logs import job_log_key
    from farm.store import open_store
    from tests.fixtures.api import TOKENS
    from tests.test_client_http import start_api_server, stop_api_server

    server = start_api_server(tmp_path / "api")
    try:
        job_id = finished_job(server.settings, "remote-logged")
        open_store(server.settings.store_url, server.settings).put_bytes(b"runner says hi\n", job_log_key(job_id, 1))
        env = clean_env(FARM_API_URL=server.url, FARM_API_TOKEN=TOKENS["alice"],
                        FARM_DATABASE_URL="sqlite:////nonexistent/x.db", FARM_BROKER_URL="redis://127.0.0.1:1/0")
        followed = farm(["events", job_id[:8], "-f"], env, tmp_path, timeout=60)
        assert followed.returncode == 0, followed.stderr
        assert followed.stdout.count("progress") == 3 and "succeeded" in followed.stdout and "1.877" in followed.stdout
        lines = [json.loads(line) for line in farm(["events", job_id, "-f", "--json"], env, tmp_path).stdout.splitlines()]
        assert [e["type"] for e in lines][-1] == "state" and lines[-1]["state"] == "succeeded"
        assert farm(["logs", job_id], env, tmp_path).stdout == "runner says hi\n"
        row = farm(["jobs"], env, tmp_path).stdout
        assert "final loss 1.543" in row and "eval loss 1.877" in row
    finally:
        stop_api_server(server.proc)


def test_logs_follow_prints_new_lines_until_the_job_ends(home, tmp_path):
    from farm.job_logs import job_log_key
    from farm.store import open_store

    env, settings = home
    with session_scope(settings.database_url) as session:
        job_id = repo.create_job(session, kind="train", name="followed", queue="farm.cpu", spec={"kind": "train"},
                                 spec_hash="3" * 64, max_attempts=3).id
    store = open_store(settings.store_url, settings)
    proc = subprocess.Popen([sys.executable, "-m", "farm.cli.main", "logs", job_id, "-f"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3)  # no log yet: following waits for one
        store.put_bytes(b"loading base\n", job_log_key(job_id, 1))
        time.sleep(2.5)
        store.put_bytes(b"loading base\nstep 1 loss 2.1\n", job_log_key(job_id, 1))
        service.cancel_job(job_id, settings=settings)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out == "loading base\nstep 1 loss 2.1\n", (out, err)


def test_local_submit_shows_an_upload_bar_and_wait_shows_the_publishing_phase(home, tmp_path):
    """Local mode, stderr a terminal (TTY_COMPATIBLE=1 as rich reads it): `farm submit --wait` draws a bar while the
    dataset goes to the store, and its job bar says `publishing` while the worker publishes (the catalog calls a
    worker makes: claim, progress, workers.publish.mark_publishing, publish)."""
    import redis

    from workers.publish import mark_publishing

    env, settings = home
    env = {**env, "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "COLUMNS": "160", "HF_HUB_OFFLINE": "1"}
    redis.Redis.from_url(settings.broker_url).flushdb()
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]}) + "\n"
        for i in range(500)))
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"kind": "train", "name": "shown", "base_model": "org/tiny-llama",
                                    "dataset": {"path": "train.jsonl", "format": "chat"},
                                    "training": {"max_steps": 3}}))
    proc = subprocess.Popen([sys.executable, "-m", "farm.cli.main", "submit", str(spec), "--wait"], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (jobs := service.list_jobs(settings=settings)) and time.monotonic() < deadline:
            time.sleep(0.2)
        job_id = jobs[0].id
        with session_scope(settings.database_url) as session:
            claim = repo.claim_job(session, job_id, "w@host/pid1", 60)
            for step in (1, 2, 3):
                repo.record_progress(session, claim, {"step": step, "total_steps": 3, "loss": 2.0 - step / 10,
                                                     "tokens_per_s": 900.0, "eta_s": 3 - step})
        time.sleep(1.5)
        mark_publishing(settings, claim)
        time.sleep(2.5)  # the CLI polls twice a second
        with session_scope(settings.database_url) as session:
            repo.reserve_adapter_version(session, claim, name="shown", kind="train", spec_hash="4" * 64)
            repo.publish_adapter(session, claim, files=[], provenance={}, metrics={"final_loss": 1.7})
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
        redis.Redis.from_url(settings.broker_url).flushdb()
    assert proc.returncode == 0, err
    assert "upload train.jsonl" in err and "kB" in err, err
    assert "publishing: uploading the artifact" in err, err
    events = service.job_events(job_id, settings=settings)
    assert [(e.type, e.data.get("phase")) for e in events if e.type in ("progress", "publishing")][-1] \
        == ("publishing", "publishing")
