"""scripts/gpu-check's CPU half: every section runs and writes its figures (the GPU half runs on a device machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_every_section_on_the_cpu_and_writes_json(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "FARM_HASH_CACHE": "off"}
    run = subprocess.run([str(ROOT / "scripts" / "gpu-check"), "--cpu", "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=600)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    failed = {k: v.get("error") for k, v in report["sections"].items() if not v["ok"]}
    assert run.returncode == 0 and not failed, (failed, run.stdout[-2000:], run.stderr[-2000:])
    assert report["device"] == "cpu" and report["bits"] == 4
    sections = report["sections"]
    warm = sections["runner_job"]["warm"]
    assert warm["timings"]["train_seconds"] > 0 and warm["done_to_exit_seconds"] < 5
    assert sections["loop_vs_plain"]["median_ratio"] > 0
    assert "k2" in sections["cotrain"] or "skipped" in sections["cotrain"]
    assert sections["extraction"]["max_rho_certified"] <= 1.01
