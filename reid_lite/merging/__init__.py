"""Training-free token reduction inside ViT blocks: STM-ReID, ToMe, EViT, and methods you register.

`patch(model, "stm", r=8)` makes a timm `VisionTransformer` or a `TransReID` reduce tokens, as ToMe's own
patch does (`patching.py`); `apply_merging(model, cfg.MERGE)` attaches a configured MERGE section
(`attach.py`). Each method is a `TokenReducer` (see `base.py` for the contract, including empty slots)
declared once in the registry (`registry.py`): `register_method(MergeMethod(...))`.
"""

from __future__ import annotations

# Importing the method modules registers them, in this order: none (registry), tome, evit, stm, atm, ...
# isort: off
from . import registry, tome, evit, stm, atm, lotm, dhtm, dtem  # noqa: F401
# isort: on
from .attach import apply_merging, input_tokens, merge_cfg, reducible_depth
from .base import BipartiteMerge, TokenReducer, TokenState, bipartite_match, mask_invalid
from .dtem import DTEM
from .evit import EViT
from .knobs import BudgetKnob, count_knob, option_knob
from .learned import check_learned_ready, learned_state_dict
from .patching import patch, retune
from .registry import (
    MergeMethod,
    get_method,
    load_plugins,
    merge_section,
    method_fingerprint,
    method_names,
    method_of,
    option_key,
    option_names,
    parse_methods,
    register_method,
    unregister_method,
)
from .schedule import (
    BudgetError,
    build_reducers,
    check_layers,
    largest_r,
    per_layer_r,
    reduction_schedule,
    search_knob,
    token_counts,
)
from .stm import STM
from .tome import ToMe

__all__ = [
    "BipartiteMerge",
    "BudgetError",
    "BudgetKnob",
    "DTEM",
    "count_knob",
    "option_knob",
    "search_knob",
    "EViT",
    "MergeMethod",
    "STM",
    "ToMe",
    "TokenReducer",
    "TokenState",
    "apply_merging",
    "bipartite_match",
    "build_reducers",
    "check_learned_ready",
    "check_layers",
    "get_method",
    "input_tokens",
    "learned_state_dict",
    "largest_r",
    "load_plugins",
    "merge_section",
    "mask_invalid",
    "merge_cfg",
    "method_fingerprint",
    "method_names",
    "method_of",
    "option_key",
    "option_names",
    "parse_methods",
    "patch",
    "per_layer_r",
    "reducible_depth",
    "reduction_schedule",
    "retune",
    "register_method",
    "token_counts",
    "unregister_method",
]
