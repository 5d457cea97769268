"""Latency measurement and the MERGE.TARGET_LATENCY_MS schedule chooser.

`measure_latency` times a forward pass (p50/p90 over timed passes after warm-up). `choose_r` picks
the mildest merging (the smallest r, i.e. the most accurate setting) whose measured latency fits a
budget, with r = 0 (merging off) whenever the unmerged model fits. Latency is measured, never
assumed: at batch 1 merging can be slower than none (its sorting and gathers cost more than the
tokens it saves), and then merging only ever gets chosen where it really is faster.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..merging.schedule import solve_r

logger = logging.getLogger(__name__)


def measure_latency(forward: Callable[[], Any], iters: int = 10, warmup: int = 3,
                    sync: Callable[[], None] | None = None) -> dict[str, float]:
    """ms per call of `forward`: p50, p90, mean, min, max over `iters` timed calls after `warmup` calls.

    `sync` (e.g. torch.cuda.synchronize) runs after each timed call, so the time includes the device's.
    """
    for _ in range(warmup):
        forward()
    if sync:
        sync()
    times = []
    for _ in range(max(1, iters)):
        t0 = time.perf_counter()
        forward()
        if sync:
            sync()
        times.append(1e3 * (time.perf_counter() - t0))
    times.sort()
    p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    return {"p50_ms": statistics.median(times), "p90_ms": p90, "mean_ms": statistics.fmean(times),
            "min_ms": times[0], "max_ms": times[-1], "iters": len(times)}


@dataclass
class LatencyChoice:
    """The chooser's result: the chosen r (0 = merging off) and every latency it measured (ms, p50)."""

    r: int
    budget_ms: float
    measured: dict[int, float] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for the log."""
        got = ", ".join(f"r={r}: {ms:.1f} ms" for r, ms in sorted(self.measured.items()))
        what = "merging off" if self.r == 0 else f"r={self.r}"
        return f"MERGE.TARGET_LATENCY_MS {self.budget_ms:g}: {what} ({got})"


def choose_r(latency_of: Callable[[int], float], budget_ms: float, r_max: int) -> LatencyChoice:
    """Smallest r in [0, r_max] whose latency (ms, from `latency_of`) is within `budget_ms`.

    r = 0 is measured first and wins when it fits. Otherwise a binary search over 1..r_max, which
    assumes latency does not rise with r once merging is on (fewer tokens). When even r_max does not
    fit (e.g. at batch 1, where merging can cost more than it saves), ValueError names the fastest
    setting measured.
    """
    measured: dict[int, float] = {}

    def lat(r: int) -> float:
        if r not in measured:
            measured[r] = float(latency_of(r))
        return measured[r]

    if lat(0) <= budget_ms:
        return LatencyChoice(0, budget_ms, measured)
    if r_max < 1 or lat(r_max) > budget_ms:
        fastest = min(measured, key=measured.get)
        raise ValueError(f"no merging setting meets MERGE.TARGET_LATENCY_MS {budget_ms:g}: the fastest measured is "
                         f"r={fastest} at {measured[fastest]:.1f} ms (measured: "
                         + ", ".join(f"r={r}: {ms:.1f} ms" for r, ms in sorted(measured.items())) + ")")
    # The same monotone search as the GFLOPs solver; lat(0) and lat(r_max) are cached, so nothing is re-measured.
    return LatencyChoice(solve_r(lat, budget_ms, r_max), budget_ms, measured)


def latency_r_max(model: nn.Module, cfg: Any) -> int:
    """The largest constant r over MERGE.LAYERS that every block can merge; ValueError when MERGE.METHOD is
    not a registered method whose schedule is solved through r (its declaration's `gflops_knob`)."""
    from ..merging import get_method, input_tokens, largest_r, method_names

    method = get_method(cfg.MERGE.METHOD)
    if method.gflops_knob != "r":
        solvable = [m for m in method_names() if get_method(m).gflops_knob == "r"]
        raise ValueError(f"MERGE.TARGET_LATENCY_MS needs a method whose schedule is solved through r "
                         f"({', '.join(solvable)}); {method.name!r} is not")
    return largest_r([i - 1 for i in cfg.MERGE.LAYERS], input_tokens(model))


def apply_latency_budget(model: nn.Module, cfg: Any, batch_size: int | None = None,
                         device: torch.device | str | None = None) -> LatencyChoice:
    """Choose MERGE's r for MERGE.TARGET_LATENCY_MS on this machine and attach it to `model` (PyTorch).

    Latency is measured with the model's own forward at `batch_size` (default TEST.IMS_PER_BATCH) on
    `device` (default MODEL.DEVICE), p50 of a few passes per candidate; the chosen r is recorded as
    `model.merge_r` (as the GFLOPs solver does) and `model.latency_choice`.
    """
    from ..merging import build_reducers
    from ..utils.device import resolve_device

    r_max = latency_r_max(model, cfg)
    if cfg.MERGE.TARGET_GFLOPS > 0:
        raise ValueError("set MERGE.TARGET_LATENCY_MS or MERGE.TARGET_GFLOPS, not both")
    dev = resolve_device(device if device is not None else cfg.MODEL.DEVICE)
    bs = int(batch_size or cfg.TEST.IMS_PER_BATCH)
    depth = len(model.reducible_blocks)
    was_training = model.training
    model.to(dev).eval()
    x = torch.randn(bs, 3, *cfg.INPUT.SIZE_TEST, device=dev)
    kwargs = {}
    if model.base.cam_num:
        kwargs["cam_label"] = torch.zeros(bs, dtype=torch.long, device=dev)
    if model.base.view_num:
        kwargs["view_label"] = torch.zeros(bs, dtype=torch.long, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    prop_attn = bool(cfg.MERGE.PROP_ATTN)

    def latency_of(r: int) -> float:
        model.set_reducers(build_reducers(cfg.MERGE, depth, r), prop_attn)
        with torch.inference_mode():
            return measure_latency(lambda: model(x, **kwargs), iters=5, warmup=1, sync=sync)["p50_ms"]

    choice = choose_r(latency_of, float(cfg.MERGE.TARGET_LATENCY_MS), r_max)
    model.set_reducers(build_reducers(cfg.MERGE, depth, choice.r), prop_attn)
    model.merge_r = choice.r
    model.latency_choice = choice
    model.train(was_training)
    logger.info("%s at batch %d on %s", choice.describe(), bs, dev)
    return choice


def choose_r_on_runtime(model: nn.Module, cfg: Any, backend: str, workdir: str | Path,
                        batch_size: int | None = None, threads: int = 0) -> LatencyChoice:
    """MERGE.TARGET_LATENCY_MS for an ONNX runtime: each candidate r is exported to `workdir` and timed
    on `backend` ('onnxruntime' or 'openvino') at `batch_size` (default TEST.IMS_PER_BATCH).

    An export takes a while (about a minute for ViT-B on two cores) and the search needs a handful;
    the chosen schedule is attached to `model` (`merge_r`), ready for `export_onnx`.
    """
    from ..merging import build_reducers
    from .export import FeatureGraph, build_metadata, example_inputs, trace_to_onnx, write_metadata
    from .runtime import open_runtime

    r_max = latency_r_max(model, cfg)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    depth = len(model.reducible_blocks)
    prop_attn = bool(cfg.MERGE.PROP_ATTN)
    bs = int(batch_size or cfg.TEST.IMS_PER_BATCH)
    model = model.cpu().eval()

    def latency_of(r: int) -> float:
        model.set_reducers(build_reducers(cfg.MERGE, depth, r), prop_attn)
        graph = FeatureGraph(model)
        example = example_inputs(graph, cfg)
        with torch.inference_mode():
            graph(*example)  # eager first: fills the merging caches with real tensors
        path = workdir / f"latency_r{r}.onnx"
        with torch.no_grad():
            trace_to_onnx(graph, example, path)
        write_metadata(path, build_metadata(model, cfg, int(model.base.cam_num)))
        runtime = open_runtime(backend, path, threads)
        images, *ids = example_inputs(graph, cfg, bs)
        labels = dict(zip([{"camera": "cam_label", "view": "view_label"}[n] for n in graph.inputs[1:]], ids))
        ms = measure_latency(lambda: runtime(images, **labels), iters=5, warmup=1)["p50_ms"]
        logger.info("r=%d on %s at batch %d: %.1f ms", r, backend, bs, ms)
        return ms

    choice = choose_r(latency_of, float(cfg.MERGE.TARGET_LATENCY_MS), r_max)
    model.set_reducers(build_reducers(cfg.MERGE, depth, choice.r), prop_attn)
    model.merge_r = choice.r
    model.latency_choice = choice
    logger.info("%s at batch %d on %s", choice.describe(), bs, backend)
    return choice
