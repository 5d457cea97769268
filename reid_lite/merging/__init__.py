"""Training-free token reduction inside ViT blocks: STM-ReID, ToMe, EViT.

`apply_merging(model, cfg.MERGE)` attaches the configured method to a `TransReID` model or to a timm
`VisionTransformer`. Each method is a `TokenReducer` (see `base.py` for the contract).
"""

from __future__ import annotations

from torch import nn
from yacs.config import CfgNode

from .base import BipartiteMerge, TokenReducer, TokenState, bipartite_match
from .evit import EViT
from .schedule import (
    METHODS,
    build_reducers,
    largest_r,
    parse_methods,
    reduction_schedule,
    solve_r,
    token_counts,
)
from .stm import STM
from .tome import ToMe


def merge_cfg(method: str = "stm", r: int = 8, **options) -> CfgNode:
    """A MERGE config section from keyword arguments, for library use.

    Top-level keys by lower-case name (`layers`, `r_list`, `target_gflops`, `prop_attn`, `trace_source`);
    method options as `<method>_<key>` (e.g. `stm_alpha=0.1`, `stm_coords='tracked'`, `evit_keep_rate=0.7`).
    """
    from ..config import get_cfg

    cfg = get_cfg().MERGE
    cfg.METHOD, cfg.R = method, r
    for key, value in options.items():
        node, name = cfg, key.upper()
        head, _, tail = name.partition("_")
        if head in ("STM", "EVIT") and tail:
            node, name = cfg[head], tail
        if name not in node:
            raise KeyError(f"unknown merging option {key!r}")
        node[name] = type(node[name])(value) if not isinstance(node[name], list) else list(value)
    return cfg


def input_tokens(model: nn.Module) -> int:
    """Tokens entering the first block (class token included) of a TransReID or a timm ViT."""
    embed = model.base.patch_embed if hasattr(model, "reducible_blocks") else model.patch_embed
    return int(embed.num_patches) + int(getattr(model, "num_prefix_tokens", 1))


def apply_merging(model: nn.Module, cfg: CfgNode) -> nn.Module:
    """Attach the token reduction that `cfg` (a MERGE section) describes; returns `model`.

    Works on reid_lite's `TransReID` and on timm `VisionTransformer`s. With MERGE.TARGET_GFLOPS > 0
    (TransReID only) a constant r over MERGE.LAYERS is chosen to meet that budget.
    """
    from ..utils.flops import transreid_gflops

    is_transreid = hasattr(model, "reducible_blocks")
    depth = len(model.reducible_blocks) if is_transreid else len(model.blocks)
    num_tokens = input_tokens(model)
    r_override = None
    if cfg.TARGET_GFLOPS > 0:
        if not is_transreid:
            raise ValueError("MERGE.TARGET_GFLOPS is supported for TransReID models")
        if cfg.METHOD.lower() not in ("tome", "stm"):
            raise ValueError("MERGE.TARGET_GFLOPS needs an r-based method (tome or stm)")
        r_max = largest_r([i - 1 for i in cfg.LAYERS], num_tokens)
        r_override = solve_r(lambda r: transreid_gflops(model, build_reducers(cfg, depth, r)), cfg.TARGET_GFLOPS, r_max)
    reducers = build_reducers(cfg, depth, r_override, num_tokens)
    prop_attn = bool(cfg.PROP_ATTN) and cfg.METHOD.lower() != "evit"  # EViT's paper has no size bias
    if is_transreid:
        model.set_reducers(reducers, prop_attn)
        model.trace_source = bool(cfg.TRACE_SOURCE)
        model.merge_r = r_override
        return model
    from .timm_vit import patch_timm_vit

    return patch_timm_vit(model, reducers, prop_attn)


__all__ = [
    "METHODS",
    "BipartiteMerge",
    "EViT",
    "STM",
    "ToMe",
    "TokenReducer",
    "TokenState",
    "apply_merging",
    "bipartite_match",
    "build_reducers",
    "input_tokens",
    "largest_r",
    "merge_cfg",
    "parse_methods",
    "reduction_schedule",
    "solve_r",
    "token_counts",
]
