"""Moved to farm/environment.py (one environment record for every job kind); importable from here as before."""

from farm.environment import PACKAGES, device_info, environment, package_version  # noqa: F401
