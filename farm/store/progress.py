"""A store seen through a byte counter: what a progress bar on a pull, an upload or a publish listens to.

    counted = CountingStore(store, on_bytes=bar.advance)
    download_tree(counted, prefix, dest)   # bar.advance(size) after each file

`transfer_bars(factory)` lets a caller deep in the service layer (a local `farm submit` storing its dataset) find
the CLI's bar factory without every function passing it on: `counted_transfer(label, total)` yields the bar's
advance, or None when no bar was asked for.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
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


_BARS: ContextVar[Callable | None] = ContextVar("farm_transfer_bars", default=None)


@contextmanager
def transfer_bars(factory: Callable | None) -> Iterator[None]:
    """Within this block, `counted_transfer` draws bars with `factory(label, total)` (a context manager with
    advance(n), like farm.cli.render.TransferProgress); None: no bars."""
    token = _BARS.set(factory)
    try:
        yield
    finally:
        _BARS.reset(token)


@contextmanager
def counted_transfer(label: str, total: int | None) -> Iterator[Callable[[int], None] | None]:
    """The advance(n) of a bar for `label`, when a `transfer_bars` block asked for bars; else None."""
    factory = _BARS.get()
    if factory is None:
        yield None
        return
    with factory(label, total) as bar:
        yield bar.advance
