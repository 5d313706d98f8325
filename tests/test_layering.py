"""Imports point one way: `farm/` is the library; the CLI (`farm/cli/`), `api/` and `workers/` are front doors on it.

The rules, checked on every module's imports (read with `ast`, nothing is imported):

1. The library (`farm/` outside `farm/cli/`) imports no front door: not `farm.cli`, `api` or `workers`.
2. No other front door imports the CLI: `api/` and `workers/` never import `farm.cli`.
3. The CLI may start another front door (`farm worker`, `farm api`), but only from inside the command that starts
   it (an import in a function body), never at module level: importing the CLI loads no API and no worker.

An import inside `if TYPE_CHECKING:` counts like any other: the arrow still points that way.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRONT_DOORS = ("farm.cli", "api", "workers")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, node: ast.ImportFrom) -> list[str]:
    """What an ImportFrom may bring in: its module and each `module.name` (`from farm import cli` is farm.cli),
    relative forms resolved against the importing module."""
    if node.level:
        package = module.split(".")
        base = ".".join(package[: len(package) - node.level + (1 if _is_package(module) else 0)])
        prefix = f"{base}.{node.module}" if node.module else base
    else:
        prefix = node.module or ""
    return [prefix] + [f"{prefix}.{alias.name}" for alias in node.names if alias.name != "*"]


def _is_package(module: str) -> bool:
    return (ROOT / Path(*module.split(".")) / "__init__.py").exists()


def imports_of(path: Path) -> list[tuple[list[str], int, bool]]:
    """(names it may import, line, at module level) for every import statement in the file."""
    module = _module_name(path)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[list[str], int, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend(([alias.name], child.lineno, top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                found.append((_resolve(module, child), child.lineno, top))
            nested = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, nested)

    visit(tree, True)
    return found


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def violations() -> list[str]:
    out = []
    for path in _sources("farm", "api", "workers"):
        module = _module_name(path)
        where = path.relative_to(ROOT)
        in_cli = _within(module, "farm.cli")
        for names, line, top in imports_of(path):
            if in_cli:
                forbidden = ("api", "workers") if top else ()
                what = "the CLI imports {} at module level (import it inside the command that starts it)"
            elif _within(module, "farm"):
                forbidden, what = FRONT_DOORS, "the library imports the front door {}"
            else:
                forbidden, what = ("farm.cli",), module.split(".")[0] + "/ imports the CLI ({})"
            hit = next((n for n in names if any(_within(n, f) for f in forbidden)), None)
            if hit:
                out.append(f"{where}:{line}: " + what.format(hit))
    return out


def test_imports_point_from_the_front_doors_to_the_library():
    found = violations()
    assert not found, "imports against the layering (see tests/test_layering.py):\n" + "\n".join(found)


@pytest.mark.parametrize("source, module, expected", [
    ("from api.app import serve\n", "farm/service.py", "the library imports the front door api"),
    ("def f():\n    import workers.tasks\n", "farm/queue.py", "the library imports the front door workers.tasks"),
    ("from farm.cli import render\n", "api/routes/x.py", "api/ imports the CLI"),
    ("from ..cli import render\n", "workers/x.py", None),  # relative: resolves to `cli`, outside the farm package
    ("from workers.supervisor import run_supervisor\n", "farm/cli/main.py", "the CLI imports workers.supervisor"),
    ("def worker():\n    from workers.supervisor import run_supervisor\n", "farm/cli/main.py", None),
    ("from .render import console\n", "farm/cli/demo.py", None),
    ("from .cli import render\n", "farm/demo.py", "the library imports the front door farm.cli"),
    ("from farm import cli\n", "farm/x.py", "the library imports the front door farm.cli"),
    ("from farm import service\n", "workers/x.py", None),
    ("if True:\n    import api.app\n", "farm/cli/main.py", "the CLI imports api.app at module level"),
])
def test_the_checker_catches_what_it_should(tmp_path, monkeypatch, source, module, expected):
    """The rules applied to small made-up modules: each kind of violation is caught, allowed imports are not."""
    fake_root = tmp_path / "repo"
    target = fake_root / module
    for folder in ("farm", "farm/cli", "api", "api/routes", "workers"):
        (fake_root / folder).mkdir(parents=True, exist_ok=True)
        (fake_root / folder / "__init__.py").touch()
    target.write_text(source)
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", fake_root)
    found = violations()
    if expected is None:
        assert found == []
    else:
        assert len(found) == 1 and expected in found[0], found


def _ignored_by_git(path: Path) -> bool:
    """A build output or cache folder (git ignores it); False where git cannot tell."""
    import subprocess

    try:
        return subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", str(path)], timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def test_the_readme_layout_table_matches_the_folders():
    """Every folder of the tree is in the README's Layout table, and every folder the table names exists."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text[text.index("## Layout"):].split("\n## ", 1)[0]
    named = {row.split("`")[1].rstrip("/") for row in table.splitlines() if row.startswith("| `")}
    top = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
           and not p.name.endswith(".egg-info") and not _ignored_by_git(p) and any(p.iterdir())}
    assert top <= named, f"folders missing from the README's Layout table: {sorted(top - named)}"
    assert all((ROOT / folder).is_dir() for folder in named), sorted(f for f in named if not (ROOT / f).is_dir())
