"""Optional extras in the test suite: import them so that an incomplete install fails instead of skipping,
and (as a pytest plugin, loaded by conftest.py) fail a CI run in which any test skipped for a missing module.

No torch import here: `python -m pytest -p extras` runs it on its own (tests/test_ci.py does).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import warnings
from types import ModuleType

import pytest

#: Start of the skip reason of a test whose optional module is not installed at all. With
#: REID_LITE_NO_MISSING_MODULE_SKIPS=1 (set by .ci/run) such skips fail the run, since CI installs every extra.
MISSING_MODULE = "missing module"


def import_extra(module: str, extra: str) -> ModuleType:
    """Import `module` from the optional extra `extra` (e.g. 'torchreid.reid.metrics.rank', 'torchreid').

    Skips (reason "missing module ...") when the top-level package is not installed at all; FAILS when it
    is installed but the import breaks, e.g. torchreid present without scipy: an extra installed
    incompletely must not silently test less. Works at module level too.
    """
    top = module.split(".")[0]
    try:
        importlib.metadata.distribution(top)
        installed = True
    except importlib.metadata.PackageNotFoundError:
        installed = importlib.util.find_spec(top) is not None  # a source checkout on the path
    if not installed:
        pytest.skip(f"{MISSING_MODULE} {top}: pip install -e '.[{extra}]'", allow_module_level=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torchreid's "Cython evaluation ... unavailable"
            return importlib.import_module(module)
    except ImportError as err:
        reason = str(err)
    # Outside the except block, so the report is this one line rather than a chained traceback.
    pytest.fail(f"{top} is installed but `import {module}` fails ({reason}): the [{extra}] extra is installed "
                f"incompletely; run pip install -e '.[{extra}]'", pytrace=False)


def torchreid_evaluate_rank():
    """torchreid's `evaluate_rank`, from the PyPI layout (torchreid.reid.*) or a source install."""
    import_extra("torchreid", "torchreid")
    for name in ("torchreid.reid.metrics.rank", "torchreid.metrics.rank"):
        if importlib.util.find_spec(name.rsplit(".", 1)[0]) is not None:
            return import_extra(name, "torchreid").evaluate_rank
    pytest.fail("torchreid is installed but has neither torchreid.reid.metrics nor torchreid.metrics", pytrace=False)


def _missing_module_skips(terminalreporter) -> list[str]:
    """Skip reasons of this run that say a module is missing (ours, and pytest.importorskip's)."""
    reasons = []
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        if reason.startswith(("Skipped: " + MISSING_MODULE, MISSING_MODULE, "could not import")) or (
                "No module named" in reason):
            reasons.append(f"{report.nodeid}: {reason}")
    return reasons


def _strict_skips() -> bool:
    return os.environ.get("REID_LITE_NO_MISSING_MODULE_SKIPS") == "1"


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    """Under REID_LITE_NO_MISSING_MODULE_SKIPS=1 (CI) a skip for a missing module fails the run (exit 1).

    Runs before the terminal summary (which the terminal reporter writes after the other
    implementations of this hook), so the exit status is settled before `pytest_terminal_summary` lists them.
    """
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if not _strict_skips() or reporter is None:
        return
    session.config.stash[_MISSING_KEY] = reasons = _missing_module_skips(reporter)
    if reasons and session.exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    reasons = config.stash.get(_MISSING_KEY, [])
    if reasons:
        terminalreporter.write_sep("=", f"{len(reasons)} test(s) skipped for a missing module: a failure here, "
                                        "since CI installs every extra", red=True)
        for line in reasons:
            terminalreporter.write_line(line)


_MISSING_KEY = pytest.StashKey[list]()
