"""Latency measurement and the MERGE.TARGET_LATENCY_MS schedule chooser (PyTorch; an exported model's latency
is measured by `reid_lite.deploy.runtime_latency`).

`measure_latency` times a forward pass (p50/p90 over timed passes after warm-up). `choose_setting` picks
the mildest setting of the method's budget knob (the registry's `gflops_knob`, the same one GFLOPs budgets
turn: the smallest constant r for ToMe/STM-ReID, as before; EViT's keep rate, ATM's offset, LoTM's and
DHTM's K) whose measured latency fits a budget, with merging off whenever the unmerged model fits
(r = 0). Latency is measured, never
assumed: at batch 1 merging can be slower than none (its sorting and gathers cost more than the
tokens it saves), and then merging only ever gets chosen where it really is faster.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..merging.schedule import BudgetError, search_knob
from ..utils.device import resolve_device
from .budget import KnobSpace, constant_r

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
    """The chooser's result: the knob value chosen, the MERGE keys it sets (`setting`), and every latency
    it measured (ms, p50) with the setting each value stands for (`labels`)."""

    value: float
    budget_ms: float
    measured: dict[float, float] = field(default_factory=dict)
    labels: dict[float, str] = field(default_factory=dict)
    setting: dict[str, Any] = field(default_factory=dict)

    @property
    def r(self) -> int | None:
        """The constant r chosen (MERGE.R; 0 = merging off), None for another kind of setting."""
        return constant_r(self.setting)

    def describe(self) -> str:
        """One line for the log."""
        got = ", ".join(f"{self.labels[v]}: {ms:.1f} ms" for v, ms in sorted(self.measured.items()))
        what = "merging off" if self.r == 0 else self.labels[self.value]
        return f"MERGE.TARGET_LATENCY_MS {self.budget_ms:g}: {what} ({got})"


def choose_setting(latency_of: Callable[[float], float], budget_ms: float, mildest: float, strongest: float,
                   integer: bool = True, stride: int = 1, label: Callable[[float], str] = "r={:g}".format,
                   setting: Callable[[float], dict[str, Any]] | None = None) -> LatencyChoice:
    """The mildest knob value in [mildest, strongest] whose latency (ms, from `latency_of`) is within `budget_ms`.

    The mildest value (r = 0: merging off) is measured first and wins when it fits. Otherwise the GFLOPs
    budget's monotone search (`search_knob`), which assumes latency does not rise as the reduction grows:
    for integer knobs the first of every `stride`-th value that fits (a constant r, as before), for real
    knobs a bisection until within 5% under the budget (at most 12 measurements). When even the strongest
    setting does not fit (at batch 1, merging can cost more than it saves), ValueError names the fastest
    setting measured.
    """
    setting = setting or (lambda v: {"MERGE.R": int(v)})
    measured: dict[float, float] = {}
    labels: dict[float, str] = {}

    def lat(v: float) -> float:
        if v not in measured:
            measured[v], labels[v] = float(latency_of(v)), label(v)
        return measured[v]

    def choice(v: float) -> LatencyChoice:
        return LatencyChoice(v, budget_ms, measured, labels, setting(v))

    if lat(mildest) <= budget_ms:
        return choice(mildest)
    try:
        value, _ = search_knob(lat, budget_ms, mildest, strongest, integer, stride, tol=1.0 if integer else 0.05,
                               unit="ms", max_halvings=12)
    except BudgetError:
        fastest = min(measured, key=measured.get)
        raise ValueError(f"no merging setting meets MERGE.TARGET_LATENCY_MS {budget_ms:g}: the fastest measured is "
                         f"{labels[fastest]} at {measured[fastest]:.1f} ms (measured: "
                         + ", ".join(f"{labels[v]}: {ms:.1f} ms" for v, ms in sorted(measured.items())) + ")") from None
    return choice(value)


def choose_r(latency_of: Callable[[int], float], budget_ms: float, r_max: int) -> LatencyChoice:
    """Smallest constant r in [0, r_max] whose latency (ms, from `latency_of`) is within `budget_ms`
    (`choose_setting` over r: r = 0 first, then a binary search)."""
    return choose_setting(lambda r: latency_of(int(r)), budget_ms, 0, r_max)


def choose_on_model(model: nn.Module, cfg: Any, measure: Callable[[], float]) -> tuple[LatencyChoice, Any]:
    """Choose MERGE.METHOD's knob for MERGE.TARGET_LATENCY_MS, `measure()` timing the model as its reducers
    stand (the PyTorch model here, an exported copy in `reid_lite.deploy.runtime_latency`); attaches the choice
    to `model` (`merge_r`, `merge_setting`, `latency_choice`)."""
    if cfg.MERGE.TARGET_GFLOPS > 0:
        raise ValueError("set MERGE.TARGET_LATENCY_MS or MERGE.TARGET_GFLOPS, not both")
    space = KnobSpace(model, cfg.MERGE, "MERGE.TARGET_LATENCY_MS")

    def latency_of(value: float) -> float:
        model.set_reducers(space.reducers_for(value), space.prop_attn)
        return measure()

    choice = choose_setting(latency_of, float(cfg.MERGE.TARGET_LATENCY_MS), space.mildest, space.strongest,
                            space.knob.integer, space.stride, lambda v: space.describe(v).removeprefix("MERGE."),
                            space.setting)
    model.set_reducers(space.reducers_for(choice.value), space.prop_attn)
    model.merge_r = choice.r
    model.merge_setting = choice.setting
    model.latency_choice = choice
    return choice, space


def apply_latency_budget(model: nn.Module, cfg: Any, batch_size: int | None = None,
                         device: torch.device | str | None = None) -> LatencyChoice:
    """Choose MERGE.METHOD's budget knob for MERGE.TARGET_LATENCY_MS on this machine and attach it to `model`.

    Latency is measured with the model's own forward at `batch_size` (default TEST.IMS_PER_BATCH) on
    `device` (default MODEL.DEVICE), p50 of a few passes per candidate; the chosen setting is recorded as
    `model.merge_setting` (a constant r also as `model.merge_r`, as the GFLOPs solver does) and
    `model.latency_choice`. Any method that declares a knob (r, EViT's keep rate, ATM's offset, K).
    """
    dev = resolve_device(device if device is not None else cfg.MODEL.DEVICE)
    bs = int(batch_size or cfg.TEST.IMS_PER_BATCH)
    was_training = model.training
    model.to(dev).eval()
    x = torch.randn(bs, 3, *cfg.INPUT.SIZE_TEST, device=dev)
    kwargs = {}
    if model.base.cam_num:
        kwargs["cam_label"] = torch.zeros(bs, dtype=torch.long, device=dev)
    if model.base.view_num:
        kwargs["view_label"] = torch.zeros(bs, dtype=torch.long, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else None

    def measure() -> float:
        with torch.inference_mode():
            return measure_latency(lambda: model(x, **kwargs), iters=5, warmup=1, sync=sync)["p50_ms"]

    choice, _ = choose_on_model(model, cfg, measure)
    model.train(was_training)
    logger.info("%s at batch %d on %s", choice.describe(), bs, dev)
    return choice
