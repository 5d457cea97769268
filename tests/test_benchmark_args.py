"""tools/benchmark.py refuses bad arguments in one `error:` line (exit 2) before any model is built or timed."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading

import pytest
import torch
from conftest import load_tool


@pytest.fixture(scope="module")
def tool():
    return load_tool("benchmark")


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_cuda_without_a_gpu_is_one_line(tool, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tool.main(["--device", "cuda", "--methods", "none", "--out", str(tmp_path / "b.json")]) == 2
    assert "--device cuda: CUDA is not available on this machine" in error_line(capsys)
    assert tool.main(["--device", "gpu0", "--methods", "none", "--out", str(tmp_path / "b.json")]) == 2
    assert "--device 'gpu0' is not a device" in error_line(capsys)
    assert not (tmp_path / "b.json").exists()


@pytest.mark.parametrize("target, words", [
    ("{tmp}", "--out {tmp} is a folder: give a file name"),
    ("{tmp}/file/b.json", "--out {tmp}/file/b.json: {tmp}/file is a file, not a folder"),
])
def test_out_that_cannot_be_written_is_refused_before_any_work(tool, tmp_path, capsys, target, words):
    (tmp_path / "file").write_text("x")
    assert tool.main(["--device", "cpu", "--methods", "none", "--out", target.format(tmp=tmp_path)]) == 2
    assert error_line(capsys) == "error: " + words.format(tmp=tmp_path)


def test_onnx_dir_that_is_a_file_is_refused(tool, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert tool.main(["--device", "cpu", "--methods", "none", "--backend", "onnxruntime", "--onnx-dir",
                      str(tmp_path / "file"), "--out", str(tmp_path / "b.json")]) == 2
    assert error_line(capsys) == f"error: --onnx-dir {tmp_path / 'file'} is a file, not a folder"


def test_unknown_method_and_bad_batch_are_one_line(tool, tmp_path, capsys):
    assert tool.main(["--device", "cpu", "--methods", "nosuch", "--out", str(tmp_path / "b.json")]) == 2
    assert "unknown methods ['nosuch']" in error_line(capsys)
    assert tool.main(["--device", "cpu", "--batch-size", "0", "--out", str(tmp_path / "b.json")]) == 2
    assert "--batch-size values must be >= 1" in error_line(capsys)


def test_budget_without_a_method_that_has_a_knob_is_refused(tool, tmp_path, capsys):
    """The report must never name a budget that no row ran under."""
    out = str(tmp_path / "b.json")
    assert tool.main(["--device", "cpu", "--methods", "none", "--budget", "75%", "--out", out]) == 2
    assert "--budget 75%: none of the methods (none) has a GFLOPs knob" in error_line(capsys)
    assert not (tmp_path / "b.json").exists()


def _die_without_result() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _fail() -> None:
    raise RuntimeError("out of memory")


def _run_in_child(tool, fn, *a):
    """`tool._in_child` in a thread, so that a hang fails the test instead of stalling the suite."""
    out: list = []
    worker = threading.Thread(target=lambda: out.append(tool._in_child(mp.get_context("fork"), fn, *a, poll_s=0.2)),
                              daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "_in_child still waiting for a child that is gone"
    return out[0]


def test_a_child_that_dies_or_fails_is_an_error_row_not_a_hang(tool, capsys):
    assert _run_in_child(tool, _die_without_result) == {
        "error": "the measuring process died without a result (killed by SIGKILL)"}
    assert _run_in_child(tool, _fail) == {"error": "RuntimeError: out of memory"}
    assert _run_in_child(tool, max, 3, 7) == 7  # a result comes back as before
    row = tool._report_row(_run_in_child(tool, _die_without_result), "stm", "torch", 8)
    assert "error" in row
    died = "the measuring process died without a result (killed by SIGKILL)"
    assert capsys.readouterr().err.strip() == f"stm torch b8: {died}"
