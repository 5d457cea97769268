"""Checkpoint loading beside the model (as timm keeps its filters): official TransReID state dicts and
ImageNet ViT weights in timm's naming. Files load with `torch.load(weights_only=True)`; a file that needs
arbitrary unpickling is refused unless the caller trusts it explicitly.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..merging.learned import mark_loaded, resolve_learned_state
from ..utils.checkpoint_file import CheckpointError, read_state_dict


def sie_table_cameras(state: dict[str, torch.Tensor], view_num: int = 0) -> int:
    """Cameras of the camera SIE table in a TransReID state dict (0 when it has none).

    The table (`base.sie_embed`, or `sie_embed` in a bare backbone) has one row per camera, or
    camera x view rows when both SIE kinds are on; `view_num` > 1 says the latter.
    """
    table = state.get("base.sie_embed", state.get("sie_embed"))
    if table is None:
        return 0
    rows = int(table.shape[0])
    return rows // view_num if view_num > 1 else rows


def transreid_filter(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapt an official TransReID state dict: the official ViT keeps an unused ImageNet head
    (`base.fc`, never called in forward) that has no counterpart here; dropping it changes nothing."""
    return {k: v for k, v in state.items() if not k.startswith("base.fc.")}


def check_and_load(module: nn.Module, state: dict[str, torch.Tensor], source: str, strict: bool = True) -> None:
    """Load `state` into `module`, raising one error that lists every missing, unexpected and
    mis-shaped key (a strict load) instead of stopping at the first."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state)) if strict else []
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in state.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or shapes:
        lines = [f"{source} does not match the model:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                more = " ..." if len(items) > 20 else ""
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + more)
        raise CheckpointError("\n".join(lines))
    module.load_state_dict(state, strict=strict)


def load_transreid_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "state dict",
                         ignore_classifier: bool = False) -> None:
    """Load an official-layout TransReID state dict strictly (see `load_transreid_checkpoint`). Learned
    merging weights (DTEM's embedding) follow `reid_lite.merging.learned.resolve_learned_state`: a model
    whose embedding is pending needs them in `state`. Weights only: a budget solved on the previous weights is
    solved again by the caller (`reid_lite.build.load_checkpoint` does both)."""
    state, learned = resolve_learned_state(model, transreid_filter(state), source)
    if ignore_classifier:
        state = {k: v for k, v in state.items() if not k.startswith("classifier")}
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("classifier")})
    check_and_load(model, state, source)
    if learned:
        mark_loaded(model)


def load_transreid_checkpoint(model: nn.Module, path: str | Path, trust: bool = False,
                              ignore_classifier: bool = False) -> None:
    """Load an official TransReID checkpoint (keys `base.*`, `b1.*`, `b2.*`, `bottleneck*`, `classifier*`)
    strictly. `ignore_classifier` drops the identity classifiers, for evaluating on other identities."""
    load_transreid_state(model, read_state_dict(path, trust), str(path), ignore_classifier)


def resize_pos_embed(posemb: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resample a (1, 1+G*G, D) position embedding to `grid` (rows, cols) as the official code does
    (bilinear, align_corners=False), keeping the class token's entry."""
    tok, old = posemb[:, :1], posemb[0, 1:]
    gs = int(math.sqrt(len(old)))
    if gs * gs != len(old):
        raise CheckpointError(f"cannot resize a position embedding of {len(old)} patches (not a square grid)")
    old = old.reshape(1, gs, gs, -1).permute(0, 3, 1, 2)
    new = F.interpolate(old, size=grid, mode="bilinear").permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
    return torch.cat([tok, new], dim=1)


def imagenet_filter(state: dict[str, torch.Tensor], backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Adapt a timm-format ImageNet ViT/DeiT state dict to a TransReID backbone (the official `load_param`):
    drop the classification heads and distillation token, reshape a linear patch projection, resample
    `pos_embed` to the backbone's patch grid."""
    out = {}
    for k, v in state.items():
        if "head" in k or "dist" in k:
            continue
        if k == "patch_embed.proj.weight" and v.dim() < 4:
            v = v.reshape(backbone.patch_embed.proj.weight.shape)
        elif k == "pos_embed" and v.shape != backbone.pos_embed.shape:
            if "dist_token" in state:
                v = torch.cat([v[:, :1], v[:, 2:]], dim=1)  # distilled models carry a second prefix token
            v = resize_pos_embed(v, backbone.patch_embed.grid_size)
        out[k] = v
    return out


def load_imagenet_backbone(backbone: nn.Module, path: str | Path, trust: bool = False) -> None:
    """Initialise a TransReID backbone from an ImageNet ViT file; the SIE table stays freshly initialised."""
    state = imagenet_filter(read_state_dict(path, trust), backbone)
    own = backbone.state_dict()
    # ImageNet files have no SIE table and (for JPM) the backbone keeps its own final norm.
    for k in own:
        if k not in state and k.startswith("sie_embed"):
            state[k] = own[k]
    check_and_load(backbone, state, str(path))
