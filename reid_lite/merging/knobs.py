"""Budget knobs: the one scalar per method that the GFLOPs budget search turns (`MergeMethod.gflops_knob`).

A knob orders a method's settings from the mildest reduction (`mildest`, the most tokens kept) to the
strongest, and says which MERGE keys a value sets (`overrides`). The search in `schedule.search_knob`
assumes only that the cost does not rise from the mildest end towards the strongest one, so a knob may
grow with the reduction (r, K) or shrink with it (EViT's keep rate, ATM's threshold offset).

Count knobs (`count_knob`: r, LoTM's and DHTM's K) count merges over the method's layers: value m gives
every layer floor(m / L) merges and the first m mod L layers one more (earlier merges save more), so its
multiples of L are the constant schedules (MERGE.R, MERGE.LOTM.K) and the values between them per-layer
lists (MERGE.R_LIST, MERGE.LOTM.K_LIST), one merge apart. The search prefers a constant count (`stride`)
and takes the finer steps only when no constant one lands within the tolerance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from yacs.config import CfgNode


@dataclass(frozen=True)
class BudgetKnob:
    """One method's budget knob.

    name: shown in tables and records ('r', 'keep_rate', 'offset', 'k').
    overrides: (MERGE section, value) -> {MERGE key ('R', 'EVIT.KEEP_RATE'): value} that realise the value.
    mildest: the value that reduces least. strongest: the value that reduces most; None for an integer
        knob whose largest value is the largest one the model's schedule can build (searched).
    integer: the value is an integer (binary search) rather than a real (bisection).
    stride: (MERGE section) -> step between preferred values of an integer knob (r: one merge per layer).
    digits: a real knob's value is recorded to these decimals (when the rounded value still meets the budget).
    doc: one line for help texts.
    """

    name: str
    overrides: Callable[[CfgNode, float], dict[str, Any]]
    mildest: float
    strongest: float | None = None
    integer: bool = False
    stride: Callable[[CfgNode], int] | None = None
    digits: int = 4
    doc: str = ""


def set_overrides(merge: CfgNode, overrides: dict[str, Any]) -> None:
    """Write {'R': 8, 'EVIT.KEEP_RATE': 0.7} into a (mutable) MERGE section."""
    for key, value in overrides.items():
        node, *path = key.split(".")
        target, leaf = (merge, node) if not path else (merge[node], path[0])
        target[leaf] = list(value) if isinstance(value, (list, tuple)) else value


def spread_overrides(key: str, list_key: str, layers_key: str) -> Callable[[CfgNode, float], dict[str, Any]]:
    """Overrides of a count knob: value m (merges over the layers of `layers_key`) as a constant `key` when
    it divides evenly, else a front-loaded `list_key` (the first m mod L layers one more: earlier merges save
    more). E.g. ('R', 'R_LIST', 'LAYERS') for r, ('LOTM.K', 'LOTM.K_LIST', 'LOTM.LAYERS') for LoTM."""

    def overrides(merge: CfgNode, merges: float) -> dict[str, Any]:
        layers = max(1, len(_get(merge, layers_key)))
        count, extra = divmod(int(merges), layers)
        if extra == 0:
            return {key: count, list_key: []}
        return {list_key: [count + 1] * extra + [count] * (layers - extra)}

    return overrides


def count_knob(name: str, key: str, list_key: str, layers_key: str, doc: str = "") -> BudgetKnob:
    """A knob counting merges over a method's layers (`spread_overrides`): prefers a constant count, steps by one
    merge where no constant one meets the budget; its largest value is the largest schedule that builds."""
    return BudgetKnob(name, spread_overrides(key, list_key, layers_key), 0, None, integer=True,
                      stride=lambda merge: max(1, len(_get(merge, layers_key))), doc=doc)


def _get(merge: CfgNode, key: str) -> Any:
    node, *path = key.split(".")
    return merge[node] if not path else merge[node][path[0]]


def option_knob(name: str, key: str, mildest: float, strongest: float | None = None, integer: bool = False,
                doc: str = "") -> BudgetKnob:
    """A knob that sets one option of the method's node, e.g. option_knob('k', 'LOTM.K', 0, integer=True)."""
    cast = int if integer else float
    return BudgetKnob(name, lambda merge, value: {key: cast(value)}, mildest, strongest, integer, doc=doc)


#: The r knob of bipartite-matching methods (ToMe, STM-ReID, DTEM, r plugins): declared as gflops_knob='r'.
R_KNOB = count_knob("r", "R", "R_LIST", "LAYERS", "merges over MERGE.LAYERS: a constant MERGE.R when one fits, "
                    "else a MERGE.R_LIST")
