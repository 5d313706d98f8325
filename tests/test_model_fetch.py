"""Base models from the Hub cache, S3 prefixes and the catalog onto a worker's disk (issue 13), with the real
huggingface_hub.snapshot_download offline and moto's S3 server over HTTP."""

from __future__ import annotations

import json

import pytest

from farm.errors import ModelError
from farm.model_fetch import fetch_base_model, fetch_hub_model, fetch_s3_model, release_pins
from farm.settings import FarmSettings
from tests.fixtures.hub import add_to_hub_cache

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture
def hub_cache(tmp_path, tiny_model_dir, monkeypatch):
    """HF_HOME with org/tiny cached at COMMIT (main) and OLD_COMMIT (no branch), offline."""
    home = tmp_path / "hf"
    add_to_hub_cache(home / "hub", "org/tiny", tiny_model_dir, OLD_COMMIT, branch=None)
    add_to_hub_cache(home / "hub", "org/tiny", tiny_model_dir, COMMIT, branch="main")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home / "hub"


def test_hub_id_resolves_through_snapshot_download_to_the_commit(hub_cache):
    got = fetch_hub_model("org/tiny")
    assert got.revision == COMMIT and got.source == "hub"
    assert got.path == hub_cache / "models--org--tiny" / "snapshots" / COMMIT
    assert (got.path / "config.json").is_file() and list(got.path.glob("*.safetensors"))
    pinned = fetch_base_model("org/tiny", FarmSettings(), revision=OLD_COMMIT)
    assert pinned.revision == OLD_COMMIT and pinned.path.name == OLD_COMMIT


def test_missing_revision_and_unknown_repo_are_clear_errors(hub_cache):
    with pytest.raises(ModelError, match=r"org/tiny at revision 'v9' is not in the Hub cache .* HF_HUB_OFFLINE") as e:
        fetch_hub_model("org/tiny", "v9")
    assert e.value.field == "base_revision"
    with pytest.raises(ModelError, match=r"org/nothing at revision 'main' is not in the Hub cache"):
        fetch_hub_model("org/nothing")
    with pytest.raises(ModelError, match="neither a folder on this machine nor a valid Hub id"):
        fetch_base_model("org/bad name!", FarmSettings())


def test_submit_check_reads_the_cache_without_torch(hub_cache):
    from farm.model_files import check_hub_model

    found = check_hub_model("org/tiny", None, ["q_proj"])
    assert found.where == "cache" and found.revision == COMMIT and found.unchecked == ()
    with pytest.raises(ModelError, match="target_modules 'nope_proj' match no layer"):
        check_hub_model("org/tiny", None, ["nope_proj"])
    missing = check_hub_model("org/other", "v2", "all-linear")
    assert missing.where == "none" and "org/other@v2 is not in this machine's Hub cache" in missing.unchecked[0]



@pytest.fixture(autouse=True)
def _pins_released():
    """Each test starts as a fresh attempt does: this process pins no cache entry (a worker releases them when an
    attempt ends)."""
    yield
    release_pins()

# ---------------------------------------------------------------- S3


def _upload(client, bucket, prefix, model_dir, skip=()):
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and f.name not in skip:
            client.upload_file(str(f), bucket, f"{prefix}/{f.name}")


@pytest.fixture
def s3_model(s3_store_url, tiny_model_dir, tmp_path):
    from farm.store.s3 import make_client

    client = make_client(s3_store_url.endpoint_url, "us-east-1")
    _upload(client, s3_store_url.bucket, "models/tiny", tiny_model_dir)
    settings = s3_store_url.settings.model_copy(update={"cache_dir": tmp_path / "cache"})
    return client, s3_store_url.bucket, settings


def test_s3_model_downloads_once_and_a_replaced_object_is_fetched_again(s3_model, tiny_model_dir):
    client, bucket, settings = s3_model
    uri = f"s3://{bucket}/models/tiny"
    first = fetch_s3_model(uri, settings)
    again = fetch_s3_model(uri, settings)
    assert first.downloaded and not again.downloaded and first.path == again.path
    assert (first.path / "config.json").read_bytes() == (tiny_model_dir / "config.json").read_bytes()
    record = json.loads((first.path.parent / f"{first.revision}.json").read_text())
    assert record["ref"] == uri and len(record["files"]["config.json"]["sha256"]) == 64

    config = json.loads((tiny_model_dir / "config.json").read_text()) | {"note": "replaced"}
    client.put_object(Bucket=bucket, Key="models/tiny/config.json", Body=json.dumps(config).encode())
    replaced = fetch_s3_model(uri, settings)
    assert replaced.downloaded and replaced.revision != first.revision
    assert json.loads((replaced.path / "config.json").read_text())["note"] == "replaced"


def test_s3_cache_is_bounded_least_recently_used_out(s3_model, tiny_model_dir):
    client, bucket, settings = s3_model
    _upload(client, bucket, "models/other", tiny_model_dir, skip=("tokenizer.json",))
    size = sum(f.stat().st_size for f in tiny_model_dir.iterdir() if f.is_file())
    small = settings.model_copy(update={"model_cache_max_gb": 1.5 * size / 1024 ** 3})  # room for one model
    a = fetch_s3_model(f"s3://{bucket}/models/tiny", small)
    release_pins()  # the job that used it ended
    b = fetch_s3_model(f"s3://{bucket}/models/other", small)
    assert b.path.is_dir() and not a.path.exists(), "the least recently used entry leaves"
    assert fetch_s3_model(f"s3://{bucket}/models/tiny", small).downloaded


def test_an_entry_in_use_by_a_job_is_not_evicted_until_released(s3_model, s3_store_url, tiny_model_dir):
    """A worker fetched model A for its running job (pinned until the attempt ends); another process of the host
    fetches B into a cache with room for one: A stays. After the worker releases it, the next fetch evicts it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    client, bucket, settings = s3_model
    _upload(client, bucket, "models/other", tiny_model_dir, skip=("tokenizer.json",))
    _upload(client, bucket, "models/third", tiny_model_dir, skip=("tokenizer.json", "tokenizer_config.json"))
    size = sum(f.stat().st_size for f in tiny_model_dir.iterdir() if f.is_file())
    small = settings.model_copy(update={"model_cache_max_gb": 1.5 * size / 1024 ** 3})  # room for one model
    a = fetch_s3_model(f"s3://{bucket}/models/tiny", small)
    env = {**os.environ, **s3_store_url.env, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "FARM_CACHE_DIR": str(small.cache_dir), "FARM_MODEL_CACHE_MAX_GB": repr(small.model_cache_max_gb)}
    another_process = ("from farm.model_fetch import fetch_s3_model\nfrom farm.settings import get_settings\n"
                       f"print(fetch_s3_model('s3://{bucket}/models/other', get_settings()).path)")
    try:
        out = subprocess.run([sys.executable, "-c", another_process], capture_output=True, text=True, timeout=120,
                             env=env)
        assert out.returncode == 0, out.stderr
        assert Path(out.stdout.strip()).is_dir()
        assert a.path.is_dir(), "a pinned entry must not be evicted by another process"
    finally:
        release_pins()
    c = fetch_s3_model(f"s3://{bucket}/models/third", small)
    assert c.path.is_dir() and not a.path.exists(), "once released, the least recently used entry leaves"
    release_pins()


def test_s3_prefix_without_config_json_is_refused_and_leaves_nothing(s3_model, tiny_model_dir):
    client, bucket, settings = s3_model
    _upload(client, bucket, "models/weights-only", tiny_model_dir, skip=("config.json",))
    with pytest.raises(ModelError, match=r"models/weights-only holds no config.json"):
        fetch_s3_model(f"s3://{bucket}/models/weights-only", settings)
    with pytest.raises(ModelError, match="nothing is stored under"):
        fetch_s3_model(f"s3://{bucket}/models/absent", settings)
    cache = settings.cache_dir / "models"
    assert not [p for p in cache.iterdir() if not p.name.startswith(".")] if cache.exists() else True


def test_farm_reference_to_a_missing_merged_model_is_clear(sqlite_url, tmp_path):
    settings = FarmSettings(database_url=sqlite_url, cache_dir=tmp_path / "cache")
    with pytest.raises(ModelError, match=r"farm:nothing:2: no merged model nothing:2 in the catalog"):
        fetch_base_model("farm:nothing:2", settings)
