"""The `farm` CLI end to end, as a user runs it: locally (service layer) and remotely (through a running API in
its own process, with no database or broker credentials on the client), with a real worker training the job."""

from __future__ import annotations

import contextlib

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.test_end_to_end import write_spec

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKENS = {"ci": "tok-ci-5b1f0d6e2a9c4e77"}


def farm(args, env, cwd=None, check=True):
    proc = subprocess.run([sys.executable, "-m", "farm.cli.main", *args], env=env, cwd=cwd or REPO_ROOT,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"farm {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_api(farm_stack, extra_env: dict):
    """`farm api` in its own process on a free port with the stack's settings (plus `extra_env`); yields its URL."""
    port = free_port()
    env = {**farm_stack.env, **extra_env}
    log = (farm_stack.root / "api.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "farm.cli.main", "api", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline and proc.poll() is None, (farm_stack.root / "api.log").read_text()
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture
def api_server(farm_stack, tiny_model_dir):
    with running_api(farm_stack, {"FARM_API_TOKENS": json.dumps(TOKENS),  # remote callers name local models only
                                  "FARM_MODEL_ROOTS": json.dumps([str(tiny_model_dir.parent)])}) as url:
        yield url


def client_env(farm_stack, mode, api_url=None) -> dict:
    if mode == "local":
        return dict(farm_stack.env)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    # nothing but the API: a client that touched the catalog or the broker would fail on these
    env.update(FARM_API_URL=api_url, FARM_API_TOKEN=TOKENS["ci"], FARM_DATABASE_URL="sqlite:////nonexistent/x.db",
               FARM_BROKER_URL="redis://127.0.0.1:1/0", FARM_STORE_URL="file:///nonexistent/store",
               PYTHONPATH=str(REPO_ROOT))
    return env


@pytest.mark.parametrize("mode", ["local", "remote"])
def test_submit_wait_list_show_pull(mode, farm_stack, tiny_model_dir, tmp_path, request):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from farm.tiny import write_dataset

    api_url = request.getfixturevalue("api_server") if mode == "remote" else None
    env = client_env(farm_stack, mode, api_url)
    (tmp_path / "data").mkdir()
    write_dataset(tmp_path / "data" / "chat.jsonl", "chat", n=32, seed=5)
    spec = write_spec(tmp_path / "job.yaml", tiny_model_dir, "data/chat.jsonl")  # relative to the spec's folder
    farm_stack.start_worker()

    # a bad spec: non-zero exit, the message names the line, nothing submitted
    bad = tmp_path / "bad.yaml"
    (tmp_path / "data" / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "x"}]}\n')
    bad.write_text(spec.read_text().replace("data/chat.jsonl", "data/bad.jsonl"))
    out = farm(["submit", str(bad)], env, cwd=tmp_path, check=False)
    assert out.returncode == 2 and "bad.jsonl:1: no assistant message" in out.stderr, out.stderr
    assert json.loads(farm(["jobs", "--json"], env).stdout) == []

    out = farm(["submit", str(spec), "--wait", "--json"], env, cwd=tmp_path)
    job = json.loads(out.stdout)
    assert job["state"] == "succeeded" and job["adapter"] == "e2e-bot:1", farm_stack.worker_logs()
    if mode == "remote":
        assert job["submitted_by"] == "ci"

    jobs = json.loads(farm(["jobs", "--json", "--state", "succeeded"], env).stdout)
    assert [j["id"] for j in jobs] == [job["id"]]
    shown = farm(["show", job["id"][:8]], env).stdout
    assert "succeeded" in shown and "e2e-bot:1" in shown
    adapters = json.loads(farm(["adapters", "--json"], env).stdout)
    assert [(a["name"], a["version"]) for a in adapters] == [("e2e-bot", 1)]
    provenance = json.loads(farm(["adapter", "e2e-bot:1", "--json"], env).stdout)
    assert provenance["dataset_sha256"] and provenance["provenance"]["dataset"]["examples"] == 32
    timings = provenance["provenance"]["timings"]  # where the job's time went, phase by phase
    assert {"data_seconds", "load_seconds", "train_seconds", "save_seconds", "total_seconds"} <= set(timings)
    detail = farm(["adapter", "e2e-bot:1"], env).stdout
    assert f"train {timings['train_seconds']:.2f} s" in detail and "load " in detail

    dest = tmp_path / "pulled"
    pulled = json.loads(farm(["pull", "e2e-bot:1", str(dest), "--json"], env).stdout)
    # tensorboard/ is a subfolder of the artifact (issue 13)
    assert {f["path"] for f in pulled["files"]} == {p.relative_to(dest).as_posix() for p in dest.rglob("*")
                                                    if p.is_file()}
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, dest)
    assert any("lora_" in n for n, _ in model.named_parameters())

    # pulling again onto a non-empty folder is refused and leaves it as it was
    out = farm(["pull", "e2e-bot:1", str(dest)], env, check=False)
    assert out.returncode != 0 and "error" in out.stderr
    assert {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()} == {
        f["path"] for f in pulled["files"]}
