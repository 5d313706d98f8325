"""Moved to farm/environment.py (one environment record for every job kind). Kept only because workers/zygote.py
still names this module in its preload list; drop it once that list says farm.environment."""

from farm.environment import PACKAGES, device_info, environment, package_version  # noqa: F401
