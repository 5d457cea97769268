"""The code base stays ruff clean (configuration in ruff.toml)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_is_clean():
    ruff = shutil.which("ruff")
    cmd = [ruff] if ruff else [sys.executable, "-m", "ruff"]
    result = subprocess.run([*cmd, "check", "reid_lite", "tools", "tests", "setup.py"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_module_imports_a_private_name_from_the_package():
    """A name another module needs gets a public face: no `from reid_lite... import _x` in the package or tools
    (tests may reach into internals)."""
    import ast

    bad = []
    for path in sorted([*(ROOT / "reid_lite").rglob("*.py"), *(ROOT / "tools").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("reid_lite")):
                bad += [f"{path.relative_to(ROOT)}:{node.lineno} imports {a.name}"
                        for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, bad
