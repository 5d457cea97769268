"""The suite tests what it claims: an extra installed incompletely fails, and CI fails on missing-module skips."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from extras import MISSING_MODULE, import_extra

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def test_extra_installed_incompletely_fails_instead_of_skipping(monkeypatch):
    """torchreid present but scipy (one of its import-time dependencies) missing: a failure, not a skip."""
    import_extra("torchreid", "torchreid")  # installed and complete here (the test extra)
    saved = {k: m for k, m in sys.modules.items() if k == "torchreid" or k.startswith("torchreid.")}
    try:
        for k in saved:
            del sys.modules[k]
        for k in [k for k in sys.modules if k == "scipy" or k.startswith("scipy.")] + ["scipy"]:
            monkeypatch.setitem(sys.modules, k, None)  # `import scipy(.io)` now raises ImportError
        with pytest.raises(pytest.fail.Exception, match=r"torchreid is installed but `import torchreid` fails "
                                                        r".*scipy.*\[torchreid\] extra is installed incompletely"):
            import_extra("torchreid", "torchreid")
    finally:
        for k in [k for k in sys.modules if k == "torchreid" or k.startswith("torchreid.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def test_extra_not_installed_skips_as_missing_module():
    with pytest.raises(pytest.skip.Exception, match=f"^{MISSING_MODULE} reid_lite_no_such_package: pip install"):
        import_extra("reid_lite_no_such_package.sub", "test")


SKIPPING = """
import pytest

def test_runs():
    pass

def test_needs_torchreid():
    pytest.skip("missing module torchreid: pip install -e '.[torchreid]'")

def test_needs_a_package():
    pytest.importorskip("reid_lite_no_such_package")  # pytest's own wording: "could not import ..."

def test_needs_a_dataset():
    pytest.skip("real CUHK03 crops not available")
"""


def _run_pytest(tmp_path: Path, strict: bool) -> subprocess.CompletedProcess:
    (tmp_path / "test_inner.py").write_text(SKIPPING)
    env = {**os.environ, "PYTHONPATH": str(TESTS), "REID_LITE_NO_MISSING_MODULE_SKIPS": "1" if strict else "0",
           "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    # The plugin alone (no conftest, no torch import), so each run takes about a second.
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "extras", "-p", "no:cacheprovider",
                           str(tmp_path)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


def test_ci_run_fails_on_missing_module_skips_only_and_lists_them(tmp_path):
    res = _run_pytest(tmp_path, strict=True)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "2 test(s) skipped for a missing module" in res.stdout  # not the dataset skip
    assert "test_inner.py::test_needs_torchreid: Skipped: missing module torchreid" in res.stdout
    assert "test_inner.py::test_needs_a_package: Skipped: could not import 'reid_lite_no_such_package'" in res.stdout
    assert "SKIPPED [1] test_inner.py" in res.stdout and "real CUHK03 crops" in res.stdout  # -rs summary
    # a developer's run (no REID_LITE_NO_MISSING_MODULE_SKIPS) only reports them
    assert _run_pytest(tmp_path, strict=False).returncode == 0


def test_ci_script_handles_no_tests_and_prints_the_skip_summary():
    script = (REPO / ".ci" / "run").read_text()
    assert "REID_LITE_NO_MISSING_MODULE_SKIPS=1 python -m pytest -q -rs tests" in script
    assert "5) echo" in script  # pytest's exit 5 (nothing collected) is a CI failure with a message
    # CI installs exactly as the README says
    readme = (REPO / "README.md").read_text()
    for line in ("pip install torch==2.14.1 torchvision==0.29.1", "pip install -e '.[test,docs]'"):
        assert line in readme and f"python -m {line}" in script
    assert "\nNO_MKDOCS_2_WARNING=1 mkdocs build --strict\n" in script  # the docs site, strictly


def test_page_test_fails_without_chromium_under_ci():
    """The web page's browser test must fail, not skip, in CI when Chromium is missing."""
    env = {**os.environ, "REID_LITE_CHROMIUM": "/nonexistent/chromium", "REID_LITE_NO_MISSING_MODULE_SKIPS": "1"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(TESTS / "test_serve_page.py")], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=300)
    assert out.returncode not in (0, 5), out.stdout[-2000:]
    assert "chromium is not installed" in out.stdout and "skipped" not in out.stdout.splitlines()[-1]
