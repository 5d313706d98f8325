"""The object store, on a local folder and on S3 over real HTTP (moto): round trips, checksums computed while
bytes stream, trees uploaded with checksums.json last and downloaded verified or not at all, and clear refusals."""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
from pathlib import Path

import httpx
import pytest

from farm.errors import ChecksumMismatch, NotFound, StoreError
from farm.settings import FarmSettings
from farm.store import ObjectInfo, download_prefix, download_tree, open_store, sha256_file, upload_tree
from farm.store.base import HashingReader, HashingWriter
from farm.store.local import TMP_MARK

MiB = 1024 * 1024
PREFIX = "adapters/x/v1"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_s3(store) -> bool:
    return store.uri_root().startswith("s3://")


def leftovers(folder: Path) -> list[str]:
    """Names in `folder` that a download or an atomic write would have left behind."""
    return sorted(p.name for p in folder.iterdir() if TMP_MARK in p.name) if folder.exists() else []


@pytest.fixture
def store(store_url):
    url, settings = store_url
    return open_store(url, settings)


@pytest.fixture
def tree(tmp_path) -> Path:
    """A small adapter-like folder with a nested file."""
    root = tmp_path / "artifact"
    (root / "sub").mkdir(parents=True)
    files = {
        "adapter_config.json": b'{"r": 8}',
        "adapter_model.safetensors": os.urandom(300_000),
        "README.md": b"# x\n",
        "sub/notes.txt": b"nested",
    }
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    return root


@pytest.fixture
def pulled(tmp_path) -> Path:
    """Where downloads go: a destination inside a folder that the test can check for leftovers."""
    return tmp_path / "pulled" / "x-v1"


# -- objects ----------------------------------------------------------------------------------------------------


def test_file_round_trip_keeps_bytes_and_sha256(store, tmp_path):
    data = os.urandom(100_000) + b"end"
    src = tmp_path / "w.bin"
    src.write_bytes(data)
    key = "adapters/a/v1/w.bin"

    info = store.put_file(src, key)

    assert info == ObjectInfo(key=key, size=len(data), sha256=sha(data), etag=info.etag)
    assert (info.etag is not None) == is_s3(store)
    out = tmp_path / "out" / "w.bin"
    got = store.get_file(key, out)
    assert out.read_bytes() == data
    assert got.sha256 == sha(data) == sha256_file(out)
    assert got.size == len(data)
    assert got.etag == info.etag
    assert store.get_bytes(key) == data
    assert store.exists(key) and not store.exists("adapters/a/v1/other.bin")
    assert leftovers(out.parent) == []


def test_bytes_round_trip_listing_and_delete(store):
    for key in ["adapters/a/v1/x.json", "adapters/a/v1/sub/y.json", "adapters/a/v10/x.json", "datasets/d.jsonl"]:
        info = store.put_bytes(key.encode(), key)
        assert info.sha256 == sha(key.encode()) and info.size == len(key)
        assert store.get_bytes(key) == key.encode()

    assert store.list_keys("") == [
        "adapters/a/v1/sub/y.json",
        "adapters/a/v1/x.json",
        "adapters/a/v10/x.json",
        "datasets/d.jsonl",
    ]
    # A plain string prefix, as on S3: end it with '/' to mean one folder.
    assert store.list_keys("adapters/a/v1") == store.list_keys("adapters/")[:3]
    assert store.list_keys("adapters/a/v1/") == ["adapters/a/v1/sub/y.json", "adapters/a/v1/x.json"]
    assert store.list_keys("nothing/") == []

    store.delete_prefix("adapters/a/v1/")
    assert store.list_keys("") == ["adapters/a/v10/x.json", "datasets/d.jsonl"]
    store.delete("datasets/d.jsonl")
    store.delete("datasets/d.jsonl")  # deleting what is gone is not an error
    assert not store.exists("datasets/d.jsonl")
    with pytest.raises(StoreError, match="whole store"):
        store.delete_prefix("")
    assert store.list_keys("") == ["adapters/a/v10/x.json"]


def test_put_file_opens_and_reads_the_source_once(store, tmp_path, monkeypatch):
    """The digest comes from the upload's own read of the file, not from a second pass over it."""
    data = os.urandom(3 * MiB + 11)
    src = tmp_path / "once.bin"
    src.write_bytes(data)
    opens, bytes_read = [], [0]
    real_open = builtins.open

    class CountingFile:
        def __init__(self, f):
            self._f = f

        def read(self, n=-1):
            chunk = self._f.read(n)
            bytes_read[0] += len(chunk)
            return chunk

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

        def __getattr__(self, name):
            return getattr(self._f, name)

    def counting_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and Path(file) == src:
            opens.append(mode)
            return CountingFile(f)
        return f

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)
    info = store.put_file(src, "once.bin")
    monkeypatch.undo()

    assert opens == ["rb"]
    assert bytes_read[0] == len(data)
    assert info.sha256 == sha(data)
    assert store.get_bytes("once.bin") == data


def test_hashing_wrappers_see_every_byte_in_order():
    data = os.urandom(2 * MiB + 3)
    reader = HashingReader(io.BytesIO(data))
    parts = [reader.read(1), reader.read(65_537), reader.read()]
    assert b"".join(parts) == data and reader.read(10) == b""
    assert reader.hexdigest() == sha(data) and reader.bytes_read == len(data)
    assert not reader.seekable()  # so boto3 streams it once, in order

    sink = io.BytesIO()
    writer = HashingWriter(sink)
    for start in range(0, len(data), 700_001):
        writer.write(data[start : start + 700_001])
    assert sink.getvalue() == data
    assert writer.hexdigest() == sha(data) and writer.bytes_written == len(data)
    assert not writer.seekable()  # so boto3 writes parts in order


def test_large_file_round_trip_uses_multipart_on_s3(store, tmp_path):
    data = os.urandom(20 * MiB)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    if is_s3(store):
        from boto3.s3.transfer import TransferConfig

        store.transfer_config = TransferConfig(
            multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, preferred_transfer_client="classic"
        )

    info = store.put_file(src, "jobs/j1/checkpoints/step-2/big.bin")
    got = store.get_file("jobs/j1/checkpoints/step-2/big.bin", tmp_path / "big.out")

    assert info.sha256 == got.sha256 == sha(data)
    assert (tmp_path / "big.out").read_bytes() == data
    if is_s3(store):
        assert info.etag.endswith("-4"), info.etag  # four 5 MiB parts


# -- trees ------------------------------------------------------------------------------------------------------


def test_upload_tree_writes_checksums_json_last_listing_every_file(store, tree, monkeypatch):
    puts = []
    for name in ("put_file", "put_bytes"):
        real = getattr(store, name)

        def recording(*args, _real=real, **kwargs):
            info = _real(*args, **kwargs)
            puts.append(info.key)
            return info

        monkeypatch.setattr(store, name, recording)

    records = upload_tree(store, tree, PREFIX)

    rels = ["README.md", "adapter_config.json", "adapter_model.safetensors", "sub/notes.txt"]
    assert sorted(puts[:-1]) == [f"{PREFIX}/{rel}" for rel in rels]
    assert puts[-1] == f"{PREFIX}/checksums.json" and len(puts) == 5
    stored = store.get_bytes(f"{PREFIX}/checksums.json")
    manifest = json.loads(stored)
    assert manifest == {
        "algorithm": "sha256",
        "files": {rel: {"size": (tree / rel).stat().st_size, "sha256": sha((tree / rel).read_bytes())} for rel in rels},
    }
    assert (tree / "checksums.json").read_bytes() == stored  # the local folder is the complete artifact
    assert [r["path"] for r in records] == rels + ["checksums.json"]
    assert records[-1]["sha256"] == sha(stored) and records[-1]["size"] == len(stored)
    assert all((r["etag"] is not None) == is_s3(store) for r in records)
    assert store.list_keys(f"{PREFIX}/") == sorted(f"{PREFIX}/{p}" for p in rels + ["checksums.json"])


def test_upload_tree_again_replaces_stale_objects(store, tree, pulled):
    store.put_bytes(b"from an older upload", f"{PREFIX}/old.bin")
    store.put_bytes(b'{"algorithm": "sha256", "files": {}}', f"{PREFIX}/checksums.json")

    upload_tree(store, tree, PREFIX)
    upload_tree(store, tree, PREFIX)  # idempotent: a re-publish of the same folder

    assert f"{PREFIX}/old.bin" not in store.list_keys(f"{PREFIX}/")
    download_tree(store, PREFIX, pulled)
    assert (pulled / "adapter_model.safetensors").read_bytes() == (tree / "adapter_model.safetensors").read_bytes()


def test_download_tree_verifies_then_moves_into_place(store, tree, pulled):
    uploaded = upload_tree(store, tree, PREFIX)
    expected = {r["path"]: r["sha256"] for r in uploaded}

    records = download_tree(store, PREFIX, pulled, expected=expected)

    for rel in ["README.md", "adapter_config.json", "adapter_model.safetensors", "sub/notes.txt", "checksums.json"]:
        assert (pulled / rel).read_bytes() == (tree / rel).read_bytes()
    assert {r["path"]: r["sha256"] for r in records} == expected
    assert leftovers(pulled.parent) == [] and leftovers(pulled) == []

    empty = pulled.parent / "empty"
    empty.mkdir()
    download_tree(store, PREFIX + "/", empty)  # an empty folder is an acceptable destination
    assert sha256_file(empty / "adapter_model.safetensors") == expected["adapter_model.safetensors"]


def test_corrupted_object_is_refused_and_nothing_lands(store, tree, pulled):
    upload_tree(store, tree, PREFIX)
    good = sha((tree / "adapter_model.safetensors").read_bytes())
    store.put_bytes(b"tampered", f"{PREFIX}/adapter_model.safetensors")

    with pytest.raises(ChecksumMismatch) as err:
        download_tree(store, PREFIX, pulled)

    message = str(err.value)
    assert "adapter_model.safetensors" in message and good in message and sha(b"tampered") in message
    assert err.value.field == "adapter_model.safetensors"
    assert not pulled.exists() and leftovers(pulled.parent) == []


def test_catalog_digests_are_enforced_too(store, tree, pulled):
    uploaded = {r["path"]: r["sha256"] for r in upload_tree(store, tree, PREFIX)}

    wrong_file = {**uploaded, "README.md": "0" * 64}
    with pytest.raises(ChecksumMismatch, match=r"README\.md.*the catalog records sha256 0{64}"):
        download_tree(store, PREFIX, pulled, expected=wrong_file)
    missing_in_catalog = {k: v for k, v in uploaded.items() if k != "sub/notes.txt"}
    with pytest.raises(ChecksumMismatch, match=r"sub/notes\.txt.*which the catalog does not list"):
        download_tree(store, PREFIX, pulled, expected=missing_in_catalog)

    # A rewritten manifest that vouches for rewritten bytes is still caught by the catalog's record of it.
    manifest = json.loads(store.get_bytes(f"{PREFIX}/checksums.json"))
    manifest["files"]["README.md"] = {"size": 3, "sha256": sha(b"bad")}
    store.put_bytes(b"bad", f"{PREFIX}/README.md")
    store.put_bytes(json.dumps(manifest).encode(), f"{PREFIX}/checksums.json")
    catalog_says = r"checksums\.json.*the catalog records sha256 " + uploaded["checksums.json"]
    with pytest.raises(ChecksumMismatch, match=catalog_says):
        download_tree(store, PREFIX, pulled, expected=uploaded)

    assert not pulled.exists() and leftovers(pulled.parent) == []


def test_incomplete_or_padded_artifacts_are_refused(store, tree, pulled):
    upload_tree(store, tree, PREFIX)

    store.delete(f"{PREFIX}/README.md")
    with pytest.raises(ChecksumMismatch, match=r"checksums\.json lists README\.md but .* does not hold it"):
        download_tree(store, PREFIX, pulled)
    store.put_file(tree / "README.md", f"{PREFIX}/README.md")

    store.put_bytes(b"sneaky", f"{PREFIX}/extra.py")
    with pytest.raises(ChecksumMismatch, match=r"holds extra\.py, which checksums\.json does not list"):
        download_tree(store, PREFIX, pulled)
    store.delete(f"{PREFIX}/extra.py")

    store.delete(f"{PREFIX}/checksums.json")
    with pytest.raises(StoreError, match=r"has no checksums\.json: the upload did not finish"):
        download_tree(store, PREFIX, pulled)

    store.put_bytes(b"{not json", f"{PREFIX}/checksums.json")
    with pytest.raises(StoreError, match=r"checksums\.json is not valid JSON"):
        download_tree(store, PREFIX, pulled)
    store.put_bytes(json.dumps({"algorithm": "md5", "files": {}}).encode(), f"{PREFIX}/checksums.json")
    with pytest.raises(StoreError, match=r"checksums\.json is malformed"):
        download_tree(store, PREFIX, pulled)

    with pytest.raises(NotFound, match="nothing is stored under"):
        download_tree(store, "adapters/x/v2", pulled)
    assert not pulled.exists() and leftovers(pulled.parent) == []


def test_destination_must_be_new_or_empty(store, tree, tmp_path):
    upload_tree(store, tree, PREFIX)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep me")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me too")

    with pytest.raises(StoreError, match="is not empty: choose another destination or remove it"):
        download_tree(store, PREFIX, busy)
    with pytest.raises(StoreError, match="is not a folder: choose another destination or remove it"):
        download_tree(store, PREFIX, a_file)

    assert [p.name for p in busy.iterdir()] == ["mine.txt"] and (busy / "mine.txt").read_text() == "keep me"
    assert a_file.read_text() == "keep me too"
    assert leftovers(tmp_path) == []


def test_download_prefix_needs_no_manifest_but_checks_one_when_present(store, tree, tmp_path):
    step = "jobs/j1/checkpoints/step-4"
    store.put_bytes(b"optimizer", f"{step}/optimizer.pt")
    store.put_bytes(b"rng", f"{step}/state/rng.json")

    records = download_prefix(store, step, tmp_path / "ckpt")
    assert (tmp_path / "ckpt/state/rng.json").read_bytes() == b"rng"
    digests = {"optimizer.pt": sha(b"optimizer"), "state/rng.json": sha(b"rng")}
    assert {r["path"]: r["sha256"] for r in records} == digests

    with pytest.raises(ChecksumMismatch, match="optimizer.pt"):
        download_prefix(store, step, tmp_path / "ckpt2", expected={**digests, "optimizer.pt": sha(b"other")})

    upload_tree(store, tree, PREFIX)
    store.put_bytes(b"tampered", f"{PREFIX}/sub/notes.txt")
    with pytest.raises(ChecksumMismatch, match=r"sub/notes\.txt"):
        download_prefix(store, PREFIX, tmp_path / "ckpt3")
    assert not (tmp_path / "ckpt2").exists() and not (tmp_path / "ckpt3").exists() and leftovers(tmp_path) == []


def test_upload_tree_refuses_bad_inputs(store, tmp_path):
    with pytest.raises(StoreError, match="is not a folder"):
        upload_tree(store, tmp_path / "missing", PREFIX)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="holds no files"):
        upload_tree(store, tmp_path / "empty", PREFIX)
    (tmp_path / "empty" / "a.txt").write_text("a")
    with pytest.raises(StoreError, match="empty prefix names the whole store"):
        upload_tree(store, tmp_path / "empty", "")
    with pytest.raises(StoreError, match=r"'\.\.' parts are not allowed"):
        upload_tree(store, tmp_path / "empty", "adapters/../../etc")
    with pytest.raises(StoreError, match="it is a folder"):
        store.put_file(tmp_path / "empty", "k")
    with pytest.raises(StoreError, match=r"cannot upload .*nope\.bin"):
        store.put_file(tmp_path / "nope.bin", "k")
    assert store.list_keys("") == []


# -- refusals ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, why",
    [
        ("../escape.json", "'..' parts"),
        ("adapters/../../escape", "'..' parts"),
        ("/etc/passwd", "absolute paths"),
        ("adapters\\x\\v1", "backslashes"),
        ("", "non-empty"),
        ("adapters//x", "empty, '.' and '..' parts"),
        ("adapters/./x", "empty, '.' and '..' parts"),
        ("adapters/x/", "empty, '.' and '..' parts"),
    ],
)
def test_bad_keys_are_refused(store, tmp_path, key, why):
    src = tmp_path / "a.txt"
    src.write_text("a")
    for call in (
        lambda: store.put_bytes(b"x", key),
        lambda: store.put_file(src, key),
        lambda: store.get_bytes(key),
        lambda: store.get_file(key, tmp_path / "out"),
        lambda: store.exists(key),
        lambda: store.uri(key),
        lambda: store.presigned_url(key),
    ):
        with pytest.raises(StoreError, match="invalid store key") as err:
            call()
        assert repr(key) in str(err.value) and why in str(err.value)
    with pytest.raises(StoreError, match="invalid store key"):
        store.list_keys("../")
    assert store.list_keys("") == [] and not (tmp_path / "out").exists()


def test_missing_key_is_not_found_naming_it(store, tmp_path):
    with pytest.raises(NotFound, match="'adapters/none/v1/a.json'"):
        store.get_bytes("adapters/none/v1/a.json")
    with pytest.raises(NotFound, match="'adapters/none/v1/b.json'"):
        store.get_file("adapters/none/v1/b.json", tmp_path / "dl" / "b.json")
    assert not store.exists("adapters/none/v1/a.json")
    assert leftovers(tmp_path / "dl") == [] and not (tmp_path / "dl" / "b.json").exists()


@pytest.mark.parametrize(
    "url", ["ftp://host/x", "/just/a/path", "gs://bucket/x", "s3://", "file://", "s3://bkt/a/../b"]
)
def test_bad_store_urls_name_the_setting(url):
    with pytest.raises(StoreError, match="FARM_STORE_URL") as err:
        open_store(url, FarmSettings())
    assert err.value.field == "store_url"


def test_relative_file_url_is_created_under_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = open_store("file://.farm/store", FarmSettings())
    monkeypatch.chdir("/")  # later cwd changes do not move the store

    store.put_bytes(b"hi", "a/b.txt")
    assert (tmp_path / ".farm/store/a/b.txt").read_bytes() == b"hi"
    assert store.uri("a/b.txt") == f"file://{tmp_path}/.farm/store/a/b.txt"
    assert store.presigned_url("a/b.txt") is None


def test_local_store_hides_files_being_written_and_key_clashes(tmp_path):
    store = open_store(f"file://{tmp_path}/s", FarmSettings())
    store.put_bytes(b"done", "a/done.bin")
    (tmp_path / "s/a" / f"{TMP_MARK}1234-half.bin").write_bytes(b"hal")  # a write in progress
    assert store.list_keys("") == ["a/done.bin"]
    with pytest.raises(StoreError, match="already used as a file or folder"):
        store.put_bytes(b"x", "a/done.bin/inner")
    with pytest.raises(StoreError, match="already used as a file or folder"):
        store.put_bytes(b"x", "a")


def test_presigned_url_serves_the_object_over_http(s3_store_url, tmp_path):
    store = open_store(s3_store_url.url, s3_store_url.settings)
    data = os.urandom(50_000)
    (tmp_path / "p.bin").write_bytes(data)
    info = store.put_file(tmp_path / "p.bin", "adapters/x/v1/p.bin")

    url = store.presigned_url("adapters/x/v1/p.bin", expires_s=600)

    assert url.startswith(s3_store_url.endpoint_url) and "X-Amz-Signature" in url
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200
    assert sha(response.content) == info.sha256 == sha(data)
    with pytest.raises(StoreError, match="1 s to 7 days"):
        store.presigned_url("adapters/x/v1/p.bin", expires_s=0)


def test_s3_errors_say_what_to_fix(s3_store_url):
    import boto3
    from botocore.config import Config

    from farm.store.s3 import S3Store

    settings = FarmSettings(s3_endpoint_url=s3_store_url.endpoint_url, s3_region="us-east-1")
    missing = open_store("s3://farm-no-such-bucket/p", settings)
    with pytest.raises(StoreError, match="bucket 'farm-no-such-bucket' does not exist.*FARM_STORE_URL"):
        missing.list_keys("")
    with pytest.raises(StoreError, match="bucket 'farm-no-such-bucket' does not exist"):
        missing.put_bytes(b"x", "k")

    # Nothing listens on port 9 of this host; one attempt keeps the test quick.
    client = boto3.client(
        "s3", endpoint_url="http://127.0.0.1:9", config=Config(retries={"max_attempts": 1}, connect_timeout=2)
    )
    down = S3Store(s3_store_url.bucket, "p", endpoint_url="http://127.0.0.1:9", client=client)
    with pytest.raises(StoreError, match=r"cannot reach the S3 endpoint http://127\.0\.0\.1:9.*FARM_S3_ENDPOINT_URL"):
        down.get_bytes("k")

    with pytest.raises(StoreError, match="FARM_S3_ENDPOINT_URL"):
        open_store("s3://bkt/p", FarmSettings(s3_endpoint_url="not a url"))
