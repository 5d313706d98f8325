"""File digests cached by identity: an unchanged file is read once; any change to it is hashed again."""

from __future__ import annotations

import hashlib
import os

import pytest

from farm import hashcache, model_files


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FARM_HASH_CACHE", str(tmp_path / "cache" / "digests.sqlite3"))
    calls = []

    def compute(path):
        calls.append(path)
        return hashlib.sha256(path.read_bytes()).hexdigest()

    return calls, compute


def test_unchanged_file_is_read_once_and_any_change_is_seen(tmp_path, cache):
    calls, compute = cache
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"a" * 1000)
    first = hashcache.cached_digest(f, compute)
    assert hashcache.cached_digest(f, compute) == first == hashlib.sha256(b"a" * 1000).hexdigest()
    assert len(calls) == 1

    # Same size, mtime put back: the ctime still moved, so the new bytes are hashed.
    st = f.stat()
    f.write_bytes(b"b" * 1000)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert hashcache.cached_digest(f, compute) == hashlib.sha256(b"b" * 1000).hexdigest()
    assert len(calls) == 2

    # Replaced by another file (new inode) under the same name.
    other = tmp_path / "other"
    other.write_bytes(b"c" * 1000)
    other.replace(f)
    assert hashcache.cached_digest(f, compute) == hashlib.sha256(b"c" * 1000).hexdigest()
    assert len(calls) == 3


def test_off_means_always_hashed(tmp_path, cache, monkeypatch):
    calls, compute = cache
    monkeypatch.setenv("FARM_HASH_CACHE", "off")
    f = tmp_path / "x"
    f.write_bytes(b"x")
    hashcache.cached_digest(f, compute)
    hashcache.cached_digest(f, compute)
    assert len(calls) == 2 and hashcache.cache_path() is None


def test_model_weight_digests_come_from_the_cache(tmp_path, cache, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    reads = []
    real = model_files.sha256_file
    monkeypatch.setattr(model_files, "sha256_file", lambda p: reads.append(p) or real(p))
    first = model_files.sha256_weights(model)
    assert model_files.sha256_weights(model) == first
    assert len(reads) == 1
