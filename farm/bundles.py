"""Adapter bundles: one farm's adapter version as a tar file another farm can import, every byte verified.

A bundle is an (uncompressed) tar holding, in this order:

    manifest.json     {"format": "farm-bundle/1", "farm_id", "exported_at", "adapter": {catalog record},
                       "provenance", "lineage": [ancestors], "origin": {...} | null, "profile": {...} | null,
                       "files": {"<path>": {"size", "sha256"}, ...}}   (every file below, checksums.json included)
    files/<path>      the artifact's files exactly as stored, checksums.json among them

Importing reads the tar member by member (farm.bundle_reader): only regular files, under `files/`, named in the
manifest, no absolute paths, no `..`, no links or devices, within size caps. Each file is hashed while it is
copied into a scratch folder; every size and sha256 must match the manifest, and the artifact's own
checksums.json must agree with it. Only then is anything written to the store and the catalog. An imported adapter is recorded with a job of kind
`import` (state succeeded) as its job, and its origin (farm id, original name:version, original job) in
adapter_origins. A name that exists gets a new version: nothing is ever overwritten.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
import uuid
from pathlib import Path

from pydantic import BaseModel
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

import farm
from farm.bundle_reader import FILES_DIR, FORMAT, MANIFEST, read_bundle
from farm.catalog import repository as repo
from farm.catalog.models import (
    RUNNING,
    Adapter,
    AdapterFile,
    AdapterOrigin,
    AdapterProfile,
    FarmIdentity,
    Job,
    JobEvent,
    utcnow,
)
from farm.catalog.session import session_scope
from farm.digests import sha256_file
from farm.errors import BundleError, FarmError
from farm.kinds import IMPORT_KIND
from farm.names import adapter_ref, parse_adapter_ref
from farm.routing import Profile
from farm.service import local_user
from farm.settings import FarmSettings, get_settings
from farm.specs import ADAPTER_NAME_PATTERN
from farm.store.transfer import CHECKSUMS, download_tree, upload_tree


class ExportResult(BaseModel):
    """A written bundle."""

    adapter: str
    path: str
    size: int
    sha256: str
    """sha256 of the bundle file."""
    files: int


class ImportResult(BaseModel):
    """An imported adapter version."""

    adapter: str
    """name:version it was recorded as in this farm."""
    name: str
    version: int
    origin: dict
    """farm_id, name, version, job_id of the adapter in the farm it came from."""
    already: bool = False
    """True when this very artifact had been imported under this name before (that version is returned)."""
    files: int


# ---------------------------------------------------------------- this farm's id

def farm_id(session: Session) -> str:
    """This farm's id, made on first use."""
    row = session.scalar(select(FarmIdentity).limit(1))
    if row is None:
        row = FarmIdentity(id=uuid.uuid4().hex)
        session.add(row)
        session.flush()
    return row.id


# ---------------------------------------------------------------- export

def _lineage(session: Session, adapter: Adapter) -> list[dict]:
    """The adapter's ancestors (continued-from chain), nearest first."""
    chain, seen, parent_id = [], set(), adapter.parent_adapter_id
    while parent_id and parent_id not in seen:
        seen.add(parent_id)
        parent = session.get(Adapter, parent_id)
        if parent is None:
            break
        chain.append({"adapter": adapter_ref(parent.name, parent.version), "job_id": parent.job_id,
                      "spec_hash": parent.spec_hash})
        parent_id = parent.parent_adapter_id
    return chain


def _catalog_record(adapter: Adapter) -> dict:
    fields = ("name", "version", "kind", "job_id", "base_model", "base_model_sha256", "dataset_uri", "dataset_sha256",
              "source_model", "source_model_sha256", "spec_hash", "metrics")
    record = {k: getattr(adapter, k) for k in fields}
    record["created_at"] = adapter.created_at.isoformat() if adapter.created_at else None
    record["published_at"] = adapter.published_at.isoformat() if adapter.published_at else None
    return record


def bundle_manifest(session: Session, adapter: Adapter, files: dict[str, dict], store) -> dict:
    """The manifest of a bundle of `adapter` whose files (path -> {size, sha256}) were verified."""
    from farm.profiles import ensure_profiles

    profile = ensure_profiles(session, [adapter], store).get(adapter.id)
    origin = session.scalar(select(AdapterOrigin).where(AdapterOrigin.adapter_id == adapter.id))
    return {
        "format": FORMAT,
        "farm_id": farm_id(session),
        "farm_version": farm.__version__,
        "exported_at": utcnow().isoformat(),
        "adapter": _catalog_record(adapter),
        "provenance": adapter.provenance,
        "lineage": _lineage(session, adapter),
        "origin": None if origin is None else {"farm_id": origin.farm_id, "name": origin.name,
                                               "version": origin.version, "job_id": origin.job_id},
        "profile": None if profile is None else {"description": profile.description, "tags": profile.tags,
                                                 "prompts": profile.prompts},
        "files": files,
    }


def write_bundle(manifest: dict, artifact_dir: Path, dest: Path) -> None:
    """Write the tar (manifest first, then files/...) to a temporary file beside `dest`, then rename it in place."""
    tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.part"
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            data = (json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n").encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mtime, info.mode = len(data), int(utcnow().timestamp()), 0o644
            tar.addfile(info, io.BytesIO(data))
            for rel in sorted(manifest["files"]):
                info = tar.gettarinfo(str(artifact_dir / rel), arcname=FILES_DIR + rel)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                with open(artifact_dir / rel, "rb") as fh:
                    tar.addfile(info, fh)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def export_adapter(ref: str, dest: str | Path, *, settings: FarmSettings | None = None) -> ExportResult:
    """Write adapter version `ref` (NAME or NAME:VERSION) as a bundle at `dest` (a new file).

    The files are downloaded from the store and verified against the catalog first: a corrupt artifact is never
    exported. Raises NotFound (unknown adapter), StoreError/ChecksumMismatch, FarmError (dest exists).
    """
    from farm.store import open_store

    settings = settings or get_settings()
    dest = Path(dest)
    if dest.exists():
        raise FarmError(f"{dest} already exists: choose a new file name for the bundle", field="file")
    if not dest.parent.is_dir():
        raise FarmError(f"{dest.parent} is not a folder: create it first or choose another path", field="file")
    name, version = parse_adapter_ref(ref)
    store = open_store(settings.store_url, settings)
    with tempfile.TemporaryDirectory(prefix="farm-export-") as tmp:
        artifact = Path(tmp) / "artifact"
        with session_scope(settings.database_url) as session:
            adapter = repo.get_adapter(session, name, version)
            expected = {f.path: f.sha256 for f in adapter.files}
            download_tree(store, adapter.prefix, artifact, expected=expected)
            files = {f.path: {"size": f.size, "sha256": f.sha256} for f in adapter.files}
            manifest = bundle_manifest(session, adapter, files, store)
            label = adapter_ref(adapter.name, adapter.version)
        write_bundle(manifest, artifact, dest)
    return ExportResult(adapter=label, path=str(dest.resolve()), size=dest.stat().st_size, sha256=sha256_file(dest),
                        files=len(files))


# ---------------------------------------------------------------- import

def _already_imported(session: Session, name: str, manifest: dict, checksums_sha: str) -> Adapter | None:
    a = manifest["adapter"]
    return session.scalar(
        select(Adapter).join(AdapterOrigin, AdapterOrigin.adapter_id == Adapter.id)
        .where(Adapter.name == name, AdapterOrigin.farm_id == manifest["farm_id"], AdapterOrigin.name == a["name"],
               AdapterOrigin.version == a["version"], AdapterOrigin.checksums_sha256 == checksums_sha))


def import_bundle(path: str | Path, *, as_name: str | None = None, source: str | None = None,
                  settings: FarmSettings | None = None) -> ImportResult:
    """Import the bundle at `path` as a new version of `as_name` (default: its own name). See the module docstring.

    Raises BundleError (not a tar, unsafe member, manifest lies, truncated): nothing is written then.
    """
    import re

    settings = settings or get_settings()
    path = Path(path)
    if as_name is not None and not re.match(ADAPTER_NAME_PATTERN, as_name):
        raise BundleError(f"--as {as_name[:70]!r}: an adapter name is lowercase letters, digits, '-' and '_' "
                          "(at most 64 characters)", field="as")
    with tempfile.TemporaryDirectory(prefix="farm-import-") as tmp:
        manifest, artifact = read_bundle(path, Path(tmp), max_bytes=settings.bundle_max_bytes)
        return _record_import(manifest, artifact, as_name or manifest["adapter"]["name"],
                              source or str(path.resolve()), settings)


def _record_import(manifest: dict, artifact: Path, name: str, source: str, settings: FarmSettings) -> ImportResult:
    from farm.profiles import save_profile
    from farm.store import open_store

    a = manifest["adapter"]
    checksums_sha = manifest["files"][CHECKSUMS]["sha256"]
    origin = {"farm_id": manifest["farm_id"][:64], "name": a["name"], "version": a["version"],
              "job_id": _text(a.get("job_id"), 64)}
    with session_scope(settings.database_url) as session:
        existing = _already_imported(session, name, manifest, checksums_sha)
        if existing is not None:
            return ImportResult(adapter=adapter_ref(existing.name, existing.version), name=existing.name,
                                version=existing.version, origin=origin, already=True, files=len(existing.files))
        spec = {"kind": IMPORT_KIND, "name": name, "source": source, "origin": origin}
        job = repo.create_job(session, kind=IMPORT_KIND, name=name, queue=IMPORT_KIND, spec=spec,
                              spec_hash=_text(a.get("spec_hash"), 64) or "0" * 64, max_attempts=1,
                              submitted_by=local_user())
        # Running with no lease: never reaped, never claimed; a crash before the end leaves an invisible row.
        job.state, job.attempt, job.worker, job.started_at = RUNNING, 1, "import", utcnow()
        repo.add_event(session, job.id, 1, "state", state=RUNNING, data={"source": source[:500]})
        claim = repo.Claim(job.id, 1, "import")
        adapter = repo.reserve_adapter_version(session, claim, name=name, kind=_text(a.get("kind"), 16) or "train",
                                               spec_hash=job.spec_hash)
        job_id, version, prefix = job.id, adapter.version, adapter.prefix
    store = open_store(settings.store_url, settings)
    try:
        records = upload_tree(store, artifact, prefix)
        provenance = dict(manifest["provenance"]) if isinstance(manifest.get("provenance"), dict) else {}
        provenance["imported"] = {"origin": origin, "source": source, "lineage": manifest.get("lineage") or [],
                                  "earlier_origin": manifest.get("origin"), "exported_at": manifest.get("exported_at")}
        with session_scope(settings.database_url) as session:
            adapter = repo.publish_adapter(
                session, claim, files=records, provenance=provenance,
                metrics=a["metrics"] if isinstance(a.get("metrics"), dict) else {},
                base_model=_text(a.get("base_model"), 1024), base_model_sha256=_text(a.get("base_model_sha256"), 64),
                dataset_uri=_text(a.get("dataset_uri"), 1024), dataset_sha256=_text(a.get("dataset_sha256"), 64),
                source_model=_text(a.get("source_model"), 1024),
                source_model_sha256=_text(a.get("source_model_sha256"), 64))
            session.add(AdapterOrigin(adapter_id=adapter.id, farm_id=origin["farm_id"], name=origin["name"],
                                      version=origin["version"], job_id=origin["job_id"],
                                      checksums_sha256=checksums_sha, source=source[:1024]))
            p = manifest["profile"] if isinstance(manifest.get("profile"), dict) else {}
            spec = provenance.get("spec") if isinstance(provenance.get("spec"), dict) else {}
            save_profile(session, adapter.id, Profile(
                name=name, description=p.get("description") or spec.get("description"),
                tags=[str(t) for t in (p.get("tags") or spec.get("tags") or [])][:32],
                prompts=[str(x) for x in (p.get("prompts") or [])][:64]))
            files = len(records)
    except BaseException:
        _undo(settings, store, job_id, prefix)
        raise
    return ImportResult(adapter=adapter_ref(name, version), name=name, version=version, origin=origin, files=files)


def _text(value, limit: int) -> str | None:
    """A manifest's string field, bounded; anything else is dropped (a bundle is untrusted input)."""
    return value[:limit] if isinstance(value, str) and value else None


def _undo(settings: FarmSettings, store, job_id: str, prefix: str) -> None:
    """Take back a failed import: its objects, its reserved version and its job row."""
    try:
        store.delete_prefix(prefix)
    finally:
        with session_scope(settings.database_url) as session:
            ids = list(session.scalars(select(Adapter.id).where(Adapter.job_id == job_id)))
            for table in (AdapterProfile, AdapterOrigin, AdapterFile):
                session.execute(delete(table).where(table.adapter_id.in_(ids)))
            session.execute(delete(Adapter).where(Adapter.id.in_(ids)))
            session.execute(delete(JobEvent).where(JobEvent.job_id == job_id))
            session.execute(delete(Job).where(Job.id == job_id))


