"""Digests of large local files, computed once per file identity.

Hashing a 16 GB base model costs ~16 s per job; the same files are hashed again by every job on the host. A
digest is kept against the file's identity: (path, device, inode, size, mtime_ns, ctime_ns). Any write to the file
changes its mtime and ctime (ctime cannot be set back from user space, unlike mtime), a replaced file has a new
inode, so a changed file misses the cache and is hashed again; an unchanged one costs one stat.

The cache is a SQLite file (stdlib, safe across the processes of one host): `FARM_HASH_CACHE` names it, default
`$XDG_CACHE_HOME/farm/file-digests.sqlite3` (~/.cache/...); `FARM_HASH_CACHE=off` turns it off. A cache that cannot
be opened or written is skipped silently: the digest is then computed, never guessed.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Callable

OFF = ("off", "0", "false", "none", "")


def cache_path() -> Path | None:
    """Where the digests are kept, or None when the cache is turned off."""
    configured = os.environ.get("FARM_HASH_CACHE")
    if configured is not None:
        return None if configured.strip().lower() in OFF else Path(configured).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "farm" / "file-digests.sqlite3"


def _identity(path: Path) -> tuple[str, int, int, int, int, int]:
    real = path.resolve()
    st = real.stat()
    return str(real), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _connect() -> sqlite3.Connection | None:
    where = cache_path()
    if where is None:
        return None
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(where, timeout=5)
        conn.execute("CREATE TABLE IF NOT EXISTS digests (path TEXT, dev INTEGER, ino INTEGER, size INTEGER, "
                     "mtime_ns INTEGER, ctime_ns INTEGER, algo TEXT, digest TEXT, "
                     "PRIMARY KEY (path, algo))")
        return conn
    except (OSError, sqlite3.Error):
        return None


def lookup(path: str | Path, algo: str = "sha256") -> str | None:
    """The digest recorded for this file as it is now, or None (never hashed, changed since, or no cache)."""
    conn = _connect()
    if conn is None:
        return None
    try:
        real, *ident = _identity(Path(path))
        row = conn.execute("SELECT dev, ino, size, mtime_ns, ctime_ns, digest FROM digests WHERE path=? AND algo=?",
                           (real, algo)).fetchone()
        return row[5] if row is not None and list(row[:5]) == ident else None
    except (OSError, sqlite3.Error):
        return None
    finally:
        conn.close()


def remember(path: str | Path, digest: str, algo: str = "sha256", identity: tuple | None = None) -> None:
    """Record `digest` for the file as it is now (or as it was at `identity`, taken before it was read)."""
    conn = _connect()
    if conn is None:
        return
    try:
        ident = identity or _identity(Path(path))
        if ident != _identity(Path(path)):  # changed while it was being hashed: the digest describes neither
            return
        with conn:
            conn.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (*ident, algo, digest))
    except (OSError, sqlite3.Error):
        pass
    finally:
        conn.close()


def cached_digest(path: str | Path, compute: Callable[[Path], str], algo: str = "sha256") -> str:
    """compute(path) once per file identity; later calls on the unchanged file return the recorded digest."""
    path = Path(path)
    found = lookup(path, algo)
    if found is not None:
        return found
    identity = _identity(path)
    digest = compute(path)
    remember(path, digest, algo, identity)
    return digest


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, from the cache when the file is unchanged since it was last hashed."""
    from farm.store.base import sha256_file

    return cached_digest(path, sha256_file)
