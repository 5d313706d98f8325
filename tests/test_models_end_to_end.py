"""Real models in, standard artifacts out (issue 13), through a real Celery worker: a Hub id from a Hub cache
folder (offline, the real snapshot_download path), checkpoints listed and pulled, a merge job whose output loads
with AutoModelForCausalLM and can be a later job's base (farm:NAME:V), two jobs on one S3 base fetching it once,
and the bad inputs refused with nothing left behind."""

from __future__ import annotations

import json

import pytest
import yaml

from farm import service
from farm.catalog import repository as repo
from farm.catalog.session import session_scope
from farm.errors import ModelError
from tests.fixtures.hub import add_to_hub_cache

COMMIT = "c0ffee0123456789abcdef0123456789abcdef01"
ARTIFACT_FILES = {"adapter_config.json", "adapter_model.safetensors", "metadata.json", "training_config.yaml",
                  "training_metrics.json", "checksums.json", "README.md", "loss.png"}


def train_spec(path, base_model, data, name="hub-bot", **training):
    spec = {"kind": "train", "name": name, "base_model": base_model, "license": "apache-2.0",
            "dataset": {"path": str(data), "format": "chat", "eval_fraction": 0.2},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "quantization": {"bits": 16, "compute_dtype": "float32"},
            "training": {"max_steps": 6, "lr": 5e-3, "micro_batch_size": 4, "max_seq_len": 64, "seed": 7,
                         "eval_every": 2, **training}}
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def hub_home(tmp_path, tiny_model_dir, monkeypatch):
    home = tmp_path / "hf"
    add_to_hub_cache(home / "hub", "org/tiny", tiny_model_dir, COMMIT)
    monkeypatch.setenv("HF_HOME", str(home))  # the submit-time check reads this machine's cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def test_hub_base_checkpoints_merge_and_farm_base(farm_stack, hub_home, tiny_model_dir, tmp_path):
    import torch
    from huggingface_hub import ModelCard
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from farm.checkpoints import list_checkpoints, pull_checkpoint
    from farm.merge.service import submit_merge
    from farm.model_fetch import fetch_base_model
    from farm.tiny import write_dataset

    settings = farm_stack.settings
    farm_stack.start_worker(extra_env={"HF_HOME": str(hub_home), "HF_HUB_OFFLINE": "1"})
    data = write_dataset(tmp_path / "chat.jsonl", "chat", n=40, seed=1)

    # a Hub id that is not cached anywhere: a note at submit, a clear permanent failure on the worker
    missing = service.submit_job(train_spec(tmp_path / "missing.yaml", "org/absent", data, name="absent"),
                                 settings=settings)
    assert "org/absent@main is not in this machine's Hub cache" in missing.notes[0]

    job = service.submit_job(train_spec(tmp_path / "job.yaml", "org/tiny", data, checkpoint_every=2,
                                        keep_checkpoints=2, keep_checkpoints_after_publish=True), settings=settings)
    assert job.notes == []  # checked in the cache: config and target modules
    failed = service.wait_for_job(missing.id, timeout=300, settings=settings)
    assert failed.state == "failed" and failed.error.code == "invalid_model", failed.error
    assert "org/absent at revision 'main' is not in the Hub cache" in failed.error.message
    assert service.list_adapters("absent", settings=settings) == []

    final = service.wait_for_job(job.id, timeout=600, settings=settings)
    assert final.state == "succeeded", (final.error, farm_stack.worker_logs())
    adapter = service.get_adapter(final.adapter, settings=settings)
    base = adapter.provenance["base_model"]
    assert base["ref"] == "org/tiny" and base["revision"] == COMMIT and base["source"] == "hub"
    names = {f.path for f in adapter.files}
    assert ARTIFACT_FILES <= names and any(n.startswith("tensorboard/events.out.tfevents") for n in names)
    assert adapter.metrics["epochs"] == round(6 / adapter.metrics["steps_per_epoch"], 3)

    dest = tmp_path / "pulled"
    service.pull_adapter(final.adapter, dest, settings=settings)
    assert json.loads((dest / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny"
    card = ModelCard.load(dest / "README.md")
    assert card.data.base_model == "org/tiny" and card.data.library_name == "peft" and "lora" in card.data.tags

    # checkpoints: the newest 2 of 3 kept, with losses; one pulled as a standard adapter
    kept = list_checkpoints(job.id, settings=settings)
    assert [c.step for c in kept] == [4, 6] and all(c.loss and c.eval_loss for c in kept)
    ckpt = tmp_path / "step-4"
    pull_checkpoint(f"{job.id}@step-4", ckpt, settings=settings)
    assert json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny"
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    PeftModel.from_pretrained(plain, ckpt)

    # merge: a standard transformers model in the catalog, equal to base + adapter within bf16 tolerance
    merge_job = submit_merge(final.adapter, settings=settings)
    merged = service.wait_for_job(merge_job.id, timeout=600, settings=settings)
    assert merged.state == "succeeded" and merged.adapter == "hub-bot-merged:1", (merged.error,
                                                                                 farm_stack.worker_logs())
    entry = service.get_adapter("hub-bot-merged:1", settings=settings)
    assert entry.kind == "merge" and entry.provenance["lineage"]["adapter"] == final.adapter
    assert entry.provenance["base_model"]["revision"] == COMMIT
    got = fetch_base_model("farm:hub-bot-merged:1", settings)  # what a later job's worker does
    ids = torch.tensor([[1, 5, 9, 23, 42, 7]])
    with torch.no_grad():
        bf16 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
        expected = PeftModel.from_pretrained(bf16, dest)(ids).logits.float()
        out = AutoModelForCausalLM.from_pretrained(got.path)(ids).logits.float()
    assert (out - expected).abs().max() <= 0.05 * expected.abs().max()
    assert ModelCard.load(got.path / "README.md").data.base_model == "org/tiny"
    later = service.validate_spec(service.parse_spec(yaml.safe_load(
        train_spec(tmp_path / "later.yaml", "farm:hub-bot-merged:1", data).read_text())), settings)
    assert later.base_model == "farm:hub-bot-merged:1"


def test_two_jobs_on_one_s3_base_download_it_once(tmp_path, tiny_model_dir, s3_store_url):
    from farm.store.s3 import make_client
    from farm.tiny import write_dataset
    from tests.fixtures.farm import make_stack

    client = make_client(s3_store_url.endpoint_url, "us-east-1")
    for f in tiny_model_dir.iterdir():
        client.upload_file(str(f), s3_store_url.bucket, f"base/tiny/{f.name}")
    client.upload_file(str(tiny_model_dir / "model.safetensors"), s3_store_url.bucket, "base/no-config/m.safetensors")
    uri = f"s3://{s3_store_url.bucket}/base/tiny"
    stack = make_stack(tmp_path / "farm", store_settings=dict(s3_store_url.env))
    try:
        settings = stack.settings
        data = write_dataset(tmp_path / "chat.jsonl", "chat", n=24, seed=2)
        with pytest.raises(ModelError, match="no-config holds no config.json"):
            service.submit_job(train_spec(tmp_path / "bad.yaml", f"s3://{s3_store_url.bucket}/base/no-config", data),
                               settings=settings)
        with session_scope(settings.database_url) as session:
            assert repo.list_jobs(session) == []
        stack.start_worker()
        jobs = [service.submit_job(train_spec(tmp_path / f"j{i}.yaml", uri, data, name=f"s3-bot-{i}", max_steps=1,
                                              eval_every=None), settings=settings, force=True)  # not deduplicated
                for i in range(2)]
        fetched = []
        for job in jobs:
            final = service.wait_for_job(job.id, timeout=600, settings=settings)
            assert final.state == "succeeded", (final.error, stack.worker_logs())
            prov = service.get_adapter(final.adapter, settings=settings).provenance
            fetched.append(prov["base_model"]["fetch"])
        assert [f["downloaded"] for f in fetched] == [True, False]
        assert fetched[0]["cache_key"] == fetched[1]["cache_key"]
        entries = [p for p in (tmp_path / "farm" / "cache" / "models").iterdir() if p.is_dir()]
        assert len(entries) == 1
    finally:
        stack.stop()


def test_merge_of_an_adapter_whose_base_is_gone_is_refused(farm_stack, tiny_model_dir, tmp_path):
    import shutil

    from farm.catalog.repository import Claim
    from farm.merge.service import submit_merge

    settings = farm_stack.settings
    gone = tmp_path / "base-copy"
    shutil.copytree(tiny_model_dir, gone)
    with session_scope(settings.database_url) as session:
        job = repo.create_job(session, kind="train", name="orphan", queue="farm.cpu", spec={}, spec_hash="0" * 64,
                              max_attempts=1)
        claim = repo.claim_job(session, job.id, "w", 60)
    with session_scope(settings.database_url) as session:
        repo.reserve_adapter_version(session, claim, name="orphan", kind="train", spec_hash="0" * 64)
        repo.publish_adapter(session, Claim(claim.job_id, claim.attempt, claim.worker), files=[], provenance={},
                             metrics={}, base_model=str(gone))
    shutil.rmtree(gone)
    with pytest.raises(ModelError, match=r"the base model of orphan:1, .*base-copy, is gone"):
        submit_merge("orphan", settings=settings)
    with session_scope(settings.database_url) as session:
        assert [j.kind for j in repo.list_jobs(session)] == ["train"]
