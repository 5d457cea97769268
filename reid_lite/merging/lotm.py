"""LoTM (Haroun et al., ICONIP 2024, "Leveraging local similarity for token merging in Vision Transformers").

In each selected block, after attention: the patch tokens, in raster order on the real patch grid (21x10
at 256x128 with stride 12), form fixed disjoint pairs (1, 2), (3, 4), ... (Eq. 13); the K pairs whose two
tokens (the residual stream) are most similar by cosine merge (Eq. 14), each into the slot of its first
token, by their plain mean (Eq. 15; `WEIGHTING size` for the size-weighted mean). The class token stays
out of the pairing. Merged tokens keep their pair's place, so the sequence stays in raster order and
JPM reads it in spatial order; both grid widths of TransReID (10 and 8) are even, so the pairs of the
first merging block lie inside rows. After a merge, rows hold different numbers of tokens and a pair may
span a row's end (the docs: Token reduction, LoTM and DHTM). The paper has no size bias in attention,
so MERGE.PROP_ATTN does not apply (as for EViT).

Blocks: the paper's 4th, 7th and 11th of 12 (1-based). With JPM, block 11 is the last block of the
trunk (block 12 is copied into the global and JPM branches), so it merges before both branches.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import TokenReducer, TokenState
from .exportable import stable_ranks
from .groups import LocalMerge, check_weighting, compact_slots, fold_groups
from .knobs import count_knob
from .registry import MergeMethod, register_method
from .schedule import per_layer_k


def lotm_pairs(x: Tensor, k: int) -> Tensor:
    """Which of the fixed pairs (1, 2), (3, 4), ... of the patch tokens of `x` (B, T, C) merge: the `k`
    most similar by cosine (ties by position). Returns (B, T) `root`: the slot each token joins."""
    B, T, _ = x.shape
    pairs = (T - 1) // 2
    with torch.no_grad():
        p = x[:, 1:1 + 2 * pairs].float()
        a, b = p[:, 0::2], p[:, 1::2]
        score = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)
        merge = stable_ranks(score, descending=True) < k
        root = torch.arange(T, device=x.device).expand(B, -1).clone()
        second = torch.arange(pairs, device=x.device) * 2 + 2  # slot of each pair's second token
        root[:, second] = torch.where(merge, second - 1, second)
    return root


class LoTM(LocalMerge):
    """LoTM for one block: merge `k` of the fixed adjacent pairs."""

    k_key, unit = "MERGE.LOTM.K", "pairs"

    def __init__(self, k: int, weighting: str = "mean"):
        if k < 0:
            raise ValueError(f"MERGE.LOTM.K must be >= 0, got {k}")
        self.k, self.weighting = int(k), check_weighting(weighting, "MERGE.LOTM.WEIGHTING")

    def reduce(self, x: Tensor, keys: Tensor, cls_attn: Tensor | None, state: TokenState) -> Tensor:
        T = x.shape[1]
        root = lotm_pairs(x, T - self.num_out(T))
        return compact_slots(fold_groups(x, state, root, self.weighting), state, self.num_out(T))


def build_lotm(merge, depth: int, rs: dict[int, int] | None) -> dict[int, TokenReducer]:
    """LoTM reducers in the blocks of MERGE.LOTM.LAYERS, K merges each (or K_LIST's, one per layer)."""
    o = merge.LOTM
    return {i: LoTM(k, o.WEIGHTING) for i, k in per_layer_k(o, depth, "MERGE.LOTM").items()}


register_method(MergeMethod(
    "lotm", build_lotm, prop_attn=False,  # the paper has no size bias
    # A budget sets K in MERGE.LOTM.LAYERS (a K_LIST where no constant K fits), up to what the blocks can merge.
    gflops_knob=count_knob("k", "LOTM.K", "LOTM.K_LIST", "LOTM.LAYERS", "merges over MERGE.LOTM.LAYERS"),
    options={
        "K": 48,  # pairs merged per selected block (the paper's ViT-B/DeiT-B setting, about 30% fewer GFLOPs)
        "LAYERS": [4, 7, 11],  # 1-based blocks; 11 is the trunk's last with JPM
        "K_LIST": [],  # per-layer K (one per LAYERS entry), overrides K when set (a budget may choose one)
        "WEIGHTING": "mean",  # mean: the pair's plain mean (Eq. 15) | size: size-weighted
    },
    summary="LoTM: merge the K most similar fixed raster-adjacent pairs in MERGE.LOTM.LAYERS"))
