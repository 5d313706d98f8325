"""A submit while the broker cannot be reached: one clear error that names FARM_BROKER_URL, and nothing of the job
left behind (no row, no event, no lineage that would later deduplicate a resubmit into a job nobody runs), from
the service on both catalogs, the `farm submit` process and the HTTP API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.app import create_app
from farm import service
from farm.catalog.migrate import upgrade_database
from farm.catalog.models import Job, JobEvent, JobLineage
from farm.catalog.session import session_scope
from farm.errors import FarmError
from farm.settings import FarmSettings
from farm.tiny import write_dataset
from tests.fixtures.api import TOKENS

REPO_ROOT = Path(__file__).resolve().parents[1]
DOWN = "redis://127.0.0.1:9/0"  # nothing listens on port 9


def settings_for(tmp_path, database_url: str, broker_url: str) -> FarmSettings:
    return FarmSettings(home=tmp_path / "home", database_url=database_url, broker_url=broker_url,
                        store_url=f"file://{tmp_path}/store", work_dir=tmp_path / "work", cache_dir=tmp_path / "cache",
                        api_tokens=TOKENS)


def spec(model_dir, data) -> dict:
    return {"kind": "train", "name": "unrung", "base_model": str(model_dir),
            "dataset": {"path": str(data), "format": "chat"}, "training": {"max_steps": 2}}


def row_counts(database_url: str) -> dict[str, int]:
    with session_scope(database_url) as session:
        return {t.__tablename__: session.scalar(select(func.count()).select_from(t)) for t in (Job, JobEvent, JobLineage)}


NOTHING = {"jobs": 0, "job_events": 0, "job_lineage": 0}


def test_the_service_takes_the_job_back_on_both_catalogs(catalog_url, redis_url, tmp_path, tiny_model_dir):
    data = write_dataset(tmp_path / "d.jsonl", "chat", n=8)
    with pytest.raises(FarmError) as err:
        service.submit_job(spec(tiny_model_dir, data), settings=settings_for(tmp_path, catalog_url, DOWN))
    assert "FARM_BROKER_URL" in err.value.message and "Nothing was submitted" in err.value.message
    assert row_counts(catalog_url) == NOTHING
    # the same spec once the broker answers is a new job, not a duplicate of the one taken back
    job = service.submit_job(spec(tiny_model_dir, data), settings=settings_for(tmp_path, catalog_url, redis_url))
    assert job.state == "queued" and not job.deduplicated


def test_farm_submit_says_one_line_and_leaves_nothing(tmp_path, tiny_model_dir):
    sqlite_url = f"sqlite:///{tmp_path}/catalog.db"
    upgrade_database(sqlite_url)  # as `farm up` leaves it
    data = write_dataset(tmp_path / "d.jsonl", "chat", n=8)
    path = tmp_path / "job.json"
    path.write_text(json.dumps(spec(tiny_model_dir, data)))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "FARM_HOME": str(tmp_path / "home"),
           "FARM_DATABASE_URL": sqlite_url, "FARM_BROKER_URL": DOWN, "FARM_STORE_URL": f"file://{tmp_path}/store"}
    farm = [str(Path(sys.executable).parent / "farm")]
    for attempt in range(2):  # the second must not be called a duplicate of a ghost
        out = subprocess.run(farm + ["submit", str(path)], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.startswith("error") and "FARM_BROKER_URL" in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert row_counts(sqlite_url) == NOTHING
    assert json.loads(subprocess.run(farm + ["jobs", "--json"], env=env, capture_output=True, text=True,
                                     check=True).stdout) == []


def test_the_api_answers_503_and_leaves_nothing(sqlite_url, tmp_path):
    settings = settings_for(tmp_path, sqlite_url, DOWN)
    with TestClient(create_app(settings, poll_seconds=0.02)) as client:
        client.headers.update({"Authorization": f"Bearer {TOKENS['alice']}"})
        data = write_dataset(tmp_path / "train.jsonl", "chat", n=8)
        ref = client.post("/v1/datasets", params={"format": "chat", "filename": data.name},
                          content=data.read_bytes()).json()["uri"]
        response = client.post("/v1/jobs", json={"kind": "train", "name": "unrung", "base_model": "org/tiny-llama",
                                                 "dataset": {"path": ref, "format": "chat"},
                                                 "training": {"max_steps": 2}})
        assert response.status_code == 503, response.text
        body = response.json()
        assert "broker" in body["message"] and "Nothing was submitted" in body["message"], body
        assert client.get("/v1/jobs").json() == []
    assert row_counts(sqlite_url) == NOTHING
