"""Shared fixtures. Each area keeps its own fixtures in tests/fixtures/<area>.py, registered here."""

from __future__ import annotations

import os

pytest_plugins = [
    "tests.fixtures.services",
    "tests.fixtures.s3",
    "tests.fixtures.models",
    "tests.fixtures.farm",
]

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# 2 cores shared by the test process and its workers: one torch thread each avoids oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
