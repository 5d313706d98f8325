"""File digests, once: the sha256 of a local file, streamed.

The library's lowest layer (the standard library only): the store's checksums, the model weight digests
(farm/model_files.py), the hash cache and the dataset uploads all hash files through here.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK_SIZE = 1024 * 1024
"""Bytes read at a time (1 MiB): a file is never held whole in memory."""


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a local file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()
