"""Reading an adapter bundle (farm.bundles) safely: every member checked, every byte hashed, before any use.

Only regular files, under `files/`, named in the manifest; no absolute paths, no `..`, no links or devices;
manifest, member count and total size capped. Each file is hashed while it is copied into a scratch folder; sizes
and sha256 must match the manifest, and the artifact's own checksums.json must agree with it. BundleError names
what is wrong; nothing outside the scratch folder is touched.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from pathlib import Path

from farm.errors import BundleError, StoreError
from farm.specs import ADAPTER_NAME_PATTERN
from farm.store.base import CHUNK_SIZE, validate_key
from farm.store.transfer import CHECKSUMS, _parse_manifest

FORMAT = "farm-bundle/1"
MANIFEST = "manifest.json"
FILES_DIR = "files/"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_MEMBERS = 10_000


def _member_path(member: tarfile.TarInfo, where: str) -> str:
    name = member.name
    if not (member.isreg()):
        what = "a link" if member.issym() or member.islnk() else "a folder" if member.isdir() else "a special file"
        raise BundleError(f"{where}: member {name!r} is {what}; a bundle holds regular files only. Nothing was "
                          "imported.")
    if name.startswith("/") or ".." in name.split("/") or "\\" in name:
        raise BundleError(f"{where}: member {name!r} has an absolute or escaping path; refusing the bundle. "
                          "Nothing was imported.")
    return name


def _copy_hashed(src, dest: Path, size: int) -> tuple[int, str]:
    digest, written = hashlib.sha256(), 0
    with open(dest, "wb") as out:
        while chunk := src.read(min(CHUNK_SIZE, max(size - written, 0) + 1)):
            written += len(chunk)
            if written > size:
                break
            digest.update(chunk)
            out.write(chunk)
    return written, digest.hexdigest()


def read_bundle(path: Path, scratch: Path, *, max_bytes: int) -> tuple[dict, Path]:
    """Check a bundle completely, copying its files into `scratch/artifact`; returns (manifest, artifact folder).

    Raises BundleError naming what is wrong; nothing outside `scratch` is touched.
    """
    where = str(path)
    if not path.is_file():
        raise BundleError(f"{where}: no such bundle file", field="file")
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(f"{where} is not a tar bundle ({exc}); make one with `farm export NAME FILE.tar`. "
                          "Nothing was imported.", field="file") from None
    artifact = scratch / "artifact"
    artifact.mkdir(parents=True)
    try:
        with tar:
            return _read_members(tar, where, artifact, max_bytes), artifact
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BundleError(f"{where} is damaged or truncated ({type(exc).__name__}: {exc}). Nothing was imported.",
                          field="file") from None


def _read_members(tar: tarfile.TarFile, where: str, artifact: Path, max_bytes: int) -> dict:
    first = tar.next()
    if first is None or _member_path(first, where) != MANIFEST:
        raise BundleError(f"{where}: the first member must be {MANIFEST}; this is not a farm bundle. Nothing was "
                          "imported.", field="file")
    if first.size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{where}: {MANIFEST} is {first.size} bytes, more than {MAX_MANIFEST_BYTES}; refusing it")
    try:
        manifest = json.loads(tar.extractfile(first).read())
    except ValueError as exc:
        raise BundleError(f"{where}: {MANIFEST} is not valid JSON ({exc}). Nothing was imported.") from None
    files = _check_manifest(manifest, where, max_bytes)
    seen: set[str] = set()
    count = 0
    while (member := tar.next()) is not None:
        count += 1
        if count > MAX_MEMBERS:
            raise BundleError(f"{where}: more than {MAX_MEMBERS} members; refusing the bundle")
        name = _member_path(member, where)
        rel = name[len(FILES_DIR):] if name.startswith(FILES_DIR) else None
        if rel is None or rel not in files:
            raise BundleError(f"{where}: member {name!r} is not listed in {MANIFEST}: an unverified file is refused. "
                              "Nothing was imported.", field=name)
        if rel in seen:
            raise BundleError(f"{where}: member {name!r} appears twice; refusing the bundle", field=name)
        seen.add(rel)
        want = files[rel]
        if member.size != want["size"]:
            raise BundleError(f"{where}: {rel} is {member.size} bytes but {MANIFEST} says {want['size']}: the "
                              "manifest does not match the bundle. Nothing was imported.", field=rel)
        dest = artifact / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        size, sha = _copy_hashed(tar.extractfile(member), dest, want["size"])
        if size != want["size"]:
            raise BundleError(f"{where}: {rel} ends after {size} of {want['size']} bytes: the bundle is truncated. "
                              "Nothing was imported.", field=rel)
        if sha != want["sha256"]:
            raise BundleError(f"{where}: {rel} has sha256 {sha} but {MANIFEST} records {want['sha256']}: the bundle "
                              "was changed or damaged. Nothing was imported.", field=rel)
    missing = sorted(set(files) - seen)
    if missing:
        raise BundleError(f"{where}: {MANIFEST} lists {missing[0]}" + (f" (and {len(missing) - 1} more)"
                          if len(missing) > 1 else "") + " but the bundle does not hold it: it is incomplete. "
                          "Nothing was imported.", field=missing[0])
    # The artifact's own checksums.json must vouch for exactly the same bytes.
    try:
        listed = _parse_manifest(artifact / CHECKSUMS, f"{where}: files/")
    except StoreError as exc:
        raise BundleError(exc.message) from None
    payload = {rel: entry for rel, entry in files.items() if rel != CHECKSUMS}
    if set(listed) != set(payload) or any(listed[r]["sha256"] != payload[r]["sha256"] for r in payload):
        raise BundleError(f"{where}: the artifact's {CHECKSUMS} does not list the same files and sha256 as "
                          f"{MANIFEST}. Nothing was imported.", field=CHECKSUMS)
    return manifest


def _check_manifest(manifest, where: str, max_bytes: int) -> dict[str, dict]:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{where}: {MANIFEST} is not a {FORMAT} manifest. Nothing was imported.", field=MANIFEST)
    adapter, files = manifest.get("adapter"), manifest.get("files")
    if not isinstance(adapter, dict) or not isinstance(adapter.get("name"), str) or not isinstance(
            adapter.get("version"), int) or not isinstance(manifest.get("farm_id"), str):
        raise BundleError(f"{where}: {MANIFEST} lacks the adapter's name, version or farm_id", field=MANIFEST)
    if not re.match(ADAPTER_NAME_PATTERN, adapter["name"]):
        raise BundleError(f"{where}: adapter name {adapter['name'][:70]!r} is not a valid adapter name", field=MANIFEST)
    if not isinstance(files, dict) or CHECKSUMS not in files:
        raise BundleError(f"{where}: {MANIFEST} lists no files (or no {CHECKSUMS})", field=MANIFEST)
    total = 0
    for rel, entry in files.items():
        try:
            validate_key(rel)
        except StoreError:
            raise BundleError(f"{where}: {MANIFEST} lists an unsafe path {rel[:100]!r}; refusing the bundle") from None
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and entry["size"] >= 0
                and isinstance(entry.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])):
            raise BundleError(f"{where}: {MANIFEST} has a malformed entry for {rel!r}", field=rel)
        total += entry["size"]
    if total > max_bytes:
        raise BundleError(f"{where}: the bundle's files add up to {total} bytes, more than FARM_BUNDLE_MAX_BYTES "
                          f"({max_bytes}); raise it to import this adapter")
    return files
