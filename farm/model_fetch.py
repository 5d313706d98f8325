"""Base models onto the worker's disk: Hub ids, s3:// prefixes and merged models of the catalog (`farm:NAME:V`).

- A **Hub id** goes through ``huggingface_hub.snapshot_download(repo_id, revision=...)`` into the Hub cache
  (``HF_HUB_CACHE``, else ``$HF_HOME/hub``), offline when ``HF_HUB_OFFLINE`` is set. The token comes from the
  environment (``HF_TOKEN``) through huggingface_hub itself and is never recorded. The snapshot folder's name is
  the commit the revision resolved to: provenance records that sha, so a rerun gets the same weights.
- An **s3:// prefix** is listed first (keys, sizes, ETags) and downloaded into ``<cache_dir>/models/<key>/``,
  where the key is the sha256 of that listing: a model replaced under the same prefix gets a new entry, two
  prefixes holding the same objects share one. Each file is checked against its ETag (MD5 for single-part
  uploads) and against checksums.json when the prefix has one. The cache is bounded by
  FARM_MODEL_CACHE_MAX_GB; the least recently used entries leave first (never the one being fetched).
- A **farm:NAME:V** reference is a merged model of the catalog (job kind `merge`), downloaded verified against
  the catalog's checksums into the same cache, keyed by its checksums.json sha256.

Nothing here imports torch. Every failure a user can cause raises ModelError with what to do.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from farm.errors import ModelError, NotFound, StoreError
from farm.settings import FarmSettings

FARM_REF = "farm:"
CONFIG_FILE = "config.json"
# What a model needs from a Hub repo: weights, configs, tokenizer files. Not *.bin/*.pth duplicates, not
# `original/` consolidated checkpoints (Meta's repos ship both: twice the download for nothing).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
HUB_IGNORE = ["original/*"]
_GIB = 1024 ** 3


@dataclass(frozen=True)
class FetchedModel:
    """A base model on local disk and what it was resolved from."""

    path: Path
    ref: str
    """The reference as the user gave it (a Hub id, s3:// URI, farm:NAME:V or a path)."""
    source: str
    """local, hub, s3 or farm."""
    revision: str | None = None
    """Hub: the commit sha the requested revision resolved to. s3/farm: the cache key (content digest)."""
    downloaded: bool = False
    """False when the model was already in the cache."""


def classify(ref: str) -> str:
    """local, hub, s3 or farm: how `ref` is fetched (an existing path is local; `org/name` is a Hub id)."""
    if ref.startswith("s3://"):
        return "s3"
    if ref.startswith(FARM_REF):
        return "farm"
    if "://" in ref:
        return "url"
    if ref.startswith((".", "/", "~")) or Path(ref).expanduser().exists():
        return "local"
    return "hub"


def fetch_base_model(ref: str, settings: FarmSettings, revision: str | None = None) -> FetchedModel:
    """A local folder holding the model `ref` names (see the module docstring); ModelError when it cannot be had."""
    kind = classify(ref)
    if kind == "local":
        path = Path(ref).expanduser()
        if not path.is_dir():
            raise ModelError(f"{ref}: base model folder not found on this worker", field="base_model")
        return FetchedModel(path=path.resolve(), ref=ref, source="local")
    if kind == "hub":
        return fetch_hub_model(ref, revision)
    if kind == "s3":
        return fetch_s3_model(ref, settings)
    if kind == "farm":
        return fetch_farm_model(ref, settings)
    raise ModelError(f"{ref}: unsupported model reference; give a local folder, a Hub id (org/name), "
                     "s3://bucket/prefix or farm:NAME:VERSION", field="base_model")


# ---------------------------------------------------------------- the Hub

def hub_cache_dir() -> Path:
    """The Hub cache as huggingface_hub sees it, read from the environment now (HF_HUB_CACHE, else HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    """HF_HUB_OFFLINE, read from the environment now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_repo_id(repo_id: str) -> None:
    """ModelError when `repo_id` cannot be a Hub repo id (org/name)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ModelError(f"base_model: {repo_id[:120]!r} is neither a folder on this machine nor a valid Hub id "
                         f"(org/name): {exc}", field="base_model") from None


def fetch_hub_model(repo_id: str, revision: str | None = None) -> FetchedModel:
    """snapshot_download into the Hub cache; the returned revision is the resolved commit sha."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    check_repo_id(repo_id)
    cache = hub_cache_dir()
    offline = hub_offline()
    rev = revision or "main"
    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=offline,
                                 allow_patterns=HUB_PATTERNS, ignore_patterns=HUB_IGNORE)
    except GatedRepoError:
        raise ModelError(f"base_model: {repo_id} is gated on the Hub: accept its license on huggingface.co and give "
                         "the worker a token (HF_TOKEN)", field="base_model") from None
    except RepositoryNotFoundError:
        raise ModelError(f"base_model: no Hub repository {repo_id!r} (or it is private: give the worker a token in "
                         "HF_TOKEN)", field="base_model") from None
    except RevisionNotFoundError:
        raise ModelError(f"base_revision: {rev!r} is not a branch, tag or commit of {repo_id} on the Hub",
                         field="base_revision") from None
    except LocalEntryNotFoundError:
        if offline:
            raise ModelError(
                f"base_model: {repo_id} at revision {rev!r} is not in the Hub cache {cache} and HF_HUB_OFFLINE is set"
                f"; download it on the worker first (`hf download {repo_id}"
                f"{' --revision ' + rev if revision else ''}`) or give a revision that is cached",
                field="base_revision" if revision else "base_model") from None
        raise ModelError(f"base_model: cannot reach the Hub to download {repo_id}: check the network or set "
                         "HF_HUB_OFFLINE=1 with the model in the cache", field="base_model") from None
    except HfHubHTTPError as exc:
        raise ModelError(f"base_model: the Hub refused {repo_id}@{rev}: {str(exc)[:200]}",
                         field="base_model") from None
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise ModelError(f"base_model: {repo_id}@{rev} has no config.json: not a transformers model",
                         field="base_model")
    # snapshots/<commit sha>/: the folder's name is what the revision resolved to.
    sha = path.name if path.parent.name == "snapshots" else None
    return FetchedModel(path=path, ref=repo_id, source="hub", revision=sha, downloaded=False)


# ---------------------------------------------------------------- the model cache (s3:// and farm:)

def _cache_root(settings: FarmSettings) -> Path:
    root = Path(settings.cache_dir) / "models"
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def _locked(path: Path, shared: bool = False):
    """An flock on `path` (created): one fetch of an entry at a time across the worker processes of a host."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_pins: dict[Path, object] = {}  # an entry's lock file -> the open file holding its shared "in use" lock


def _pin(root: Path, key: str) -> None:
    """Mark entry `key` in use by this process (a shared flock on .<key>.use) until release_pins(): eviction by
    any process of the host skips it, so a job's base model cannot vanish between its fetch and its load."""
    path = root / f".{key}.use"
    if path in _pins:
        return
    fh = open(path, "a")
    fcntl.flock(fh, fcntl.LOCK_SH)
    _pins[path] = fh


def release_pins() -> None:
    """Let eviction take this process's cache entries again (the worker calls it when an attempt ends)."""
    while _pins:
        _, fh = _pins.popitem()
        fh.close()  # closing drops the flock


def _in_use(root: Path, key: str) -> bool:
    """Whether some process (this one included) holds entry `key` pinned."""
    try:
        fh = open(root / f".{key}.use", "a")
    except OSError:
        return False
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


def _entry_size(entry: Path) -> int:
    return sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())


def evict(settings: FarmSettings, keep: str | None = None) -> list[str]:
    """Delete least recently used cache entries until the cache fits FARM_MODEL_CACHE_MAX_GB; returns their keys.

    An entry's last use is the mtime of its <key>.json record, touched at every fetch. `keep` is never deleted,
    nor an entry that a running job has pinned (_pin): the cache may then stay above its bound until it is free.
    """
    root = _cache_root(settings)
    limit = int(settings.model_cache_max_gb * _GIB)
    with _locked(root / ".evict.lock"):
        entries = []
        for record in root.glob("*.json"):
            key = record.stem
            try:
                size = int(json.loads(record.read_text()).get("size", 0))
            except (OSError, ValueError):
                size = _entry_size(root / key) if (root / key).is_dir() else 0
            entries.append((record.stat().st_mtime, key, size))
        total = sum(size for _, _, size in entries)
        gone = []
        for _, key, size in sorted(entries):
            if total <= limit:
                break
            if key == keep or _in_use(root, key):
                continue
            (root / f"{key}.json").unlink(missing_ok=True)
            shutil.rmtree(root / key, ignore_errors=True)
            total -= size
            gone.append(key)
    return gone


def _cached(settings: FarmSettings, key: str, ref: str, download) -> tuple[Path, bool]:
    """The entry `key`: from the cache (its use recorded), or made by download(tmp_dir) -> {rel: record}."""
    root = _cache_root(settings)
    entry, record = root / key, root / f"{key}.json"
    with _locked(root / f".{key}.lock"):
        _pin(root, key)
        if entry.is_dir() and record.is_file():
            os.utime(record)
            return entry, False
        shutil.rmtree(entry, ignore_errors=True)
        tmp = root / f".tmp-{uuid.uuid4().hex[:12]}-{key}"
        try:
            files = download(tmp)
            if not (tmp / CONFIG_FILE).is_file():
                raise ModelError(f"base_model: {ref} holds no config.json: give the folder of a transformers model "
                                 "(save_pretrained)", field="base_model")
            os.rename(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        size = _entry_size(entry)
        record.write_text(json.dumps({"ref": ref, "size": size, "fetched_at": time.time(), "files": files},
                                     indent=1, sort_keys=True))
    evict(settings, keep=key)
    return entry, True


def _s3_listing(uri: str, settings: FarmSettings) -> tuple[object, str, dict[str, dict]]:
    """(bucket store, folder key, {relpath: {size, etag}}) of the objects under an s3:// prefix."""
    from farm.store.s3 import S3Store

    bucket, _, prefix = uri[len("s3://"):].partition("/")
    prefix = prefix.strip("/")
    if not bucket or not prefix:
        raise ModelError(f"base_model: {uri}: give the model's folder, as in s3://bucket/models/name",
                         field="base_model")
    store = S3Store(bucket, "", endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
    folder = prefix + "/"
    objects: dict[str, dict] = {}
    try:
        with store._errors("list", None):
            for page in store.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder):
                for item in page.get("Contents", []):
                    rel = item["Key"][len(folder):]
                    if rel and not rel.endswith("/"):
                        objects[rel] = {"size": int(item["Size"]), "etag": item.get("ETag", "").strip('"')}
    except NotFound:
        raise ModelError(f"base_model: {uri}: no such bucket or prefix", field="base_model") from None
    except StoreError as exc:
        raise StoreError(f"base_model: {uri}: {exc.message}") from None
    if not objects:
        raise ModelError(f"base_model: nothing is stored under {uri}", field="base_model")
    if CONFIG_FILE not in objects:
        raise ModelError(f"base_model: {uri} holds no config.json (found {', '.join(sorted(objects)[:4])}): give the "
                         "folder of a transformers model (save_pretrained)", field="base_model")
    return store, folder, objects


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_s3_model(uri: str, settings: FarmSettings) -> FetchedModel:
    """The model under an s3:// prefix, from the content-keyed cache or downloaded and verified into it."""
    from farm.store.transfer import download_prefix

    store, folder, objects = _s3_listing(uri, settings)
    listing = "".join(f"{rel}\t{o['etag']}\t{o['size']}\n" for rel, o in sorted(objects.items()))
    key = "s3-" + hashlib.sha256(listing.encode()).hexdigest()[:40]

    def download(tmp: Path) -> dict:
        records = download_prefix(store, folder, tmp)  # enforces checksums.json when the prefix has one
        files = {}
        for r in records:
            want = objects.get(r["path"])
            if want is None or (r.get("etag") and r["etag"] != want["etag"]):
                raise StoreError(f"base_model: {uri}{r['path']} changed while it was downloaded; run the job again")
            if want["etag"] and "-" not in want["etag"] and _md5(tmp / r["path"]) != want["etag"]:
                raise StoreError(f"base_model: {uri}/{r['path']}: the downloaded bytes do not match the object's "
                                 "ETag (MD5); the download was corrupted, run the job again")
            files[r["path"]] = {"size": r["size"], "sha256": r["sha256"], "etag": want["etag"]}
        return files

    path, downloaded = _cached(settings, key, uri, download)
    return FetchedModel(path=path, ref=uri, source="s3", revision=key, downloaded=downloaded)


def parse_farm_ref(ref: str) -> tuple[str, int | None]:
    """farm:NAME[:VERSION] -> (name, version)."""
    from farm.names import parse_adapter_ref

    body = ref[len(FARM_REF):] if ref.startswith(FARM_REF) else ref
    if not body:
        raise ModelError(f"{ref!r}: give a merged model as farm:NAME:VERSION", field="base_model")
    return parse_adapter_ref(body)


def farm_model_entry(ref: str, settings: FarmSettings) -> tuple[str, dict[str, str], str]:
    """(store prefix, {path: sha256}, name:version) of the merged model farm:NAME[:V]; ModelError if there is none."""
    from farm.catalog import repository as repo
    from farm.catalog.session import session_scope

    name, version = parse_farm_ref(ref)
    with session_scope(settings.database_url) as session:
        try:
            entry = repo.get_adapter(session, name, version)
        except NotFound:
            raise ModelError(f"base_model: {ref}: no merged model {name}{':' + str(version) if version else ''} in "
                             "the catalog; list them with `farm adapters`", field="base_model") from None
        if entry.kind != "merge":
            raise ModelError(f"base_model: {ref} is a {entry.kind} adapter, not a merged model: merge it first "
                             f"(`farm merge {entry.name}:{entry.version}`) or train on its base model",
                             field="base_model")
        return entry.prefix, {f.path: f.sha256 for f in entry.files}, f"{entry.name}:{entry.version}"


def fetch_farm_model(ref: str, settings: FarmSettings) -> FetchedModel:
    """A merged model of the catalog, verified against the catalog's checksums, into the model cache."""
    from farm.store import open_store
    from farm.store.transfer import CHECKSUMS, download_tree

    prefix, expected, _ = farm_model_entry(ref, settings)
    key = "farm-" + (expected.get(CHECKSUMS) or hashlib.sha256(prefix.encode()).hexdigest())[:40]

    def download(tmp: Path) -> dict:
        records = download_tree(open_store(settings.store_url, settings), prefix, tmp, expected=expected)
        return {r["path"]: {"size": r["size"], "sha256": r["sha256"]} for r in records}

    path, downloaded = _cached(settings, key, ref, download)
    return FetchedModel(path=path, ref=ref, source="farm", revision=key, downloaded=downloaded)
