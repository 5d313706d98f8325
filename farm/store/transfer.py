"""Folders to and from the store: upload with checksums.json written last, download verified then renamed in place.

checksums.json (at the root of the uploaded folder):
    {"algorithm": "sha256", "files": {"adapter_config.json": {"size": 712, "sha256": "9f2c..."}, ...}}
It lists every other file of the folder. Because it is written last, its presence means the upload finished.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import uuid
from pathlib import Path

from farm.errors import ChecksumMismatch, NotFound, StoreError
from farm.store.base import Store, validate_key, validate_prefix
from farm.store.local import TMP_MARK, write_atomically

CHECKSUMS = "checksums.json"
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def _folder(prefix: str) -> str:
    """`prefix` as a folder key ending in '/', so that 'v1' never also matches 'v10/...'."""
    folder = (prefix or "").strip("/")
    if not folder:
        raise StoreError("an empty prefix names the whole store: give the artifact's folder, like 'adapters/x/v1'")
    validate_prefix(folder)
    return folder + "/"


def _record(path: str, info) -> dict:
    return {"path": path, "size": info.size, "sha256": info.sha256, "etag": info.etag}


def _local_files(local_dir: Path) -> list[str]:
    """Relative POSIX paths of every file under `local_dir` except the root checksums.json, sorted."""
    files = []
    for dirpath, dirnames, filenames in os.walk(local_dir):
        for name in dirnames:
            if os.path.islink(os.path.join(dirpath, name)):
                raise StoreError(
                    f"cannot upload {local_dir}: {os.path.join(dirpath, name)} is a symlinked folder; "
                    "copy its content in instead"
                )
        rel_dir = Path(dirpath).relative_to(local_dir).as_posix()
        for name in filenames:
            if name.startswith(TMP_MARK):  # a write of ours still running or interrupted: not part of the tree
                continue
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if rel == CHECKSUMS:
                continue
            try:
                validate_key(rel)
            except StoreError as exc:
                raise StoreError(
                    f"cannot upload {local_dir / rel}: its name is not a valid key ({exc.message})"
                ) from None
            files.append(rel)
    return sorted(files)


def upload_tree(store: Store, local_dir: Path, prefix: str) -> list[dict]:
    """Upload every file under `local_dir` to `prefix`/, then checksums.json LAST; return one record per file.

    Each record is ``{"path", "size", "sha256", "etag"}``; the last one is checksums.json's own. The manifest is
    also written into `local_dir`, so the local folder is the complete artifact. An old checksums.json under the
    prefix is removed first and objects under the prefix that are not part of this folder are deleted before the
    new manifest appears, so the prefix ends up holding exactly this folder.
    """
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise StoreError(f"cannot upload {local_dir}: it is not a folder")
    folder = _folder(prefix)
    files = _local_files(local_dir)
    if not files:
        raise StoreError(f"cannot upload {local_dir}: it holds no files")

    # A manifest left by an earlier, interrupted upload must not vouch for the files being replaced now.
    store.delete(folder + CHECKSUMS)
    records = [_record(rel, store.put_file(local_dir / rel, folder + rel)) for rel in files]
    wanted = {folder + rel for rel in files}
    for key in store.list_keys(folder):
        if key not in wanted:
            store.delete(key)

    manifest = {
        "algorithm": "sha256",
        "files": {r["path"]: {"size": r["size"], "sha256": r["sha256"]} for r in records},
    }
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    write_atomically(local_dir / CHECKSUMS, io.BytesIO(data))
    records.append(_record(CHECKSUMS, store.put_bytes(data, folder + CHECKSUMS)))
    return records


def download_tree(store: Store, prefix: str, dest: Path, expected: dict[str, str] | None = None) -> list[dict]:
    """Download the artifact at `prefix`/ to `dest`, every file verified, or raise and leave nothing at `dest`.

    checksums.json must be present and list exactly the other files; each file's sha256 and size must match it,
    and match `expected` (relpath -> sha256, usually from the catalog) when given, in which case `expected` must
    name exactly the same files (checksums.json may be in it too, and is then checked). Files land in a temporary
    folder beside `dest` that is renamed to `dest` only after everything passed. `dest` must not exist or be an
    empty folder. Returns ``{"path", "size", "sha256", "etag"}`` per file, checksums.json last.
    Raises ChecksumMismatch (a digest or the file set differs), NotFound (nothing under the prefix), StoreError.
    """
    return _download(store, prefix, Path(dest), expected, require_manifest=True)


def download_prefix(store: Store, prefix: str, dest: Path, expected: dict[str, str] | None = None) -> list[dict]:
    """Like download_tree, for folders that may lack checksums.json (checkpoints, datasets).

    When checksums.json is there, it is enforced exactly as in download_tree; `expected` is always enforced.
    """
    return _download(store, prefix, Path(dest), expected, require_manifest=False)


def _check_dest(dest: Path) -> None:
    what = None
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        what = "is not a folder"
    elif dest.is_dir() and any(dest.iterdir()):
        what = "is not empty"
    if what:
        raise StoreError(f"the destination {dest} already exists and {what}: choose another destination or remove it")


def _parse_manifest(path: Path, where: str) -> dict[str, dict]:
    """The `files` table of a checksums.json, each entry checked; StoreError naming what is malformed."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(
            f"{where}{CHECKSUMS} is not valid JSON ({exc}); the artifact is damaged: re-publish it"
        ) from None
    well_formed = isinstance(manifest, dict) and isinstance(manifest.get("files"), dict)
    if not well_formed or manifest.get("algorithm") != "sha256":
        raise StoreError(
            f"{where}{CHECKSUMS} is malformed: expected "
            '{"algorithm": "sha256", "files": {...}}; re-publish the artifact'
        )
    files = manifest["files"]
    for rel, entry in files.items():
        try:
            validate_key(rel)
        except StoreError as exc:
            raise StoreError(f"{where}{CHECKSUMS} lists an unsafe path {rel!r} ({exc.message}); refusing it") from None
        if (
            rel == CHECKSUMS
            or not isinstance(entry, dict)
            or not isinstance(entry.get("size"), int)
            or entry["size"] < 0
            or not isinstance(entry.get("sha256"), str)
            or not _SHA256_HEX.match(entry["sha256"])
        ):
            raise StoreError(
                f"{where}{CHECKSUMS} has a malformed entry for {rel!r}: expected {{\"size\": N, \"sha256\": HEX}}; "
                "re-publish the artifact"
            )
    return files


def _verify(rel: str, got: str, want: str | None, source: str, where: str, dest: Path) -> None:
    if want is not None and got != want:
        raise ChecksumMismatch(
            f"checksum mismatch for {rel} at {where}{rel}: {source} records sha256 {want} but the downloaded bytes "
            f"have sha256 {got}; the stored artifact is corrupt or was changed. Nothing was written to {dest}.",
            field=rel,
        )


def _download(
    store: Store, prefix: str, dest: Path, expected: dict[str, str] | None, *, require_manifest: bool
) -> list[dict]:
    folder = _folder(prefix)
    where = f"{store.uri_root()}{folder}"
    _check_dest(dest)
    keys = store.list_keys(folder)
    if not keys:
        raise NotFound(f"nothing is stored under {where}; check the name and version")
    rels = [key[len(folder) :] for key in keys]
    for rel in rels:
        try:
            validate_key(rel)
        except StoreError:
            raise StoreError(f"{where} holds an object with an unsafe name {rel!r}; refusing to download it") from None
    has_manifest = CHECKSUMS in rels
    if require_manifest and not has_manifest:
        raise StoreError(
            f"{where} has no {CHECKSUMS}: the upload did not finish, or this is not an artifact. "
            "Nothing was downloaded."
        )
    payload = [rel for rel in rels if rel != CHECKSUMS]

    dest.parent.mkdir(parents=True, exist_ok=True)
    # Beside dest (same filesystem) so the final rename is atomic; the mark keeps it out of anyone's way.
    tmp = dest.parent / f"{TMP_MARK}{uuid.uuid4().hex[:12]}-{dest.name}"
    tmp.mkdir()
    try:
        records = []
        manifest: dict[str, dict] | None = None
        manifest_record = None
        if has_manifest:
            info = store.get_file(folder + CHECKSUMS, tmp / CHECKSUMS)
            if expected is not None:
                _verify(CHECKSUMS, info.sha256, expected.get(CHECKSUMS), "the catalog", where, dest)
            manifest = _parse_manifest(tmp / CHECKSUMS, where)
            manifest_record = _record(CHECKSUMS, info)
            _check_file_sets(set(payload), set(manifest), f"{CHECKSUMS}", where, dest)
        if expected is not None:
            catalog = {rel: sha for rel, sha in expected.items() if rel != CHECKSUMS}
            _check_file_sets(set(payload), set(catalog), "the catalog", where, dest)
            if manifest is not None:
                # Both records exist before any byte is fetched: disagreeing records need no download to refuse.
                for rel in payload:
                    if manifest[rel]["sha256"] != catalog[rel]:
                        raise ChecksumMismatch(
                            f"checksum mismatch for {rel} at {where}{rel}: the catalog records sha256 {catalog[rel]} "
                            f"but {CHECKSUMS} records {manifest[rel]['sha256']}; the stored artifact is not the one "
                            f"published. Nothing was written to {dest}.",
                            field=rel,
                        )

        for rel in payload:
            info = store.get_file(folder + rel, tmp / rel)
            if manifest is not None:
                _verify(rel, info.sha256, manifest[rel]["sha256"], CHECKSUMS, where, dest)
                if info.size != manifest[rel]["size"]:
                    raise ChecksumMismatch(
                        f"size mismatch for {rel} at {where}{rel}: {CHECKSUMS} records {manifest[rel]['size']} bytes, "
                        f"the download has {info.size}. Nothing was written to {dest}.",
                        field=rel,
                    )
            if expected is not None:
                _verify(rel, info.sha256, expected[rel], "the catalog", where, dest)
            records.append(_record(rel, info))
        if manifest_record is not None:
            records.append(manifest_record)

        try:
            os.rename(tmp, dest)  # POSIX: atomic, and replaces dest only if it is an empty folder
        except OSError as exc:
            raise StoreError(
                f"cannot move the verified download into {dest}: {exc.strerror or exc}; "
                "choose another destination or remove it"
            ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return records


def _check_file_sets(stored: set[str], listed: set[str], source: str, where: str, dest: Path) -> None:
    def first(names: list[str]) -> str:
        return names[0] + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")

    if missing := sorted(listed - stored):
        raise ChecksumMismatch(f"{source} lists {first(missing)} but {where} does not hold it: the artifact is "
                               f"incomplete. Nothing was written to {dest}.", field=missing[0])
    if extra := sorted(stored - listed):
        raise ChecksumMismatch(f"{where} holds {first(extra)}, which {source} does not list: an unverified file is "
                               f"refused. Nothing was written to {dest}.", field=extra[0])
