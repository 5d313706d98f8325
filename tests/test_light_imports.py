"""Producers are light (DESIGN invariant 3): the CLI, the service layer, the API and submit-time validation never
import torch or transformers."""

from __future__ import annotations

import subprocess
import sys

PRODUCER_MODULES = ["farm.cli.main", "farm.service", "farm.client", "farm.client_http", "api.app", "farm.store",
                    "farm.store.transfer", "farm.extraction.validate", "farm.model_files", "farm.queue",
                    "farm.stats", "farm.embedded"]


def test_producer_modules_do_not_import_torch():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in PRODUCER_MODULES)
            + "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', 'deepspeed') "
              "if m in sys.modules)\nprint(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"producer imports pulled in {out.stdout.strip()}"


def test_farm_help_runs_without_torch():
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom farm.cli.main import app\n"
            "r = CliRunner().invoke(app, ['--help'])\nassert r.exit_code == 0, r.output\n"
            "assert 'submit' in r.output\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
