"""Flower for the farm: the command line, the refusal to run without a login, and a real Flower on the real Redis
answering 401 without credentials and keeping task runtimes in buckets that reach a day."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from farm.errors import FarmError
from farm.flower import RUNTIME_BUCKETS_S, flower_command, flower_env
from farm.settings import FarmSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "flower-pw-5e1c0b7d"


def test_the_command_line_names_the_farm_app_persistent_state_and_day_long_buckets(tmp_path):
    from flower.command import is_flower_option

    settings = FarmSettings(home=tmp_path / "home", flower_basic_auth=f"admin:{PASSWORD}")
    command = flower_command(settings, 5601, address="0.0.0.0")
    assert command[:6] == [sys.executable, "-m", "celery", "-A", "farm.queue:celery_app", "flower"]
    options = dict(arg[2:].split("=", 1) for arg in command[6:])
    assert all(is_flower_option(arg) for arg in command[6:])  # Flower's own test of its option names
    assert options["port"] == "5601" and options["address"] == "0.0.0.0"
    assert options["persistent"] == "True" and options["db"] == str((tmp_path / "home" / "flower.db").absolute())
    buckets = [float(b) for b in options["task_runtime_metric_buckets"].split(",")]
    assert buckets == sorted(buckets) and buckets[-1] == 86400 and buckets == list(RUNTIME_BUCKETS_S)
    assert not any(PASSWORD in arg for arg in command)  # the password is not on the process list


def test_flower_refuses_to_run_without_a_login_unless_told_to(tmp_path):
    with pytest.raises(FarmError, match="FARM_FLOWER_BASIC_AUTH=user:password, or pass --no-auth"):
        flower_env(FarmSettings(home=tmp_path), base={})
    for bad in ("admin", "admin:", ":pw", "a:b,c"):
        with pytest.raises(FarmError, match="must be user:password"):
            flower_env(FarmSettings(home=tmp_path, flower_basic_auth=bad), base={})
    env = flower_env(FarmSettings(home=tmp_path, broker_url="redis://h:6379/3", flower_basic_auth=f"a:{PASSWORD}"),
                     base={})
    assert env == {"FARM_BROKER_URL": "redis://h:6379/3", "FLOWER_BASIC_AUTH": f"a:{PASSWORD}"}
    assert "FLOWER_BASIC_AUTH" not in flower_env(FarmSettings(home=tmp_path), no_auth=True, base={})

    refused = subprocess.run([sys.executable, "-m", "farm.flower", "--port", "1"], cwd=REPO_ROOT,
                             env={**os.environ, "FARM_HOME": str(tmp_path), "FARM_FLOWER_BASIC_AUTH": ""},
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "set FARM_FLOWER_BASIC_AUTH" in refused.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _send_task_events(settings: FarmSettings, runtime: float) -> None:
    """What a worker sends for one finished task (Flower builds its runtime histogram from these)."""
    from farm.queue import app_for

    app = app_for(settings)
    task_id = str(uuid.uuid4())
    with app.connection_for_write() as conn:
        dispatcher = app.events.Dispatcher(conn, hostname="probe@test", enabled=True)
        dispatcher.send("task-received", uuid=task_id, name="farm.run_job", args="[]", kwargs="{}", retries=0)
        dispatcher.send("task-started", uuid=task_id)
        dispatcher.send("task-succeeded", uuid=task_id, result="None", runtime=runtime)
        dispatcher.close()


def test_flower_runs_with_basic_auth_and_keeps_day_long_runtimes(tmp_path, redis_url):
    port = _free_port()
    settings = FarmSettings(home=tmp_path / "home", broker_url=redis_url)
    env = {**os.environ, "FARM_HOME": str(tmp_path / "home"), "FARM_BROKER_URL": redis_url,
           "FARM_FLOWER_BASIC_AUTH": f"admin:{PASSWORD}", "PYTHONPATH": str(REPO_ROOT)}
    log = tmp_path / "flower.log"
    proc = subprocess.Popen([sys.executable, "-m", "farm.flower", "--port", str(port)], cwd=REPO_ROOT, env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url, auth = f"http://127.0.0.1:{port}", ("admin", PASSWORD)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                anonymous = httpx.get(url + "/workers", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
                time.sleep(0.2)
        assert anonymous.status_code == 401
        assert httpx.get(url + "/workers", auth=("admin", "wrong"), timeout=5).status_code == 401
        assert httpx.get(url + "/workers", auth=auth, timeout=5).status_code == 200

        # A 5000 s task lands in a finite bucket, not only in +Inf as with Flower's 10 s default.
        bucket = 'flower_task_runtime_seconds_bucket{le="7200.0",task="farm.run_job",worker="probe@test"}'
        deadline = time.monotonic() + 30
        while True:
            _send_task_events(settings, runtime=5000.0)
            metrics = httpx.get(url + "/metrics", auth=auth, timeout=5).text
            if bucket in metrics:
                break
            assert time.monotonic() < deadline, metrics[-2000:]
            time.sleep(0.3)
        assert f"{bucket} 0.0" not in metrics
        assert 'flower_task_runtime_seconds_bucket{le="3600.0",task="farm.run_job",worker="probe@test"} 0.0' in metrics
        assert 'le="86400.0"' in metrics
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    # Persistent mode saved the state on the way out.
    assert list((tmp_path / "home").glob("flower.db*")), log.read_text(errors="replace")
    assert PASSWORD not in log.read_text(errors="replace")
