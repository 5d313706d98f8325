"""Issue 15 end to end: a real Celery worker trains and publishes a tiny QLoRA adapter whose spec has a description
and tags; its routing profile is built at publish from the worker's copy of the data, the router picks it, and
`generate --route` uses it with stock PEFT."""

from __future__ import annotations

import yaml
from sqlalchemy import select

from farm import service
from farm.catalog.models import AdapterProfile
from farm.catalog.session import session_scope
from farm.generate import generate_routed
from farm.profiles import route


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
