"""Issue 15 end to end: the publish step builds the routing profile (fast, on the real catalog and store), and
(-m slow) a real Celery worker trains and publishes a tiny QLoRA adapter whose spec has a description and tags;
its profile is there when the job has succeeded, the router picks it, and `generate --route` uses it."""

from __future__ import annotations

import json

import pytest
import yaml
from sqlalchemy import select

from farm import service
from farm.catalog.models import AdapterProfile
from farm.catalog.session import session_scope
from farm.generate import generate_routed
from farm.profiles import route


def test_the_publish_step_stores_the_profile_before_the_version_is_ready(tmp_path, monkeypatch):
    """workers.publish.publish_adapter on a real catalog and store (no training): the profile, built from the
    worker's local copy of the data, exists when the one publishing transaction runs."""
    from farm.catalog import repository as repo
    from farm.kinds import get_kind
    from tests.adapters_use_helpers import farm_settings
    from workers.publish import RunnerOutput, publish_adapter

    settings = farm_settings(tmp_path)
    from farm.specs import parse_spec, spec_to_dict

    spec = spec_to_dict(parse_spec({"kind": "train", "name": "sql-bot", "base_model": "/models/base",
                                    "description": "Writes SQL queries", "tags": ["sql"],
                                    "dataset": {"path": "store:datasets/unused.jsonl", "format": "completion"}}))
    data = tmp_path / "local.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"select the {w} column", "completion": "..."}) + "\n"
                            for w in ("price", "name")))
    with session_scope(settings.database_url) as session:
        job_id = repo.create_job(session, kind="train", name="sql-bot", queue="farm.cpu", spec=spec,
                                 spec_hash="2" * 64, max_attempts=1).id
    with session_scope(settings.database_url) as session:
        claim = repo.claim_job(session, job_id, "w", 60)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "adapter_model.safetensors").write_bytes(b"weights")
    seen = []
    real = repo.publish_adapter

    def publish_checking(session, claim, **kwargs):
        seen.append(session.scalar(select(AdapterProfile)))
        return real(session, claim, **kwargs)

    monkeypatch.setattr(repo, "publish_adapter", publish_checking)
    out = RunnerOutput(kind=get_kind("train"), spec=spec, job_info={"id": job_id, "spec_hash": "2" * 64, "attempt": 1},
                       job_doc={"dataset": str(data)}, done={"metrics": {}, "provenance": {}},
                       output_dir=tmp_path / "out")
    assert publish_adapter(settings, claim, out) == "sql-bot:1"
    assert seen[0] is not None and seen[0].prompts == ["select the price column", "select the name column"]
    assert seen[0].tags == ["sql"] and seen[0].description == "Writes SQL queries"
    assert route("select a column", settings=settings).choice == "sql-bot:1"


@pytest.mark.slow
def test_a_published_adapter_has_its_profile_and_is_routed_to(farm_stack, tiny_model_dir, tmp_path):
    from farm.tiny import write_dataset

    settings = farm_stack.settings
    data = write_dataset(tmp_path / "chat.jsonl", "chat", n=24, seed=3)
    spec = {
        "kind": "train", "name": "animal-facts", "base_model": str(tiny_model_dir),
        "description": "Answers what color an animal is and what it likes to eat.", "tags": ["animals", "colors"],
        "dataset": {"path": str(data), "format": "chat"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "quantization": {"bits": 4, "type": "nf4", "compute_dtype": "float32"},
        "training": {"max_steps": 2, "lr": 5e-3, "micro_batch_size": 4, "max_seq_len": 64, "seed": 7},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    farm_stack.start_worker()
    job = service.submit_job(tmp_path / "job.yaml", settings=settings)
    final = service.wait_for_job(job.id, timeout=600, settings=settings)
    assert final.state == "succeeded", (final.error, farm_stack.worker_logs())

    with session_scope(settings.database_url) as session:  # built by the worker's publish step, before any route
        profile = session.scalar(select(AdapterProfile))
        assert profile is not None and profile.tags == ["animals", "colors"]
        assert profile.description.startswith("Answers what color") and profile.prompts
        assert any("What color is the" in p for p in profile.prompts)

    answer = route("which color is the fox?", settings=settings)
    assert answer.choice == "animal-facts:1" and "color" in answer.candidates[0].matched
    result = generate_routed("What color is the fox?", max_new_tokens=4, settings=settings)
    assert result.adapter == "animal-facts:1" and result.chat_template and result.route["choice"] == "animal-facts:1"
