"""What every object store offers, key rules, and the hashing wrappers that checksum bytes as they stream."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from farm.digests import CHUNK_SIZE, sha256_file  # noqa: F401  (re-exported: farm.store.sha256_file)
from farm.errors import StoreError



@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key (relative to the store), size in bytes, sha256 (hex) and S3 ETag (None on file://).

    The ETag is given without the surrounding quotes S3 puts on it; a multipart upload's ETag ends in ``-<parts>``.
    """

    key: str
    size: int
    sha256: str
    etag: str | None = None


def validate_key(key: str) -> str:
    """Return `key` if it is a canonical relative POSIX key (``adapters/x/v1/a.json``); raise StoreError otherwise.

    Refused: empty keys, absolute paths, backslashes, ``..`` or ``.`` parts and empty parts (``a//b``, ``a/``),
    because each of them could escape the store's folder or name one object two ways.
    """
    if not isinstance(key, str) or not key:
        raise StoreError(f"invalid store key {key!r}: a key is a non-empty relative path like 'adapters/x/v1/a.json'")
    if "\\" in key:
        raise StoreError(f"invalid store key {key!r}: backslashes are not allowed; use '/' between parts")
    if key.startswith("/"):
        raise StoreError(
            f"invalid store key {key!r}: absolute paths are not allowed; give a path relative to the store"
        )
    if "\x00" in key:
        raise StoreError(f"invalid store key {key!r}: NUL characters are not allowed")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise StoreError(
                f"invalid store key {key!r}: empty, '.' and '..' parts are not allowed; "
                "write the plain relative path (no '..', no '//', no trailing '/')"
            )
    return key


def validate_prefix(prefix: str) -> str:
    """Return `prefix` if it is empty or a key, optionally ending in ``/``; raise StoreError otherwise."""
    if prefix == "":
        return prefix
    validate_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


class HashingReader:
    """A read-only, non-seekable view of a binary file that hashes every byte handed out.

    Non-seekable on purpose: boto3's transfer manager then reads the stream once, in order, so the digest covers
    exactly the bytes that were sent (a seekable source could be re-read or read out of order by part workers).
    """

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self._hash = hashlib.sha256()
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._hash.update(data)
        self.bytes_read += len(data)
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class HashingWriter:
    """A write-only, non-seekable file wrapper that hashes every byte written through it.

    Non-seekable on purpose: boto3's transfer manager then writes the parts in order (buffering those that arrive
    early), so the running digest is the digest of the file.
    """

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self._hash = hashlib.sha256()
        self.bytes_written = 0

    def write(self, data: bytes) -> int:
        self._raw.write(data)
        self._hash.update(data)
        self.bytes_written += len(data)
        return len(data)

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def copy_stream(reader, writer, chunk_size: int = CHUNK_SIZE) -> None:
    """Copy `reader` to `writer` in chunks (no whole-file buffering)."""
    while True:
        chunk = reader.read(chunk_size)
        if not chunk:
            return
        writer.write(chunk)


def open_source(path: Path) -> BinaryIO:
    """Open a local file for upload, with a StoreError that names it when it cannot be read."""
    try:
        return open(path, "rb")
    except IsADirectoryError:
        raise StoreError(f"cannot upload {path}: it is a folder, not a file (use upload_tree for folders)") from None
    except OSError as exc:
        raise StoreError(f"cannot upload {path}: {exc.strerror or exc}; check the path and its permissions") from None


class Store(ABC):
    """An object store holding bytes under relative POSIX keys. See farm.store.local and farm.store.s3.

    Every key is checked with `validate_key`; a missing key raises farm.errors.NotFound naming it.
    """

    @abstractmethod
    def uri(self, key: str) -> str:
        """The full URI of `key` (``file:///abs/path`` or ``s3://bucket/prefix/key``), for logs and provenance."""

    @abstractmethod
    def put_file(self, path: Path, key: str) -> ObjectInfo:
        """Upload a local file to `key`, hashing it while it streams (the file is read once)."""

    @abstractmethod
    def put_bytes(self, data: bytes, key: str) -> ObjectInfo:
        """Store `data` at `key`."""

    @abstractmethod
    def get_file(self, key: str, path: Path) -> ObjectInfo:
        """Download `key` to `path` (parents created; replaced atomically), hashing it while it streams."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The whole content of `key`."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored at `key`."""

    @abstractmethod
    def list_keys(self, prefix: str) -> list[str]:
        """Every key that starts with `prefix` (a plain string prefix: end it with '/' to list a folder), sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete the object at `key`; nothing happens when there is none."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Delete every object whose key starts with `prefix`. An empty prefix is refused (it would empty the store)."""

    @abstractmethod
    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None:
        """A time-limited HTTP GET URL for `key`, or None where the store has none (file://)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri_root()!r})"

    def uri_root(self) -> str:
        """The URI of the store's root (for messages)."""
        return self.uri("x")[:-1]


def require_prefix_to_delete(prefix: str) -> str:
    """Validate a prefix for delete_prefix: an empty one would wipe the whole store, so it is refused."""
    if not prefix or prefix == "/":
        raise StoreError("refusing to delete an empty prefix: that would delete the whole store; name a folder")
    return validate_prefix(prefix)

