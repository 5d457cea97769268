"""Compression budgets on top of the models: the GFLOPs budget solver, the FLOPs count it is measured with, and
the latency budget measured on the PyTorch model.

    solution = solve_budget(model, cfg.MERGE, 15.53)       # the knob's setting, GFLOPs, error
    merge_with_budget(model, cfg.MERGE, calibration)       # attach the merging, its budget solved first
"""

from .budget import (
    PAPER_BUDGET,
    BudgetSolution,
    Calibration,
    CalibrationSource,
    KnobSpace,
    budget_label,
    budget_merge,
    constant_r,
    merge_with_budget,
    parse_budget,
    refresh_budget,
    resolve_budget,
    setting_label,
    solve_budget,
    synthetic_calibration,
)
from .flops import effective_gflops, fvcore_gflops, transreid_gflops
from .latency import LatencyChoice, apply_latency_budget, choose_r, choose_setting, measure_latency

__all__ = [
    "PAPER_BUDGET",
    "BudgetSolution",
    "Calibration",
    "CalibrationSource",
    "KnobSpace",
    "LatencyChoice",
    "apply_latency_budget",
    "budget_label",
    "budget_merge",
    "choose_r",
    "choose_setting",
    "constant_r",
    "effective_gflops",
    "fvcore_gflops",
    "measure_latency",
    "merge_with_budget",
    "parse_budget",
    "refresh_budget",
    "resolve_budget",
    "setting_label",
    "solve_budget",
    "synthetic_calibration",
    "transreid_gflops",
]
