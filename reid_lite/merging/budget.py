"""Meet a GFLOPs budget with any registered method: its declared knob, one monotone search, one record.

    solution = solve_budget(model, cfg.MERGE, 15.53)                 # the knob's setting, GFLOPs, error
    solution = solve_budget(model, merge, 3.1, calibration=calib)    # image-dependent methods (ATM)

Every method declares its knob in the registry (`MergeMethod.gflops_knob`: 'r' or a `BudgetKnob`), and
`schedule.search_knob` finds its mildest setting whose cost is at most the budget, within 1% of it.
The cost is the capacity GFLOPs (what runs) unless a reducer may leave slots empty (a different token
count per image, e.g. ATM's thresholds): then it is the *effective* GFLOPs, valid tokens only, averaged
over a calibration batch (`Calibration`: the first gallery images in `evaluate`, seeded synthetic
pedestrians when a model is built without data), which the solution records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from yacs.config import CfgNode

from .knobs import set_overrides
from .registry import get_method
from .schedule import build_reducers, first_fit, search_knob

#: Default tolerance of a budget: the achieved GFLOPs lie in [budget (1 - TOLERANCE), budget].
TOLERANCE = 0.01
#: The STM-ReID paper's budget for ViT-B at 256x128, stride 12 (ToMe / STM-ReID r = 8): `--budget 15.53`.
PAPER_BUDGET = 15.53


@dataclass
class Calibration:
    """The images that effective GFLOPs are averaged over: preprocessed `images` (B, 3, H, W), their
    0-based `cams` (None without camera SIE), and where they came from (`source`, `paths`), for records."""

    images: torch.Tensor
    cams: torch.Tensor | None
    source: str
    paths: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """JSON-ready: the source, the number of images and their paths (when they are files)."""
        return {"source": self.source, "images": int(self.images.shape[0]), "paths": list(self.paths)}


@dataclass
class BudgetSolution:
    """A solved budget: the knob value, the MERGE keys it set (`setting`, ready to pin in a config), the
    capacity and effective GFLOPs there, which of the two was matched, and the error against `target`."""

    method: str
    knob: str
    value: float
    setting: dict[str, Any]
    target: float
    gflops: float
    effective_gflops: float
    matched: str
    calibration: dict[str, Any] | None = None
    evaluations: int = 0

    @property
    def achieved(self) -> float:
        """The GFLOPs that were matched (effective or capacity)."""
        return self.effective_gflops if self.matched == "effective" else self.gflops

    @property
    def error(self) -> float:
        """(achieved - target) / target: in [-tolerance, 0]."""
        return (self.achieved - self.target) / self.target

    @property
    def constant_r(self) -> int | None:
        """The constant MERGE.R an r knob chose (None for a per-layer list or another knob)."""
        if "MERGE.R" in self.setting and not self.setting.get("MERGE.R_LIST"):
            return int(self.setting["MERGE.R"])
        return None

    def label(self) -> str:
        """Short text for tables: 'R=8', 'EVIT.KEEP_RATE=0.7312', 'R_LIST=[9, 8, 8]'."""
        return setting_label(self.setting)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (results.json, benchmark JSON)."""
        return {"method": self.method, "knob": self.knob, "value": self.value, "setting": dict(self.setting),
                "target_gflops": self.target, "gflops": self.gflops, "effective_gflops": self.effective_gflops,
                "matched": self.matched, "achieved_gflops": self.achieved, "error": self.error,
                "calibration": self.calibration, "evaluations": self.evaluations}


def setting_label(setting: dict[str, Any]) -> str:
    """{'MERGE.EVIT.KEEP_RATE': 0.73} -> 'EVIT.KEEP_RATE=0.73' (empty lists left out)."""
    return ", ".join(f"{k.removeprefix('MERGE.')}={v}" for k, v in setting.items() if v != [])


CalibrationSource = Calibration | Callable[[], Calibration] | None


def synthetic_calibration(cfg: Any, count: int, num_cameras: int = 1) -> Calibration:
    """`count` seeded synthetic pedestrians at INPUT.SIZE_TEST through the test transform (no dataset needed):
    the calibration of a model built from a config alone."""
    from ..deploy.parity import parity_images

    images, cams = parity_images(cfg, count, num_cameras=max(1, num_cameras))
    return Calibration(images, cams if num_cameras > 1 else None, f"{count} synthetic pedestrians (seed 0)")


def parse_budget(spec: str | float, unmerged_gflops: float) -> float:
    """A budget as users type it: GFLOPs ('15.53') or a share of the unmerged model ('75%'); ValueError otherwise."""
    text = str(spec).strip()
    try:
        if text.endswith("%"):
            share = float(text[:-1]) / 100
            if not 0 < share <= 1:
                raise ValueError
            return share * unmerged_gflops
        value = float(text)
        if value <= 0:
            raise ValueError
        return value
    except ValueError:
        raise ValueError(f"--budget expects GFLOPs (e.g. {PAPER_BUDGET}) or a percentage of the unmerged model "
                         f"in (0%, 100%] (e.g. 75%), got {spec!r}") from None


def resolve_budget(spec: str | float, model: nn.Module) -> float:
    """`parse_budget` against `model`'s own unmerged GFLOPs (a TransReID): '75%' -> 0.75 x its GFLOPs."""
    from ..utils.flops import transreid_gflops

    return parse_budget(spec, transreid_gflops(model, {}))


def solve_budget(model: nn.Module, merge: CfgNode, target: float, calibration: CalibrationSource = None,
                 tol: float = TOLERANCE) -> BudgetSolution:
    """The setting of MERGE.METHOD's knob whose GFLOPs on `model` (a TransReID) meet `target` within `tol`.

    `merge` is a MERGE section (not changed); the knob's other options come from it. `calibration`
    (a `Calibration` or a function returning one, called only when needed) is required when the cost
    depends on the image. The model's reducers are restored afterwards. Raises ValueError for a method
    without a knob and `schedule.BudgetError` (naming the reachable range) for a budget out of reach.
    """
    from ..utils.flops import effective_gflops, transreid_gflops
    from . import input_tokens

    method = get_method(merge.METHOD)
    knob = method.budget_knob
    if knob is None:
        raise ValueError(f"MERGE.TARGET_GFLOPS: method {method.name!r} declares no budget knob "
                         "(MergeMethod.gflops_knob); compare it without a budget")
    depth, num_tokens = len(model.reducible_blocks), input_tokens(model)
    prop_attn = bool(merge.PROP_ATTN) and method.prop_attn
    saved, saved_prop = model.reducers, getattr(model, "prop_attn", True)
    calib: list[Calibration] = []

    def node_for(value: float) -> CfgNode:
        node = merge.clone()
        node.defrost()
        node.TARGET_GFLOPS = 0.0
        set_overrides(node, knob.overrides(node, value))
        return node

    def reducers_for(value: float) -> dict:
        return build_reducers(node_for(value), depth, num_tokens=num_tokens, cls_head=not model.jpm)

    costs: dict[float, tuple[float, float, bool]] = {}

    def cost(value: float) -> float:
        if value not in costs:
            reducers = reducers_for(value)
            capacity = transreid_gflops(model, reducers)
            effective = capacity
            image_dependent = any(r.may_empty for r in reducers.values())
            if image_dependent:
                if not calib:
                    if calibration is None:
                        raise ValueError(f"MERGE.TARGET_GFLOPS for {method.name!r} matches effective GFLOPs, "
                                         "which depend on the images: pass calibration images")
                    calib.append(calibration() if callable(calibration) else calibration)
                model.set_reducers(reducers, prop_attn)
                c = calib[0]
                dev = next(model.parameters()).device
                cams = c.cams.to(dev) if c.cams is not None else None
                views = torch.zeros(len(c.images), dtype=torch.long, device=dev) if model.base.view_num else None
                effective = effective_gflops(model, c.images.to(dev), cam_label=cams, view_label=views)[0]
            costs[value] = (capacity, effective, image_dependent)
        return costs[value][1]

    reducers_for(knob.mildest)  # a configuration error (e.g. MERGE.LOTM.LAYERS) surfaces here, as itself
    def describe(value: float) -> str:
        value = int(value) if knob.integer else value
        return ", ".join(f"MERGE.{k} {v}" for k, v in knob.overrides(node_for(value), value).items() if v != [])

    strongest = knob.strongest
    try:
        if strongest is None:  # the largest integer value whose schedule builds on this model
            def builds(step: int) -> bool:
                try:
                    reducers_for(knob.mildest + step)
                except ValueError:
                    return False
                return True

            limit = num_tokens * (knob.stride(merge) if knob.stride else 1)
            strongest = knob.mildest + first_fit(lambda s: not builds(s + 1), 0, limit)
        stride = knob.stride(merge) if knob.stride else 1
        value, _ = search_knob(cost, target, knob.mildest, strongest, knob.integer, stride, tol, knob.digits,
                               what=f"{method.name} ({knob.name} knob)", describe=describe)
    finally:
        model.set_reducers(saved, saved_prop)
    capacity, effective, image_dependent = costs[value]
    value = int(value) if knob.integer else float(value)
    setting = {f"MERGE.{k}": v for k, v in knob.overrides(node_for(value), value).items()}
    return BudgetSolution(method.name, knob.name, value, setting, float(target), capacity, effective,
                          "effective" if image_dependent else "capacity",
                          calib[0].record() if calib and image_dependent else None, len(costs))


def budget_merge(merge: CfgNode, solution: BudgetSolution) -> CfgNode:
    """A copy of the MERGE section with the solved setting written in and the budget cleared."""
    node = merge.clone()
    node.defrost()
    node.TARGET_GFLOPS = 0.0
    set_overrides(node, {k.removeprefix("MERGE."): v for k, v in solution.setting.items()})
    return node
