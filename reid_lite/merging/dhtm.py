"""DHTM (Haroun et al., VISAPP 2025, "Dynamic Hierarchical Token Merging for Vision Transformers").

In each selected block, after attention, K merges of spatially adjacent tokens (8-connectivity), each
the most similar adjacent pair by cosine of the residual stream, greedily and hierarchically: a merged
token may merge again (Algorithm 1 of the DHTM paper). The class token stays out.

Vectorised in `ROUNDS` rounds per block (a small fixed number of tensor steps, static shapes, no host
synchronisation): in each round every token points at its most similar neighbour; of those edges (a
mutual pair counted once, so they form a forest) the round's share of the K merges with the highest
similarity are taken at once, each tree folds into its root (found by pointer jumping) and the
similarities are recomputed for the next round. With ROUNDS = K one merge per round is exactly the
paper's global argmax per iteration; fewer rounds merge several pairs on the same similarities.

Neighbours come from each token's position on the real patch grid (the size-weighted centroid of its
patches, carried through merges): tokens i and j are adjacent when their centroids lie within Chebyshev
distance 1 + (s_i - 1) / 2 + (s_j - 1) / 2 grid cells (s: sizes). For single patches that is exactly
the 8-neighbourhood, for straight runs exactly region adjacency; for other shapes it may admit a token
slightly beyond the region's border, never miss a true neighbour. The merged token is the mean over
the patches it holds (Eq. 5; `WEIGHTING mean` for the plain mean of the tokens merged in a round).
A merged token takes the first slot of its group, so the sequence stays in raster order (of each
token's first patch) for JPM. The paper has
no size bias in attention, so MERGE.PROP_ATTN does not apply. Blocks 4, 7, 11 as in the paper (with
JPM, 11 is the trunk's last block, before both branches).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import TokenReducer, TokenState
from .exportable import group_first, stable_ranks
from .groups import LocalMerge, check_weighting, compact_slots, fold_groups
from .knobs import count_knob
from .ops import cosine_scores
from .registry import MergeMethod, register_method
from .schedule import per_layer_k


def grid_neighbours(pos: Tensor, size: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, n, n) adjacency of tokens from their centroids `pos` (B, n, 2) in [0, 1]^2 and sizes (B, n):
    Chebyshev distance in grid cells at most 1 + (s_i - 1) / 2 + (s_j - 1) / 2; a token is not its own
    neighbour, and empty tokens (size 0) have none."""
    cells = pos * pos.new_tensor(grid)
    dist = (cells[:, :, None] - cells[:, None]).abs().amax(dim=-1)
    half = (size - 1).clamp_min(0) / 2
    adj = dist <= 1 + half[:, :, None] + half[:, None] + 1e-4  # centroids are averages: allow rounding
    valid = size > 0
    eye = torch.eye(pos.shape[1], dtype=torch.bool, device=pos.device)
    return adj & valid[:, :, None] & valid[:, None] & ~eye


def forest_roots(parent: Tensor) -> Tensor:
    """The root of every node of a forest given by `parent` (B, n) (roots point at themselves), by pointer
    jumping: ceil(log2 n) gathers, whatever the trees look like."""
    root = parent
    for _ in range(max(1, math.ceil(math.log2(max(parent.shape[1], 2))))):
        root = root.gather(1, root)
    return root


def dhtm_round(x: Tensor, state: TokenState, budget: Tensor) -> tuple[Tensor, Tensor]:
    """One round: up to `budget` (B,) merges of adjacent patch tokens. Returns (root (B, T), merges (B,)).

    Every valid patch token points at its most similar neighbour (ties: the lowest position, which rules
    out cycles longer than two); of a mutual pair only the edge from the lower position counts. The
    `budget` most similar edges are taken: a forest, each edge one merge; each tree folds into its
    first slot.
    """
    B, T, _ = x.shape
    with torch.no_grad():
        adj = grid_neighbours(state.pos[:, 1:], state.size[:, 1:, 0], state.grid)
        sim = cosine_scores(x[:, 1:].float(), x[:, 1:].float()).masked_fill(~adj, -math.inf)
        best, to = sim.max(dim=-1)  # (B, n): first index among ties
        n = T - 1
        ar = torch.arange(n, device=x.device).expand(B, -1)
        mutual = to.gather(1, to) == ar
        edge = torch.isfinite(best) & ~(mutual & (ar > to))
        score = best.masked_fill(~edge, -math.inf)
        take = edge & (stable_ranks(score, descending=True) < budget[:, None])
        root = forest_roots(torch.where(take, to, ar))
        # Each group goes to its first slot, so that slots stay ordered by their first patch (raster order).
        root = group_first(root) + 1
        root = torch.cat([root.new_zeros(B, 1), root], dim=1)
    return root, take.sum(dim=1)


class DHTM(LocalMerge):
    """DHTM for one block: `k` hierarchical merges of adjacent tokens in `rounds` vectorised rounds."""

    k_key, unit = "MERGE.DHTM.K", "merges"

    needs_pos = True

    def __init__(self, k: int, rounds: int = 4, weighting: str = "size"):
        if k < 0 or rounds < 1:
            raise ValueError(f"MERGE.DHTM.K must be >= 0 and ROUNDS >= 1, got {k} and {rounds}")
        self.k, self.rounds = int(k), int(rounds)
        self.weighting = check_weighting(weighting, "MERGE.DHTM.WEIGHTING")

    def matching_flops(self, num_tokens: int, dim: int, heads: int) -> int:
        k = num_tokens - self.num_out(num_tokens)
        return min(self.rounds, k) * (num_tokens - 1) ** 2 * dim if k else 0

    def reduce(self, x: Tensor, keys: Tensor, cls_attn: Tensor | None, state: TokenState) -> Tensor:
        T = x.shape[1]
        k = T - self.num_out(T)
        rounds = min(self.rounds, k)
        left = torch.full((x.shape[0],), k, device=x.device)
        for i in range(rounds):  # a fixed number of tensor steps; the last takes whatever is left
            quota = left if i == rounds - 1 else torch.clamp(left, max=math.ceil(k / rounds))
            root, done = dhtm_round(x, state, quota)
            x = fold_groups(x, state, root, self.weighting)
            left = left - done
        return compact_slots(x, state, T - k)


def build_dhtm(merge, depth: int, rs: dict[int, int] | None) -> dict[int, TokenReducer]:
    """DHTM reducers in the blocks of MERGE.DHTM.LAYERS, K merges each (or K_LIST's, one per layer)."""
    o = merge.DHTM
    return {i: DHTM(k, o.ROUNDS, o.WEIGHTING) for i, k in per_layer_k(o, depth, "MERGE.DHTM").items()}


register_method(MergeMethod(
    "dhtm", build_dhtm, prop_attn=False,  # the paper has no size bias
    # A budget sets K in MERGE.DHTM.LAYERS (a K_LIST where no constant K fits), up to what the blocks can merge.
    gflops_knob=count_knob("k", "DHTM.K", "DHTM.K_LIST", "DHTM.LAYERS", "merges over MERGE.DHTM.LAYERS"),
    options={
        "K": 48,  # merges per selected block (the paper's DeiT-B comparison, about 30% fewer GFLOPs)
        "LAYERS": [4, 7, 11],  # 1-based blocks; 11 is the trunk's last with JPM
        "K_LIST": [],  # per-layer K (one per LAYERS entry), overrides K when set (a budget may choose one)
        "ROUNDS": 4,  # vectorised rounds per block; ROUNDS = K is the paper's one merge per iteration
        "WEIGHTING": "size",  # size: mean over the patches held (Eq. 5) | mean: plain mean of the tokens merged
    },
    summary="DHTM: K greedy hierarchical merges of 8-connected neighbours in MERGE.DHTM.LAYERS"))
