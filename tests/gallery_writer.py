"""Test-side entry point: the `reid-gallery` CLI whose writers pause at one write stage.

    python tests/gallery_writer.py STAGE MARKER reid-gallery-arguments...
    proc = writer_paused_at(STAGE, MARKER, *reid_gallery_arguments)   # from a test

When a write reaches STAGE (one of `reid_lite.index.storage.STAGES`) the writer creates the file
MARKER and sleeps, so that a test can kill or interrupt it exactly there. The callback is installed
here, as every `Gallery`'s default `on_stage`; production code has no test hook of its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from reid_lite.index.cli import main
from reid_lite.index.gallery import Gallery
from reid_lite.index.storage import STAGES


def pause_at(stage: str, marker: Path, seconds: float = 120.0) -> Callable[[str], None]:
    """A stage callback that touches `marker` and sleeps `seconds` when the write reaches `stage`."""
    if stage not in STAGES:
        raise SystemExit(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")

    def on_stage(reached: str) -> None:
        if reached == stage:
            marker.touch()
            time.sleep(seconds)

    return on_stage


def writer_paused_at(stage: str, marker: Path, *cli_args: str, timeout: float = 120.0) -> subprocess.Popen:
    """`reid-gallery CLI_ARGS` in a child process whose writes pause at `stage`; returns once the child
    has reached it (it created `marker`). The caller ends it (SIGKILL, SIGINT)."""
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, __file__, stage, str(marker), *cli_args], cwd=repo,
                            env={**os.environ, "PYTHONPATH": str(repo)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the writer ended before reaching {stage!r}: {proc.communicate()}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise TimeoutError(f"the writer did not reach {stage!r} in {timeout:g}s")
        time.sleep(0.05)
    return proc


if __name__ == "__main__":
    stage, marker, *argv = sys.argv[1:]
    # A shell's background job starts with SIGINT ignored, and Python keeps an inherited SIG_IGN: restore
    # Ctrl-C as an interactive user has it, so that the tests' SIGINT reaches the CLI.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    Gallery.on_stage = staticmethod(pause_at(stage, Path(marker)))
    sys.exit(main(argv))
