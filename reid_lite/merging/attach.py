"""Attach a MERGE section's token reduction to a model: a `TransReID` (its `set_reducers`) or a timm ViT
(`timm_vit.patch_timm_vit`); `merge_cfg` makes such a section from keyword arguments."""

from __future__ import annotations

from torch import nn
from yacs.config import CfgNode

from .registry import get_method, load_plugins, merge_section, method_of, option_key
from .schedule import build_reducers
from .timm_vit import patch_timm_vit


def merge_cfg(method: str = "stm", r: int = 8, **options) -> CfgNode:
    """A MERGE config section from keyword arguments, for library use.

    Top-level keys by lower-case name (`layers`, `r_list`, `target_gflops`, `prop_attn`, `trace_source`,
    `plugins`); method options as `<method>_<key>` (e.g. `stm_alpha=0.1`, `stm_coords='tracked'`,
    `evit_keep_rate=0.7`).
    """
    load_plugins(list(options.get("plugins", [])))
    cfg = merge_section()
    cfg.METHOD, cfg.R = get_method(method).name, r
    for key, value in options.items():
        node, name = option_key(cfg, key)
        node[name] = type(node[name])(value) if not isinstance(node[name], list) else list(value)
    return cfg


def input_tokens(model: nn.Module) -> int:
    """Tokens entering the first block (class token included) of a TransReID or a timm ViT."""
    embed = model.base.patch_embed if hasattr(model, "reducible_blocks") else model.patch_embed
    return int(embed.num_patches) + int(getattr(model, "num_prefix_tokens", 1))


def reducible_depth(model: nn.Module) -> int:
    """Blocks whose tokens may be reduced: a TransReID's own blocks (JPM's last block excluded), a timm ViT's."""
    return len(model.reducible_blocks) if hasattr(model, "reducible_blocks") else len(model.blocks)


def apply_merging(model: nn.Module, cfg: CfgNode) -> nn.Module:
    """Attach the token reduction that `cfg` (a MERGE section) describes; returns `model`.

    Works on reid_lite's `TransReID` and on timm `VisionTransformer`s. A GFLOPs budget (MERGE.TARGET_GFLOPS > 0)
    is solved above the models: `reid_lite.compress.merge_with_budget` solves it and calls this with the
    solved setting; here it is refused. On a TransReID the budget records (`merge_budget`, `merge_r`,
    `merge_setting`) are cleared: the reducers attached are exactly the section's.
    """
    method = method_of(cfg)
    if cfg.TARGET_GFLOPS > 0:
        raise ValueError("MERGE.TARGET_GFLOPS is solved by reid_lite.compress.merge_with_budget (or build_model), "
                         "not by reid_lite.merging.apply_merging")
    is_transreid = hasattr(model, "reducible_blocks")
    depth = reducible_depth(model)
    num_tokens = input_tokens(model)
    # Only a head that reads the class token alone allows a class-token-only last block (never JPM).
    cls_head = not is_transreid or not model.jpm
    reducers = build_reducers(cfg, depth, None, num_tokens, cls_head=cls_head)
    prop_attn = bool(cfg.PROP_ATTN) and method.prop_attn
    if is_transreid:
        model.set_reducers(reducers, prop_attn)
        model.trace_source = bool(cfg.TRACE_SOURCE)
        model.merge_budget = model.merge_r = model.merge_setting = model.merge_budget_inputs = None
        return model
    return patch_timm_vit(model, reducers, prop_attn)
