"""The farm end to end with real parts: a Celery worker in its own process on the real Redis, a real QLoRA job on
a tiny model, the adapter pulled with checksums verified and loaded with stock PEFT."""

from __future__ import annotations

import json

import pytest
import yaml

from farm import service
from farm.catalog import repository as repo
from farm.catalog.session import session_scope
from farm.queue import ring_doorbell


def write_spec(path, model_dir, data_path, **training):
    spec = {
        "kind": "train", "name": "e2e-bot", "base_model": str(model_dir),
        "dataset": {"path": str(data_path), "format": "chat"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "quantization": {"bits": 4, "type": "nf4", "compute_dtype": "float32"},
        "training": {"max_steps": 8, "lr": 5e-3, "micro_batch_size": 4, "max_seq_len": 96, "seed": 7, **training},
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def test_qlora_job_runs_once_publishes_and_loads_with_peft(farm_stack, tiny_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from farm.tiny import write_dataset

    settings = farm_stack.settings
    data = write_dataset(tmp_path / "chat.jsonl", "chat", n=48, seed=1)
    spec_path = write_spec(tmp_path / "job.yaml", tiny_model_dir, data)
    farm_stack.start_worker()

    job = service.submit_job(spec_path, settings=settings)
    assert job.state == "queued" and job.spec["dataset"]["path"].startswith("store:datasets/")
    ring_doorbell(job.id, job.queue, settings=settings)  # the same job delivered twice

    final = service.wait_for_job(job.id, timeout=600, settings=settings)
    assert final.state == "succeeded", (final.error, farm_stack.worker_logs())
    assert final.attempt == 1 and final.adapter == "e2e-bot:1"

    # the duplicate delivery is consumed after the job ends: it must not run or publish anything
    service.wait_for_job(job.id, timeout=5, settings=settings)
    events = service.job_events(job.id, settings=settings)
    assert [e.state for e in events if e.type == "state"] == ["queued", "running", "succeeded"]
    assert sum(e.type == "progress" for e in events) == 8
    assert [a.version for a in service.list_adapters("e2e-bot", settings=settings)] == [1]

    adapter = service.get_adapter("e2e-bot", settings=settings)
    names = {f.path for f in adapter.files}
    assert {"adapter_config.json", "adapter_model.safetensors", "metadata.json", "training_config.yaml",
            "training_metrics.json", "checksums.json", "README.md"} <= names
    assert adapter.dataset_sha256 and adapter.base_model_sha256
    assert adapter.provenance["environment"]["torch"] == torch.__version__

    dest = tmp_path / "pulled"
    service.pull_adapter("e2e-bot:1", dest, settings=settings)
    meta = json.loads((dest / "metadata.json").read_text())
    assert meta["job"]["id"] == job.id and meta["dataset"]["examples"] == 48

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 5, 9, 23, 42, 7]])
    with torch.no_grad():
        before = base(ids).logits
        model = PeftModel.from_pretrained(base, dest)
        after = model(ids).logits
    assert not torch.allclose(before, after, atol=1e-4), "the adapter does not change the model's output"


def test_bad_spec_leaves_no_job_no_message_no_object(farm_stack, tiny_model_dir, tmp_path):
    import redis

    from farm.errors import DatasetError

    settings = farm_stack.settings
    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                    '{"messages": [{"role": "user", "content": "no answer"}]}\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: no assistant message"):
        service.submit_job(write_spec(tmp_path / "job.yaml", tiny_model_dir, data), settings=settings)
    with session_scope(settings.database_url) as session:
        assert repo.list_jobs(session) == []
    assert redis.Redis.from_url(settings.broker_url).llen("farm.cpu") == 0
    assert not (farm_stack.root / "store" / "datasets").exists() or not any((farm_stack.root / "store" / "datasets").iterdir())


def test_cancel_running_job_kills_its_runner(farm_stack, tiny_model_dir, tmp_path):
    from farm.tiny import write_dataset

    settings = farm_stack.settings
    data = write_dataset(tmp_path / "chat.jsonl", "chat", n=48, seed=1)
    farm_stack.start_worker()
    job = service.submit_job(write_spec(tmp_path / "job.yaml", tiny_model_dir, data, max_steps=100000),
                             settings=settings)

    def cancel_once_running(view):
        if view.state == "running" and (view.progress or {}).get("step", 0) >= 2:
            service.cancel_job(view.id, settings=settings)

    final = service.wait_for_job(job.id, on_update=cancel_once_running, timeout=600, settings=settings)
    assert final.state == "cancelled", farm_stack.worker_logs()
    assert service.list_adapters("e2e-bot", settings=settings) == []
    import psutil

    runners = [p for p in psutil.process_iter(["cmdline"]) if "workers.runner" in " ".join(p.info["cmdline"] or [])
               and str(farm_stack.root) in " ".join(p.info["cmdline"] or [])]
    assert runners == []


def test_production_shape_postgres_catalog_and_s3_store(tmp_path, tiny_model_dir, pg_fresh_url, s3_store_url):
    """The same job with the production parts: PostgreSQL catalog and an S3 store over HTTP, worker in its own
    process reading both from its environment."""
    from farm.tiny import write_dataset
    from tests.fixtures.farm import make_stack

    s3_env = {k: v for k, v in s3_store_url.env.items()}
    stack = make_stack(tmp_path / "farm", database_url=pg_fresh_url, store_settings=s3_env)
    try:
        settings = stack.settings
        assert settings.store_url.startswith("s3://") and settings.database_url.startswith("postgresql")
        data = write_dataset(tmp_path / "chat.jsonl", "chat", n=24, seed=2)
        stack.start_worker()
        job = service.submit_job(write_spec(tmp_path / "job.yaml", tiny_model_dir, data, max_steps=4),
                                 settings=settings)
        final = service.wait_for_job(job.id, timeout=600, settings=settings)
        assert final.state == "succeeded", (final.error, stack.worker_logs())
        adapter = service.get_adapter(final.adapter, settings=settings, with_urls=True)
        assert adapter.uri.startswith("s3://") and all(f.etag for f in adapter.files)
        import hashlib

        import httpx

        for f in adapter.files:
            body = httpx.get(f.url, timeout=30).content
            assert hashlib.sha256(body).hexdigest() == f.sha256, f.path
        service.pull_adapter(final.adapter, tmp_path / "pulled", settings=settings)
        assert (tmp_path / "pulled" / "adapter_model.safetensors").exists()
    finally:
        stack.stop()
