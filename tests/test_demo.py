"""`farm demo`, the README's first command, end to end: it starts its own CPU worker through the supervisor."""

from __future__ import annotations

import subprocess
import sys



def test_demo_trains_pulls_loads_and_prints_provenance(farm_stack, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "farm.cli.main", "demo", "--workdir", str(tmp_path / "demo"),
                           "--steps", "8"], env={**farm_stack.env, "COLUMNS": "200"}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "state succeeded" in out and "sha256 verified" in out
    assert "with the adapter:" in out and "base model says:" in out
    assert "training questions exactly as trained" in out  # issue 16: the demo shows what the adapter learned
    assert "Setting accelerator" not in out + proc.stderr and "it/s]" not in out + proc.stderr  # no library noise
    assert "demo-chat:1 (train)" in out and "adapter_model.safetensors" in out and "torch 2." in out
    assert (tmp_path / "demo" / "pulled" / "demo-chat-v1" / "checksums.json").exists()
    leftovers = subprocess.run(["pgrep", "-f", "farm.cli.main worker"], capture_output=True, text=True).stdout
    assert not any(pid.strip() for pid in leftovers.splitlines() if int(pid) != proc.pid), "the demo's worker survived"
