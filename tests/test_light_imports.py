"""Producers are light (DESIGN invariant 3): the CLI, the service layer, the API and submit-time validation never
import torch or transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PRODUCER_MODULES = ["farm.cli.main", "farm.service", "farm.client", "farm.client_http", "api.app", "farm.store",
                    "farm.store.transfer", "farm.extraction.validate", "farm.model_files", "farm.queue",
                    "farm.stats", "farm.embedded"]


def test_producer_modules_do_not_import_torch():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in PRODUCER_MODULES)
            + "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', 'deepspeed') "
              "if m in sys.modules)\nprint(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"producer imports pulled in {out.stdout.strip()}"


def test_farm_help_runs_without_torch():
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom farm.cli.main import app\n"
            "r = CliRunner().invoke(app, ['--help'])\nassert r.exit_code == 0, r.output\n"
            "assert 'submit' in r.output\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------ `farm submit` is a light producer (issue 12)

SUBMIT_LOCAL_NEVER = {"rich", "boto3", "botocore", "fastapi", "starlette", "uvicorn", "httpx", "torch",
                      "transformers", "alembic", "pydantic_settings"}
"""A local `farm submit` validates, records and rings: the catalog (SQLAlchemy) and the broker (Celery, kombu,
redis) are all it may load beyond the spec's checks; no terminal styling when its output is a pipe."""
SUBMIT_HTTP_NEVER = {"sqlalchemy", "celery", "kombu", "redis", "boto3", "botocore", "fastapi", "starlette",
                     "uvicorn", "rich", "torch", "trio", "click", "pygments", "alembic", "pydantic_settings"}
"""Through the API (FARM_API_URL) the client checks the spec and its local dataset and sends them: no catalog,
broker or store library, no rich (httpx's own command line), no trio (httpcore's optional async backend)."""


_REPORT_AT_EXIT = """
import atexit, json, os, sys
report, real_exit = sys.argv.pop(1), os._exit
def write():
    with open(report, "w") as fh:
        json.dump(sorted({name.split(".")[0] for name, module in list(sys.modules.items()) if module is not None}), fh)
def exit_now(code):
    write()
    real_exit(code)
os._exit = exit_now  # the CLI ends a short command with os._exit: no atexit hook runs then
atexit.register(write)
sys.argv[0] = "farm"
from farm.cli.main import main
main()
"""


def farm_imports(args: list[str], env: dict, cwd) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `farm ARGS` as a real process (the console script's main()); return it and the top-level names of
    the modules loaded when it exited, read from sys.modules as it ends (os._exit or a normal exit)."""
    report = Path(cwd) / "modules.json"
    report.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-c", _REPORT_AT_EXIT, str(report), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    return proc, set(json.loads(report.read_text())) if report.exists() else set()


def _submit_spec(tmp_path, model_dir) -> Path:
    from farm.tiny import write_dataset
    from tests.test_end_to_end import write_spec

    write_dataset(tmp_path / "chat.jsonl", "chat", n=8, seed=3)
    return write_spec(tmp_path / "job.yaml", model_dir, tmp_path / "chat.jsonl")


def test_local_submit_loads_no_styling_store_api_or_torch(farm_stack, tiny_model_dir, tmp_path):
    spec = _submit_spec(tmp_path, tiny_model_dir)
    proc, modules = farm_imports(["submit", str(spec)], farm_stack.env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("submitted job ") and proc.stdout.rstrip().endswith("to farm.cpu"), proc.stdout
    assert {"farm", "sqlalchemy", "pydantic", "yaml"} <= modules  # the report is read
    assert not modules & SUBMIT_LOCAL_NEVER, f"a local farm submit imported {sorted(modules & SUBMIT_LOCAL_NEVER)}"
    if len(os.sched_getaffinity(0)) >= 2:  # the broker's side ran in the forked helper (farm/doorbell_helper.py)
        assert not modules & {"celery", "kombu", "redis"}, sorted(modules & {"celery", "kombu", "redis"})
    from farm import service
    from farm.queue import job_ids_in_broker

    (job,) = service.list_jobs(settings=farm_stack.settings)
    assert job.id in proc.stdout and job.state == "queued"
    assert job.id in job_ids_in_broker([job.queue], farm_stack.settings.broker_url)  # its doorbell rang


def test_http_submit_loads_no_catalog_broker_store_or_rich(farm_stack, tiny_model_dir, tmp_path):
    from tests.test_cli_end_to_end import TOKENS, client_env, running_api

    spec = _submit_spec(tmp_path, tiny_model_dir)
    with running_api(farm_stack, {"FARM_API_TOKENS": json.dumps(TOKENS),
                                  "FARM_MODEL_ROOTS": json.dumps([str(tiny_model_dir.parent)])}) as url:
        env = client_env(farm_stack, "remote", url)  # no catalog or broker a client could reach
        proc, modules = farm_imports(["submit", str(spec), "--json"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = json.loads(proc.stdout)
    assert job["state"] == "queued" and job["submitted_by"] == "ci"
    assert {"farm", "httpx", "pydantic", "yaml"} <= modules  # the report is read
    assert not modules & SUBMIT_HTTP_NEVER, f"an HTTP farm submit imported {sorted(modules & SUBMIT_HTTP_NEVER)}"


def test_cli_import_is_light_and_every_command_is_still_listed():
    """Importing the CLI loads no command module, rich or the service layer; the help lists all commands, and a
    command module's command (farm logs) runs through the same app."""
    code = ("import sys\nfrom farm.cli.main import app\n"
            "print(sorted(m for m in sys.modules if m.startswith('farm.cli.cmd_') or m.split('.')[0] in "
            "('rich', 'sqlalchemy', 'celery', 'httpx') or m == 'farm.service'))\n"
            "from typer.testing import CliRunner\n"
            "r = CliRunner().invoke(app, ['--help'])\nassert r.exit_code == 0, r.output\n"
            "names = ('submit', 'logs', 'merge', 'route', 'schedule', 'remote', 'db')\n"
            "assert all(f' {c} ' in r.output for c in names), r.output\n"
            "r = CliRunner().invoke(app, ['logs', '--help'])\nassert r.exit_code == 0 and 'attempt' in r.output\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_settings_read_the_environment_as_pydantic_settings_did(monkeypatch, tmp_path):
    """FarmSettings reads FARM_* in any letter case, JSON for list and dict fields, keyword arguments first, as
    pydantic-settings' BaseSettings did for it (without importing it: a light producer); a bad value is one
    SettingsError naming the variable."""
    from farm.settings import FarmSettings

    for key in [k for k in os.environ if k.upper().startswith("FARM_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("farm_home", str(tmp_path / "h"))  # any letter case
    monkeypatch.setenv("FARM_MAX_ATTEMPTS", "5")
    monkeypatch.setenv("FARM_API_TOKENS", '{"a": "x", "b": "y"}')  # list and dict fields are JSON
    monkeypatch.setenv("FARM_MODEL_ROOTS", '["/m"]')
    monkeypatch.setenv("FARM_BROKER_URL", "redis://env/1")
    s = FarmSettings(broker_url="redis://kw/2", api_tokens={"b": "z"})
    assert s.home == tmp_path / "h" and s.database_url == f"sqlite:///{tmp_path / 'h'}/catalog.db"
    assert s.max_attempts == 5 and s.model_roots == [Path("/m")] and s.broker_url == "redis://kw/2"
    assert {k: v.get_secret_value() for k, v in s.api_tokens.items()} == {"a": "x", "b": "z"}  # merged, kwargs win
    assert {"home", "max_attempts", "broker_url", "api_tokens", "model_roots"} <= s.model_fields_set
    assert FarmSettings(home=tmp_path).work_dir == tmp_path / "work"  # defaults validated, derived from home
    monkeypatch.setenv("FARM_WEBHOOK_URLS", "not json")
    with pytest.raises(ValueError, match="FARM_WEBHOOK_URLS"):
        FarmSettings()
    from farm.errors import SettingsError
    from farm.settings import get_settings

    get_settings.cache_clear()
    try:
        with pytest.raises(SettingsError, match="FARM_WEBHOOK_URLS is not JSON"):
            get_settings()
        monkeypatch.delenv("FARM_WEBHOOK_URLS")
        monkeypatch.setenv("FARM_MAX_ATTEMPTS", "zero")
        with pytest.raises(SettingsError, match="FARM_MAX_ATTEMPTS: Input should be a valid integer"):
            get_settings()
    finally:
        get_settings.cache_clear()
