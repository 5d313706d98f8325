"""A non-editable install carries what the farm needs at run time (issue 13): the Alembic migrations."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_carries_the_migrations_and_an_install_finds_them(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for folder in ("farm", "workers", "api", "migrations"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    versions = {p.name for p in (REPO / "migrations" / "versions").glob("*.py")}
    assert {"migrations/env.py", "migrations/script.py.mako"} <= names
    assert {f"migrations/versions/{v}" for v in versions} <= names

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip install puts into site-packages
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = ("import farm.catalog.migrate as m; print(m.__file__); print(m.migrations_dir()); "
             "print(m.head_revision())")
    out = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    module, folder, head = out.stdout.split()
    assert module.startswith(str(site)) and folder == str(site / "migrations")
    from farm.catalog.migrate import head_revision

    assert head == head_revision()
