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

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from yacs.config import CfgNode

from ..data.synthetic_batch import synthetic_test_batch
from ..merging import apply_merging, input_tokens
from ..merging.knobs import set_overrides
from ..merging.registry import get_method, method_names, method_of
from ..merging.schedule import BudgetError, build_reducers, first_fit, search_knob
from .flops import effective_gflops, transreid_gflops

logger = logging.getLogger(__name__)

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

    def effective_gflops(self, model: nn.Module) -> float:
        """Mean effective GFLOPs per image of `model` (a TransReID, with the reducers it has now) over these
        images, on the model's device (cameras only where its SIE uses them, view 0 for view SIE)."""
        dev = next(model.parameters()).device
        cams = self.cams.to(dev) if self.cams is not None and model.base.cam_num else None
        views = torch.zeros(len(self.images), dtype=torch.long, device=dev) if model.base.view_num else None
        return effective_gflops(model, self.images.to(dev), cam_label=cams, view_label=views)[0]


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
    tolerance: float = TOLERANCE

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
        return constant_r(self.setting)

    def label(self) -> str:
        """Short text for tables: 'R=8', 'EVIT.KEEP_RATE=0.7312', 'R_LIST=[9, 8, 8]'."""
        return setting_label(self.setting)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (results.json, benchmark JSON)."""
        return {"method": self.method, "knob": self.knob, "value": self.value, "setting": dict(self.setting),
                "target_gflops": self.target, "gflops": self.gflops, "effective_gflops": self.effective_gflops,
                "matched": self.matched, "achieved_gflops": self.achieved, "error": self.error,
                "tolerance": self.tolerance, "calibration": self.calibration, "evaluations": self.evaluations}


def constant_r(setting: dict[str, Any]) -> int | None:
    """The constant MERGE.R of a solved setting, or None (a per-layer R_LIST, or another knob)."""
    if "MERGE.R" in setting and not setting.get("MERGE.R_LIST"):
        return int(setting["MERGE.R"])
    return None


def setting_label(setting: dict[str, Any]) -> str:
    """{'MERGE.EVIT.KEEP_RATE': 0.73} -> 'EVIT.KEEP_RATE=0.73' (empty lists left out; reals to 4 digits, the
    exact value is in the record)."""
    return ", ".join(f"{k.removeprefix('MERGE.')}={f'{v:.4g}' if isinstance(v, float) else v}"
                     for k, v in setting.items() if v != [])


def budget_label(record: dict[str, Any] | None) -> str:
    """A solved budget's table cell from its record (`BudgetSolution.to_dict`): 'R=8 (-0.31%)'; '-' for None."""
    return "-" if not record else f"{setting_label(record['setting'])} ({record['error']:+.2%})"


CalibrationSource = Calibration | Callable[[], Calibration] | None


def synthetic_calibration(cfg: Any, count: int, num_cameras: int = 1) -> Calibration:
    """`count` seeded synthetic pedestrians at INPUT.SIZE_TEST through the test transform (no dataset needed):
    the calibration of a model built from a config alone."""
    images, cams = synthetic_test_batch(cfg, count, num_cameras=max(1, num_cameras))
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
    return parse_budget(spec, transreid_gflops(model, {}))


class KnobSpace:
    """A method's budget knob on one TransReID model: the value range it can build, the MERGE section and the
    reducers of a value, and the setting (MERGE keys) a value stands for. Shared by the GFLOPs budget and the
    latency budget (`reid_lite.compress.latency`). `what` names the budget in the error for a knob-less method.
    """

    def __init__(self, model: nn.Module, merge: CfgNode, what: str = "MERGE.TARGET_GFLOPS"):
        self.method = method_of(merge)
        knob = self.method.budget_knob
        if knob is None:
            solvable = [m for m in method_names() if get_method(m).budget_knob]
            raise BudgetError(f"{what} needs a method that declares a budget knob ({', '.join(solvable)}); "
                             f"{self.method.name!r} does not (MergeMethod.gflops_knob)")
        self.knob, self.merge, self.model = knob, merge, model
        self.depth, self.num_tokens = len(model.reducible_blocks), input_tokens(model)
        self.prop_attn = bool(merge.PROP_ATTN) and self.method.prop_attn
        self.stride = knob.stride(merge) if knob.stride else 1
        self.mildest = knob.mildest
        self.reducers_for(self.mildest)  # a configuration error (e.g. MERGE.LOTM.LAYERS) surfaces here, as itself
        self.strongest = knob.strongest if knob.strongest is not None else self._largest_that_builds()

    def _largest_that_builds(self) -> float:
        """The largest integer value whose schedule builds on the model (building fails monotonically)."""
        def fails(step: int) -> bool:
            try:
                self.reducers_for(self.mildest + step + 1)
            except ValueError:
                return True
            return False

        return self.mildest + first_fit(fails, 0, self.num_tokens * self.stride)

    def value(self, value: float) -> float:
        """`value` as the knob's type (int for integer knobs)."""
        return int(value) if self.knob.integer else float(value)

    def merge_for(self, value: float) -> CfgNode:
        """A copy of the MERGE section with the value's setting written in and the budgets cleared."""
        node = self.merge.clone()
        node.defrost()
        node.TARGET_GFLOPS = 0.0
        node.TARGET_LATENCY_MS = 0.0
        set_overrides(node, self.knob.overrides(node, self.value(value)))
        return node

    def reducers_for(self, value: float) -> dict:
        """The reducers the value builds on the model (ValueError when it cannot run as stated)."""
        return build_reducers(self.merge_for(value), self.depth, num_tokens=self.num_tokens,
                              cls_head=not self.model.jpm)

    def setting(self, value: float) -> dict[str, Any]:
        """{'MERGE.R': 8, 'MERGE.R_LIST': []}: the MERGE keys a value sets, ready to pin in a config."""
        return {f"MERGE.{k}": v for k, v in self.knob.overrides(self.merge, self.value(value)).items()}

    def describe(self, value: float) -> str:
        """'MERGE.DHTM.K_LIST [53, 53, 52]': the setting of a value, for messages."""
        return ", ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in self.setting(value).items() if v != [])


def solve_budget(model: nn.Module, merge: CfgNode, target: float, calibration: CalibrationSource = None,
                 tol: float | None = None) -> BudgetSolution:
    """The setting of MERGE.METHOD's knob whose GFLOPs on `model` (a TransReID) meet `target` within `tol`
    (default MERGE.BUDGET_TOLERANCE, 1%).

    `merge` is a MERGE section (not changed); the knob's other options come from it. `calibration`
    (a `Calibration` or a function returning one, called only when needed) is required when the cost
    depends on the image. The model's reducers are restored afterwards. Raises ValueError for a method
    without a knob and `schedule.BudgetError` (naming the reachable range) for a budget out of reach.
    """
    space = KnobSpace(model, merge)
    name = space.method.name
    tol = float(merge.get("BUDGET_TOLERANCE", TOLERANCE) if tol is None else tol)
    if not 0 < tol < 1:
        raise BudgetError(f"MERGE.BUDGET_TOLERANCE must lie in (0, 1), got {tol}")
    saved, saved_prop = model.reducers, getattr(model, "prop_attn", True)
    calib: list[Calibration] = []
    costs: dict[float, tuple[float, float, bool]] = {}

    def cost(value: float) -> float:
        if value not in costs:
            reducers = space.reducers_for(value)
            capacity = transreid_gflops(model, reducers)
            effective = capacity
            image_dependent = any(r.may_empty for r in reducers.values())
            if image_dependent:
                if not calib:
                    if calibration is None:
                        raise ValueError(f"MERGE.TARGET_GFLOPS for {name!r} matches effective GFLOPs, "
                                         "which depend on the images: pass calibration images")
                    calib.append(calibration() if callable(calibration) else calibration)
                model.set_reducers(reducers, space.prop_attn)
                effective = calib[0].effective_gflops(model)
            costs[value] = (capacity, effective, image_dependent)
        return costs[value][1]

    t0 = time.perf_counter()
    try:
        value, _ = search_knob(cost, target, space.mildest, space.strongest, space.knob.integer, space.stride, tol,
                               space.knob.digits, what=f"{name} ({space.knob.name} knob)", describe=space.describe)
    finally:
        model.set_reducers(saved, saved_prop)
    capacity, effective, image_dependent = costs[value]
    solution = BudgetSolution(name, space.knob.name, space.value(value), space.setting(value), float(target),
                              capacity, effective, "effective" if image_dependent else "capacity",
                              calib[0].record() if calib and image_dependent else None, len(costs), tol)
    logger.info("budget %.4g GFLOPs: %s %s -> %.4g %s GFLOPs (%+.2f%%, %d settings tried in %.1f s)", target, name,
                solution.label(), solution.achieved, solution.matched, 100 * solution.error, len(costs),
                time.perf_counter() - t0)
    return solution


def refresh_budget(model: nn.Module) -> BudgetSolution | None:
    """Solve `model`'s GFLOPs budget again when it was matched on effective GFLOPs (they depend on the weights
    as much as on the images), e.g. after a checkpoint replaced the weights it was solved with; returns the
    new solution (None, and nothing done, for capacity-matched or unbudgeted models)."""
    solution, redo = getattr(model, "merge_budget", None), getattr(model, "merge_budget_inputs", None)
    if solution is None or solution.matched != "effective" or redo is None:
        return None
    merge_with_budget(model, *redo)
    return model.merge_budget


def budget_merge(merge: CfgNode, solution: BudgetSolution) -> CfgNode:
    """A copy of the MERGE section with the solved setting written in and the budget cleared."""
    node = merge.clone()
    node.defrost()
    node.TARGET_GFLOPS = 0.0
    set_overrides(node, {k.removeprefix("MERGE."): v for k, v in solution.setting.items()})
    return node


def merge_with_budget(model: nn.Module, merge: CfgNode, calibration: CalibrationSource = None,
                      solution: BudgetSolution | None = None) -> nn.Module:
    """Attach the token reduction of `merge` (a MERGE section) to `model`, solving its GFLOPs budget first.

    Without a budget (MERGE.TARGET_GFLOPS 0) this is `reid_lite.merging.apply_merging`. With one (TransReID
    only, methods that declare a `gflops_knob`) the method's knob is set to meet it (`solve_budget`): the
    solution is `model.merge_budget`, its MERGE keys `model.merge_setting`, and a constant r also
    `model.merge_r`. `calibration` (a `Calibration` or a function returning one) is needed only when the
    method's cost depends on the image (effective GFLOPs); `solution`: the budget already solved for this
    model and section, so the search is not repeated. Returns `model`.
    """
    if merge.TARGET_GFLOPS <= 0:
        return apply_merging(model, merge)
    if not hasattr(model, "reducible_blocks"):
        raise ValueError("MERGE.TARGET_GFLOPS is supported for TransReID models")
    if solution is None:
        solution = solve_budget(model, merge, float(merge.TARGET_GFLOPS), calibration)
    apply_merging(model, budget_merge(merge, solution))
    model.merge_budget = solution
    model.merge_r = solution.constant_r
    model.merge_setting = solution.setting  # the gallery fingerprint's
    # What an effective-GFLOPs budget is solved from, to solve it again for new weights (`refresh_budget`).
    model.merge_budget_inputs = (merge, calibration)
    return model
