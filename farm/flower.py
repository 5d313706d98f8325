"""Flower, the Celery dashboard, started against the farm's broker with basic auth and persistent state.

    python -m farm.flower --port 5555 --address 0.0.0.0   # FARM_FLOWER_BASIC_AUTH=user:password required
    python -m farm.flower --port 5555 --no-auth           # only behind a proxy that does its own auth

The password travels to Flower in the FLOWER_BASIC_AUTH environment variable, never on the command line, where
any user of the machine could read it in the process list.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from farm.errors import FarmError
from farm.settings import FarmSettings, get_settings
from farm.stats import JOB_DURATION_BUCKETS_S

# Flower's task-runtime histogram stops at 10 s by default; training jobs run for hours: the farm's job-duration
# buckets (farm.stats), the API's histogram's too, so both dashboards line up.
RUNTIME_BUCKETS_S = JOB_DURATION_BUCKETS_S
STATE_SAVE_INTERVAL_MS = 60_000
CELERY_APP = "farm.queue:celery_app"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def flower_command(settings: FarmSettings | None = None, port: int = 5555, *, address: str = "127.0.0.1") -> list[str]:
    """The command line that starts Flower for this farm (secrets are not on it; see flower_env)."""
    settings = settings or get_settings()
    db = (settings.home / "flower.db").expanduser().absolute()
    return [
        sys.executable, "-m", "celery", "-A", CELERY_APP, "flower",
        f"--port={int(port)}",
        f"--address={address}",
        # Task history survives restarts; saved every minute too, so a crash loses at most that.
        "--persistent=True",
        f"--db={db}",
        f"--state_save_interval={STATE_SAVE_INTERVAL_MS}",
        "--task_runtime_metric_buckets=" + ",".join(_number(b) for b in RUNTIME_BUCKETS_S),
    ]


def flower_env(settings: FarmSettings | None = None, *, no_auth: bool = False,
               base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower: the farm's broker, and basic auth from settings.flower_basic_auth.

    Raises FarmError when no credentials are set (or they are not `user:password`) unless `no_auth` is given.
    """
    settings = settings or get_settings()
    env = dict(os.environ if base is None else base)
    env["FARM_BROKER_URL"] = settings.broker_url  # farm.queue builds its Celery app from this
    if no_auth:
        return env
    credentials = settings.flower_basic_auth.get_secret_value() if settings.flower_basic_auth else ""
    if not credentials:
        raise FarmError("Flower has no login of its own: set FARM_FLOWER_BASIC_AUTH=user:password, or pass "
                        "--no-auth to run it open (only behind a proxy that checks who comes in)",
                        field="flower_basic_auth")
    pairs = credentials.split(",")
    if any(":" not in p or not p.split(":", 1)[0] or not p.split(":", 1)[1] for p in pairs):
        raise FarmError("FARM_FLOWER_BASIC_AUTH must be user:password (several separated by commas), with a "
                        "non-empty user and password", field="flower_basic_auth")
    env["FLOWER_BASIC_AUTH"] = credentials
    return env


def run_flower(port: int = 5555, settings: FarmSettings | None = None, *, address: str = "127.0.0.1",
               no_auth: bool = False) -> NoReturn:
    """Become Flower: check the auth settings, then replace this process with Flower (signals reach it directly,
    as a container's stop needs)."""
    settings = settings or get_settings()
    env = flower_env(settings, no_auth=no_auth)
    settings.home.expanduser().mkdir(parents=True, exist_ok=True)
    command = flower_command(settings, port, address=address)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, env)


def build_parser():
    """The command line of `python -m farm.flower` (what docker-compose runs)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m farm.flower", description="Start Flower for this farm.")
    parser.add_argument("--port", type=int, default=5555)
    parser.add_argument("--address", default="127.0.0.1", help="interface to listen on (0.0.0.0: all)")
    parser.add_argument("--no-auth", action="store_true", help="run without basic auth (behind your own proxy)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """`python -m farm.flower [--port P] [--address A] [--no-auth]`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run_flower(args.port, address=args.address, no_auth=args.no_auth)
    except FarmError as exc:
        parser.exit(2, f"error: {exc.message}\n")


if __name__ == "__main__":
    main()
