"""ToMe (Bolya et al., ICLR 2023): bipartite soft matching on head-averaged keys, size-weighted fusion."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import (
    BipartiteMerge,
    TokenReducer,
    TokenState,
    bipartite_match,
    bipartite_r,
    mask_invalid,
    size_weighted_merge,
)
from .ops import bipartite_flops, cosine_scores
from .registry import MergeMethod, register_method


def tome_match(metric: Tensor, r: int, valid: Tensor | None = None) -> BipartiteMerge:
    """ToMe's matching: alternating split of the sequence, cosine similarity of `metric` (B, T, C).

    `valid` (B, T): which slots hold tokens, when some may be empty (None: all do).
    """
    with torch.no_grad():
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = cosine_scores(a, b)
        if valid is not None:
            scores = mask_invalid(scores, valid[:, ::2], valid[:, 1::2])
        return BipartiteMerge.from_match(*bipartite_match(scores, r), may_empty=valid is not None)


class ToMe(TokenReducer):
    """Merge `r` tokens per block, ToMe's way."""

    def __init__(self, r: int):
        self.r = r

    def num_out(self, num_tokens: int) -> int:
        return num_tokens - bipartite_r(num_tokens, self.r)

    def matching_flops(self, num_tokens: int, dim: int, heads: int) -> int:
        return bipartite_flops(num_tokens, dim // heads) if self.num_out(num_tokens) < num_tokens else 0

    def reduce(self, x: Tensor, keys: Tensor, cls_attn: Tensor | None, state: TokenState) -> Tensor:
        valid = state.valid() if state.may_empty else None
        merge = tome_match(keys.mean(dim=1, dtype=torch.float32), bipartite_r(x.shape[1], self.r), valid)
        return size_weighted_merge(merge, x, state)


def build_tome(merge, depth: int, rs: dict[int, int] | None) -> dict[int, TokenReducer]:
    """ToMe reducers for the blocks of the r schedule."""
    return {i: ToMe(r) for i, r in rs.items() if r > 0}


register_method(MergeMethod(
    "tome", build_tome, uses_r=True, gflops_knob="r",
    summary="ToMe: alternating split, head-averaged keys, cosine, bipartite matching, size-weighted mean"))
