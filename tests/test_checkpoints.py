"""A job's checkpoints (issue 13): listed with their losses and sizes, pulled as a standard PEFT adapter verified
against the catalog, pruned to the newest N, deleted after publishing."""

from __future__ import annotations

import shutil

import pytest

from farm.catalog import repository as repo
from farm.catalog.session import session_scope
from farm.checkpoints import list_checkpoints, parse_checkpoint_ref, prune_checkpoints, pull_checkpoint
from farm.errors import ChecksumMismatch, NotFound, SpecError
from farm.names import checkpoint_prefix
from farm.settings import FarmSettings
from farm.store import open_store
from farm.store.transfer import upload_tree

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture
def job_with_checkpoints(tmp_path, sqlite_url, tiny_model_dir):
    """A running job with checkpoints at steps 10, 20, 30, each holding a real PEFT adapter folder."""
    from tests.test_merge import make_adapter

    settings = FarmSettings(database_url=sqlite_url, store_url=f"file://{tmp_path / 'store'}")
    store = open_store(settings.store_url, settings)
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    with session_scope(sqlite_url) as session:
        job = repo.create_job(session, kind="train", name="bot", queue="farm.cpu", spec={}, spec_hash="x" * 64,
                              max_attempts=3)
        job_id = job.id
    with session_scope(sqlite_url) as session:
        claim = repo.claim_job(session, job_id, "w1", 60)
    for step, loss in ((10, 2.5), (20, 2.1), (30, 1.9)):
        folder = tmp_path / f"step-{step}"
        shutil.copytree(adapter, folder / "adapter")
        (folder / "trainer_state.json").write_text('{"format_version": 1}')
        files = upload_tree(store, folder, checkpoint_prefix(job_id, step))
        with session_scope(sqlite_url) as session:
            repo.record_checkpoint(session, claim, step, checkpoint_prefix(job_id, step), files,
                                   metrics={"loss": loss, "eval_loss": 2.3 if step == 20 else None})
    return job_id, settings, store


def test_list_pull_and_prune(job_with_checkpoints, tmp_path, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    job_id, settings, store = job_with_checkpoints
    listed = list_checkpoints(job_id[:8], settings=settings)
    assert [(c.step, c.loss, c.eval_loss) for c in listed] == [(10, 2.5, None), (20, 2.1, 2.3), (30, 1.9, None)]
    assert all(c.size > 1000 for c in listed) and listed[1].ref == f"{job_id}@step-20"

    dest = tmp_path / "pulled"
    result = pull_checkpoint(f"{job_id[:8]}@step-20", dest, settings=settings)
    assert sorted(p.name for p in dest.iterdir()) == ["README.md", "adapter_config.json",
                                                      "adapter_model.safetensors"]
    assert result.version == 20 and {f.path for f in result.files} == {p.name for p in dest.iterdir()}
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        PeftModel.from_pretrained(base, dest)(torch.tensor([[1, 2, 3]]))

    assert prune_checkpoints(job_id, 2, settings=settings) == [10]
    assert [c.step for c in list_checkpoints(job_id, settings=settings)] == [20, 30]
    assert not store.list_keys(f"jobs/{job_id}/checkpoints/step-10/")
    assert prune_checkpoints(job_id, 0, settings=settings) == [20, 30]
    assert list_checkpoints(job_id, settings=settings) == [] and not store.list_keys(f"jobs/{job_id}/")


def test_bad_checkpoint_references_and_a_corrupt_object(job_with_checkpoints, tmp_path):
    job_id, settings, store = job_with_checkpoints
    with pytest.raises(SpecError, match="write JOB@step-K"):
        parse_checkpoint_ref("bot:3")
    with pytest.raises(NotFound, match=r"has no checkpoint at step 40 .*it has: step-10, step-20, step-30"):
        pull_checkpoint(f"{job_id}@step-40", tmp_path / "x", settings=settings)
    store.put_bytes(b"not the adapter", checkpoint_prefix(job_id, 30) + "adapter/adapter_model.safetensors")
    with pytest.raises(ChecksumMismatch):
        pull_checkpoint(f"{job_id}@step-30", tmp_path / "bad", settings=settings)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "x").exists()


def test_checkpoints_are_listed_and_pulled_through_the_api(job_with_checkpoints, tmp_path):
    """`farm checkpoints` and `farm pull JOB@step-K DEST` with FARM_API_URL set, from a client with an empty farm of
    its own: the same verified PEFT folder as a local pull; a corrupt object in the store leaves nothing at DEST."""
    import json

    from tests.adapters_use_helpers import cli, farm_settings
    from tests.fixtures.api import TOKENS
    from tests.test_client_http import start_api_server, stop_api_server

    job_id, settings, store = job_with_checkpoints
    server = start_api_server(tmp_path / "server", extra_env={"FARM_DATABASE_URL": settings.database_url,
                                                              "FARM_STORE_URL": settings.store_url})
    try:
        client = farm_settings(tmp_path / "client")
        env = {"FARM_API_URL": server.url, "FARM_API_TOKEN": TOKENS["alice"]}
        listed = cli(client, "checkpoints", job_id[:8], "--json", env=env)
        assert [c["step"] for c in json.loads(listed.stdout)] == [10, 20, 30]
        out = cli(client, "pull", f"{job_id[:8]}@step-20", str(tmp_path / "remote"), env=env)
        assert out.exit_code == 0, out.output
        local = pull_checkpoint(f"{job_id}@step-20", tmp_path / "local", settings=settings)
        assert {f.path: f.sha256 for f in local.files} == \
            {p.name: __import__("hashlib").sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "remote").iterdir()}
        with pytest.raises(NotFound, match="no checkpoint at step 40"):
            cli(client, "pull", f"{job_id}@step-40", str(tmp_path / "x"), env=env)
        store.put_bytes(b"not the adapter", checkpoint_prefix(job_id, 30) + "adapter/adapter_model.safetensors")
        with pytest.raises(ChecksumMismatch):
            cli(client, "pull", f"{job_id}@step-30", str(tmp_path / "bad"), env=env)
        assert not (tmp_path / "bad").exists() and not (tmp_path / "x").exists()
    finally:
        stop_api_server(server.proc)
