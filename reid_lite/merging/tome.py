"""ToMe (Bolya et al., ICLR 2023): bipartite soft matching on head-averaged keys, size-weighted fusion."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import BipartiteMerge, TokenReducer, TokenState, bipartite_match, bipartite_r, size_weighted_merge
from .ops import bipartite_flops, cosine_scores


def tome_match(metric: Tensor, r: int) -> BipartiteMerge:
    """ToMe's matching: alternating split of the sequence, cosine similarity of `metric` (B, T, C)."""
    with torch.no_grad():
        a, b = metric[:, ::2], metric[:, 1::2]
        return BipartiteMerge.from_match(*bipartite_match(cosine_scores(a, b), r))


class ToMe(TokenReducer):
    """Merge `r` tokens per block, ToMe's way."""

    def __init__(self, r: int):
        self.r = r

    def num_out(self, num_tokens: int) -> int:
        return num_tokens - bipartite_r(num_tokens, self.r)

    def matching_flops(self, num_tokens: int, dim: int, heads: int) -> int:
        return bipartite_flops(num_tokens, dim // heads) if self.num_out(num_tokens) < num_tokens else 0

    def reduce(self, x: Tensor, keys: Tensor, cls_attn: Tensor | None, state: TokenState) -> Tensor:
        merge = tome_match(keys.mean(dim=1), bipartite_r(x.shape[1], self.r))
        return size_weighted_merge(merge, x, state)
