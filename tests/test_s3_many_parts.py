"""Downloads of objects with more parts than s3transfer's in-memory window (issue 11, finding 3).

With boto3 1.44 / s3transfer 0.19, `download_fileobj` into a non-seekable writer deadlocks once an object has more
parts than `max_in_memory_download_chunks` (10). Real adapters (> 80 MB at 8 MiB parts) hit it. The same shape is
reproduced here with 64 KiB parts, on moto's server over HTTP, so the test stays fast.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from farm.store.s3 import S3Store
from farm.store.transfer import download_tree, upload_tree

KiB = 1024
PART = 64 * KiB


def _small_parts_store(loc) -> S3Store:
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=8, use_threads=True,
                            preferred_transfer_client="classic")
    return S3Store(loc.bucket, loc.prefix, endpoint_url=loc.endpoint_url, region="us-east-1", transfer_config=config)


def _in_thread(fn, timeout: float):
    """Run fn in a daemon thread; fail (instead of hanging the suite) when it does not return in time."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the test thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"the download did not finish within {timeout} s (deadlocked?)")
    if "error" in box:
        raise box["error"]
    return box["value"]


def test_get_file_of_many_parts_arrives_hashed(s3_store_url, tmp_path):
    store = _small_parts_store(s3_store_url)
    data = os.urandom(PART * 13 + 17)  # 14 parts: more than the window of 10
    store.client.put_object(Bucket=store.bucket, Key=store.prefix + "big/file.bin", Body=data)

    info = _in_thread(lambda: store.get_file("big/file.bin", tmp_path / "out.bin"), timeout=30)

    assert info.size == len(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "out.bin").read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]  # no temp file left


def test_download_tree_of_a_many_part_artifact_is_verified(s3_store_url, tmp_path):
    store = _small_parts_store(s3_store_url)
    src = tmp_path / "src"
    src.mkdir()
    (src / "adapter_model.safetensors").write_bytes(os.urandom(PART * 12 + 1))  # 13 parts
    (src / "adapter_config.json").write_text("{}")
    records = upload_tree(store, src, "adapters/big/v1")
    expected = {r["path"]: r["sha256"] for r in records}

    out = _in_thread(lambda: download_tree(store, "adapters/big/v1", tmp_path / "dest", expected=expected), 30)

    assert {r["path"] for r in out} == set(expected)
    assert (tmp_path / "dest" / "adapter_model.safetensors").read_bytes() == \
        (src / "adapter_model.safetensors").read_bytes()


def test_a_damaged_many_part_object_is_refused(s3_store_url, tmp_path):
    from farm.errors import ChecksumMismatch

    store = _small_parts_store(s3_store_url)
    src = tmp_path / "src"
    src.mkdir()
    payload = os.urandom(PART * 12 + 3)
    (src / "weights.bin").write_bytes(payload)
    records = upload_tree(store, src, "adapters/dmg/v1")
    damaged = bytearray(payload)
    damaged[PART * 11 + 5] ^= 0xFF  # one byte in the 12th part
    store.client.put_object(Bucket=store.bucket, Key=store.prefix + "adapters/dmg/v1/weights.bin", Body=bytes(damaged))

    with pytest.raises(ChecksumMismatch):
        _in_thread(lambda: download_tree(store, "adapters/dmg/v1", tmp_path / "dest",
                                         expected={r["path"]: r["sha256"] for r in records}), 30)
    assert not (tmp_path / "dest").exists()
    assert not any(Path(tmp_path).glob(".farm-tmp*"))
