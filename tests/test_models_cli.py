"""`farm checkpoints`, `farm merge` and `farm pull JOB@step-K` as a user runs them (issue 13)."""

from __future__ import annotations

import json

from farm.catalog import repository as repo
from farm.catalog.session import session_scope
from farm.names import checkpoint_prefix
from tests.test_cli_end_to_end import farm


def test_checkpoints_merge_and_pull_commands(farm_stack, tmp_path):
    settings = farm_stack.settings
    with session_scope(settings.database_url) as session:
        job_id = repo.create_job(session, kind="train", name="bot", queue="farm.cpu", spec={}, spec_hash="0" * 64,
                                 max_attempts=3).id
    with session_scope(settings.database_url) as session:
        claim = repo.claim_job(session, job_id, "w", 60)
        repo.record_checkpoint(session, claim, 40, checkpoint_prefix(job_id, 40),
                               [{"path": "adapter/adapter_model.safetensors", "size": 2048, "sha256": "a" * 64}],
                               metrics={"loss": 1.25, "eval_loss": 1.5})
    env = farm_stack.env

    listed = json.loads(farm(["checkpoints", job_id[:8], "--json"], env).stdout)
    assert [(c["step"], c["loss"], c["eval_loss"], c["size"]) for c in listed] == [(40, 1.25, 1.5, 2048)]
    table = farm(["checkpoints", job_id], env).stdout
    assert f"{job_id}@step-40" in table and "1.2500" in table and "2.0 KiB" in table

    missing = farm(["merge", "nothing", "--json"], env, check=False)
    assert missing.returncode == 1 and "no adapter 'nothing'" in missing.stderr and "Traceback" not in missing.stderr
    bad = farm(["pull", f"{job_id}@step-x", str(tmp_path / "dest")], env, check=False)
    assert bad.returncode == 2 and "write JOB@step-K" in bad.stderr
    absent = farm(["pull", f"{job_id}@step-10", str(tmp_path / "dest")], env, check=False)
    assert absent.returncode == 1 and "has no checkpoint at step 10" in absent.stderr
    assert not (tmp_path / "dest").exists()


def test_farm_spec_merge_lists_the_merge_fields_from_the_kind_registry():
    """`farm spec merge` prints the merge spec's fields with defaults and meanings; an unknown kind names them all."""
    import os

    env = {**os.environ, "FARM_API_URL": ""}
    out = farm(["spec", "merge"], env).stdout
    for field in ("adapter", "base_model_sha256", "dtype = 'bfloat16'", "max_shard_size = '5GB'", "license"):
        assert field in out, out
    assert "never 4-bit" in out and "kind: merge" in out
    bad = farm(["spec", "nonsense"], env, check=False)
    assert bad.returncode == 2 and "train, extract, merge" in bad.stderr
    assert "merge" in farm(["spec", "--help"], env).stdout
