"""tools/benchmark.py's GPU paths without a GPU (device calls stood in), its interleaved timing, and
tools/roofline.py's estimate."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from conftest import load_tool
from torch import nn

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    return load_tool("benchmark")


def test_cuda_helpers_synchronise_and_use_channels_last(bench, monkeypatch):
    """On CUDA: the timed call waits for the device, memory is CUDA's allocator peak, and model and images go
    channels-last; on the CPU none of that. The CUDA calls are stood in by recorders."""
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 3 * 2**20)
    cuda = torch.device("cuda")
    assert bench.device_sync(torch.device("cpu")) is None
    bench.device_sync(cuda)()
    bench.peak_memory_reset(cuda)
    assert bench.peak_memory_mb(cuda, 0.0) == (3.0, "cuda max_memory_allocated")
    assert calls == ["sync", "reset"]
    assert bench.peak_memory_mb(torch.device("cpu"), bench.peak_memory_reset(torch.device("cpu")))[1] == \
        "CPU peak RSS growth"

    class Recorder(nn.Module):  # stands in for a model moved to a GPU
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(2))
            self.moves = []

        def to(self, *args, **kwargs):
            self.moves.append((args, kwargs))
            return self

    model = bench.to_device(Recorder(), cuda, pure_dtype=torch.bfloat16)
    assert model.moves == [((cuda,), {}), ((), {"dtype": torch.bfloat16}), ((), {"memory_format": torch.channels_last})]


def test_cuda_without_a_gpu_and_pure_without_a_dtype_are_clear_errors(bench, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code = bench.main(["--config", str(REPO / "configs" / "demo_synthetic.yml"), "--device", "cuda", "--dtype",
                       "bf16", "--compile"])
    assert code == 2 and "--device cuda: CUDA is not available" in capsys.readouterr().err
    code = bench.main(["--config", str(REPO / "configs" / "demo_synthetic.yml"), "--device", "cpu", "--pure"])
    assert code == 2 and "--pure needs --dtype bf16 or fp16" in capsys.readouterr().err


def test_interleaved_rounds_time_every_method_on_one_batch(bench, monkeypatch, one_thread):
    """All methods in one process, alternating rounds; `speedup_vs_none` is the median of per-round ratios. The
    same images for every method; pure bf16 weights run in bf16 (what `--device cuda --dtype bf16 --pure`
    runs, on the CPU)."""
    args = argparse.Namespace(config=str(REPO / "configs" / "demo_synthetic.yml"), opts=["MODEL.DEPTH", "3",
                              "MERGE.LAYERS", "[1, 2]"], target_gflops=0.0, weights="", threads=1, fvcore=False,
                              device="cpu", dtype="bf16", pure=True, inputs="pedestrians", iters=3, warmup=1,
                              system_malloc=True)  # the malloc setting is process-wide: not in the test process
    rows = bench.measure_interleaved(args, ["none", "tome"], "torch", 2)
    assert [r["method"] for r in rows] == ["none", "tome"]
    none, tome = rows
    assert none["speedup_vs_none"] == 1.0 and tome["speedup_vs_none"] > 0
    assert len(tome["times_ms"]) == 3 and tome["interleaved"] and tome["dtype"] == "pure bf16"
    assert tome["gflops"] < none["gflops"]


def test_roofline_estimate_is_consistent(tmp_path):
    roofline = load_tool("roofline")
    md, js = tmp_path / "est.md", tmp_path / "est.json"
    assert roofline.main(["--batch", "256", "--out-json", str(js), "--out-md", str(md)]) == 0
    report = json.loads(js.read_text())
    res = {r["method"]: r for r in report["results"]}
    # the unmerged count per image is twice fvcore's 20.41 G multiply-adds (FLOPs count a multiply-add as 2)
    assert res["none"]["gflop"] / 256 == pytest.approx(2 * 20.41, rel=0.01)
    assert res["tome"]["gflop"] < res["none"]["gflop"] and res["stm"]["gflop"] > res["tome"]["gflop"]
    assert res["none"]["images_per_s"] < res["stm"]["images_per_s"] < res["tome"]["images_per_s"]
    text = md.read_text()
    assert text.startswith("# GPU performance estimate (on paper, not measured)") and "**This is an estimate.**" in text
