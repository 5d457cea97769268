"""FLOPs of TransReID with token reduction: fvcore's count and an analytic count that agrees with it.

Convention (fvcore's, and the paper's): one multiply-add is one flop. fvcore has no handle for
`scaled_dot_product_attention`; we register one that counts it as the two explicit matmuls would,
Nq x Nk x (d_qk + d_v) per head. Elementwise ops, softmax, GELU, sorting and gathers are not counted.
"""

from __future__ import annotations

import logging
from math import prod

import torch
from torch import nn

from ..merging.base import TokenReducer
from ..merging.schedule import token_counts

logger = logging.getLogger(__name__)


def _sdpa_flop_jit(inputs, outputs) -> int:
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(t) for t in inputs[:3])
    return prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


class _CameraForward(nn.Module):
    """Positional-only wrapper: fvcore traces with positional inputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, cam: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        return self.model(x, cam_label=cam, view_label=view)


def fvcore_gflops(model: nn.Module, img_size: tuple[int, int] | None = None) -> float:
    """fvcore's GFLOPs of one image through `model` in eval mode (camera and view 0)."""
    from fvcore.nn import FlopCountAnalysis

    size = tuple(img_size or model.base.patch_embed.img_size)
    device = next(model.parameters()).device
    x = torch.zeros(1, 3, *size, device=device)
    ids = torch.zeros(1, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            counter = FlopCountAnalysis(_CameraForward(model), (x, ids, ids))
            counter.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flop_jit)
            counter.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            return counter.total() / 1e9
    finally:
        model.train(was_training)


def _block_flops(t_in: int, t_out: int, dim: int, hidden: int, heads: int, reducer: TokenReducer | None) -> int:
    attn = 3 * t_in * dim * dim + 2 * t_in * t_in * dim + t_in * dim * dim  # qkv, attention, projection
    norms = 5 * (t_in + t_out) * dim  # two affine LayerNorms
    mlp = 2 * t_out * dim * hidden
    extra = 0
    # A reducer that may empty slots runs its matching even when the block keeps its capacity.
    if reducer is not None and (t_out < t_in or reducer.may_empty):
        extra = reducer.matching_flops(t_in, dim, heads)
        if reducer.needs_cls_attn:
            extra += t_in * dim  # the class token's attention row, computed on its own
    return attn + norms + mlp + extra


def _flops_of_counts(model: nn.Module, reducers: dict[int, TokenReducer], counts: list[tuple[int, int]]) -> int:
    """Multiply-adds of one image whose trunk blocks see (tokens in, tokens out) = `counts`."""
    base = model.base
    dim, pe = base.embed_dim, base.patch_embed
    blk = base.blocks[0]
    hidden, heads = blk.mlp.fc1.out_features, blk.attn.num_heads
    conv = pe.proj
    flops = pe.num_patches * dim * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    for i, (t_in, t_out) in enumerate(counts):
        flops += _block_flops(t_in, t_out, dim, hidden, heads, reducers.get(i))
    t = counts[-1][1] if counts else pe.num_patches + 1
    if model.jpm:
        flops += _block_flops(t, t, dim, hidden, heads, None) + 5 * t * dim  # b1: block + norm
        part = 1 + (t - 1) // model.divide_length
        flops += model.divide_length * (_block_flops(part, part, dim, hidden, heads, None) + 5 * part * dim)
        flops += 5 * 2 * dim  # five BNNecks (eval: 2 flops per element)
    else:
        flops += 5 * t * dim + 2 * dim  # final norm over all tokens, BNNeck
    return flops


def transreid_gflops(model: nn.Module, reducers: dict[int, TokenReducer] | None = None) -> float:
    """Analytic GFLOPs of one image through a `TransReID` model, with `reducers` (default: its own).

    Capacity-based: every slot a block keeps counts, empty or not (what the hardware runs).
    """
    reducers = model.reducers if reducers is None else reducers
    counts = token_counts(model.base.patch_embed.num_patches + 1, len(model.base.trunk), reducers)
    return _flops_of_counts(model, reducers, counts) / 1e9


def effective_gflops(model: nn.Module, images: torch.Tensor, cam_label: torch.Tensor | None = None,
                     view_label: torch.Tensor | None = None) -> tuple[float, list[float]]:
    """Mean analytic GFLOPs per image counting valid tokens only, from one forward pass over `images`.

    Returns (mean GFLOPs per image, mean valid tokens entering each trunk block and leaving the trunk).
    Equal to `transreid_gflops` for methods that never leave a slot empty (fixed r).
    """
    was_training, counting = model.training, model.count_tokens
    model.eval()
    model.count_tokens = True
    try:
        with torch.no_grad():
            model(images, cam_label=cam_label, view_label=view_label)
        state = model.last_state
    finally:
        model.train(was_training)
        model.count_tokens = counting
    if state is None:  # no reducer: nothing varies
        t = model.base.patch_embed.num_patches + 1
        return transreid_gflops(model), [float(t)] * (len(model.base.trunk) + 1)
    per_block = torch.stack(state.counts, dim=1).cpu()  # (B, trunk + 1)
    reducers = model.reducers
    flops = [_flops_of_counts(model, reducers, list(zip(row[:-1], row[1:]))) for row in per_block.tolist()]
    return sum(flops) / len(flops) / 1e9, per_block.float().mean(dim=0).tolist()
