"""Which patches each token holds after a block: the merged-token source maps of the paper's Fig. 8."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def token_groups(model: nn.Module, image: torch.Tensor, cam: int = 0, block: int | None = None) -> np.ndarray:
    """(num_patches,) token index holding each patch after 1-based `block` (default: the last reducing one).

    Runs `model` (a reid_lite TransReID with token reduction attached) on one preprocessed image
    (3, H, W) with source tracing on and the reducers after `block` switched off.
    """
    reducers = model.reducers
    if not reducers:
        raise ValueError("the model reduces no tokens: set MERGE.METHOD to a merging method (not none)")
    block = block or max(reducers) + 1
    kept = {i: r for i, r in reducers.items() if i < block}
    prop_attn, tracing = model.prop_attn, model.trace_source
    model.set_reducers(kept, prop_attn)
    model.trace_source = True
    try:
        with torch.no_grad():
            model.eval()(image[None], cam_label=torch.tensor([cam], device=image.device))
        source = model.last_state.source
    finally:
        model.set_reducers(reducers, prop_attn)
        model.trace_source = tracing
    if source is None:  # no reduction happened up to this block
        return np.arange(model.base.patch_embed.num_patches)
    return source[0].argmax(dim=0).cpu().numpy()


def render_groups(image: np.ndarray, groups: np.ndarray, grid: tuple[int, int], patch: int, stride: int) -> np.ndarray:
    """Paint each token's patches with their mean colour and outline the tokens (H, W, 3 uint8).

    Overlapping patches are resolved by giving each pixel to the patch whose centre is nearest.
    """
    h, w = image.shape[:2]
    rows = np.clip(np.rint((np.arange(h) + 0.5 - patch / 2) / stride), 0, grid[0] - 1).astype(int)
    cols = np.clip(np.rint((np.arange(w) + 0.5 - patch / 2) / stride), 0, grid[1] - 1).astype(int)
    labels = groups[(rows[:, None] * grid[1] + cols[None, :])]  # (H, W) token of each pixel
    flat = labels.ravel()
    counts = np.bincount(flat, minlength=flat.max() + 1)[:, None].clip(min=1)
    means = np.stack([np.bincount(flat, weights=image[..., c].ravel(), minlength=len(counts)) for c in range(3)], 1)
    out = (means / counts)[labels].astype(np.uint8)
    edge = np.zeros((h, w), dtype=bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    out[edge] = 255
    return out
