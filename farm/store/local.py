"""The file:// store: objects are files under one folder, written atomically (temp file + os.replace)."""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path

from farm.errors import NotFound, StoreError
from farm.store.base import (
    HashingReader,
    HashingWriter,
    ObjectInfo,
    Store,
    copy_stream,
    open_source,
    require_prefix_to_delete,
    validate_key,
    validate_prefix,
)

# Temp files carry this mark so listings skip them: a reader never sees a file that is still being written.
TMP_MARK = ".farm-tmp-"


def temp_path_beside(path: Path) -> Path:
    """A unique temp name in `path`'s folder (same filesystem, so os.replace onto `path` is atomic)."""
    return path.with_name(f"{TMP_MARK}{uuid.uuid4().hex[:12]}-{path.name}")


def write_atomically(path: Path, source, *, hashing: bool = True) -> HashingWriter:
    """Stream `source` (anything with read()) into `path` through a temp file, fsync, then os.replace.

    Returns the HashingWriter, whose digest and byte count cover exactly what was written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_beside(path)
    try:
        with open(tmp, "wb") as f:
            writer = HashingWriter(f)
            copy_stream(source, writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return writer


class LocalStore(Store):
    """Objects as files under `root` (created if missing). ETags are None; presigned URLs do not exist here."""

    def __init__(self, root: Path | str):
        self.root = Path(root).expanduser().absolute()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the store folder {self.root}: {exc.strerror or exc}; "
                "set FARM_STORE_URL to a writable file://DIR"
            ) from None

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def uri(self, key: str) -> str:
        return f"file://{self._path(key)}"

    def uri_root(self) -> str:
        return f"file://{self.root}/"

    def put_file(self, path: Path, key: str) -> ObjectInfo:
        target = self._path(key)
        with open_source(Path(path)) as f:
            reader = HashingReader(f)
            self._write(target, reader, key)
        return ObjectInfo(key=key, size=reader.bytes_read, sha256=reader.hexdigest(), etag=None)

    def put_bytes(self, data: bytes, key: str) -> ObjectInfo:
        target = self._path(key)
        writer = self._write(target, io.BytesIO(bytes(data)), key)
        return ObjectInfo(key=key, size=writer.bytes_written, sha256=writer.hexdigest(), etag=None)

    def _write(self, target: Path, source, key: str) -> HashingWriter:
        try:
            return write_atomically(target, source)
        except (NotADirectoryError, IsADirectoryError, FileExistsError):
            raise StoreError(
                f"cannot store {key!r} in {self.uri_root()}: a part of the key is already used as a file or folder "
                "by another key; choose another key"
            ) from None

    def _open_object(self, key: str):
        source = self._path(key)
        if source.name.startswith(TMP_MARK):
            raise NotFound(f"no object {key!r} in the store {self.uri_root()}")
        try:
            return open(source, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"no object {key!r} in the store {self.uri_root()}") from None

    def get_file(self, key: str, path: Path) -> ObjectInfo:
        with self._open_object(key) as f:
            writer = write_atomically(Path(path), f)
        return ObjectInfo(key=key, size=writer.bytes_written, sha256=writer.hexdigest(), etag=None)

    def get_bytes(self, key: str) -> bytes:
        with self._open_object(key) as f:
            return f.read()

    def exists(self, key: str) -> bool:
        path = self._path(key)
        return path.is_file() and not path.name.startswith(TMP_MARK)

    def list_keys(self, prefix: str) -> list[str]:
        validate_prefix(prefix)
        # Walk only the deepest folder the prefix names, then filter by the plain string prefix (S3 semantics).
        folder = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        keys = []
        for dirpath, _dirnames, filenames in os.walk(folder):
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith(TMP_MARK):
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_file():
            path.unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        require_prefix_to_delete(prefix)
        folders = set()
        for key in self.list_keys(prefix):
            path = self.root / key
            path.unlink(missing_ok=True)
            folders.add(path.parent)
        # Remove folders left empty, deepest first, never the root itself.
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            while folder != self.root and self.root in folder.parents:
                try:
                    folder.rmdir()
                except OSError:
                    break
                folder = folder.parent

    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None:
        validate_key(key)
        return None
