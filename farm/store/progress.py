"""A store seen through a byte counter: what a progress bar on a pull, an upload or a publish listens to.

    counted = CountingStore(store, on_bytes=bar.advance)
    download_tree(counted, prefix, dest)   # bar.advance(size) after each file
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from farm.store.base import ObjectInfo


class CountingStore:
    """Delegates everything to `store`; reports the size of every file moved by get_file / put_file / put_bytes."""

    def __init__(self, store, on_bytes: Callable[[int], None]):
        self._store = store
        self._on_bytes = on_bytes

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    def get_file(self, key: str, path: Path) -> ObjectInfo:
        info = self._store.get_file(key, path)
        self._on_bytes(info.size)
        return info

    def put_file(self, path: Path, key: str) -> ObjectInfo:
        info = self._store.put_file(path, key)
        self._on_bytes(info.size)
        return info

    def put_bytes(self, data: bytes, key: str) -> ObjectInfo:
        info = self._store.put_bytes(data, key)
        self._on_bytes(info.size)
        return info
