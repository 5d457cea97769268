"""STM-ReID: spatial-aware, training-free token merging (DSE-Assess, CCF-Match, PRN-Fuse).

Implements the paper's Eq. 3-9 and Algorithms 1-3 (the equations as implemented: docs/methods.md, STM-ReID).
Each step is a small pure function of tensors; `STM` strings them together for one block. Per block:

1. virtual coordinates of the N patch tokens in sequence order and their k nearest neighbours
   (cached per N and device), 2. the AdaptGST prior W, 3. local neighbourhood entropy of the class
   token's attention, 4. head weights softmax_h(-H), 5. PR-Degree S = W * sum_h R A, 6. grouping by
   S, 7. the CC-Function, 8. bipartite soft matching, 9. PRN-Fuse.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import (
    BipartiteMerge,
    TokenReducer,
    TokenState,
    bipartite_cosine,
    bipartite_match,
    bipartite_r,
    bipartite_split,
    mask_invalid,
    merge_state,
    put_tokens_,
    size_weighted_merge,
    take_tokens,
)
from .exportable import grouped_max, stable_argsort
from .ops import bipartite_flops, knn_indices, virtual_neighbourhood
from .registry import MergeMethod, register_method

_EPS = 1e-12


def gaussian_prior(coords: Tensor, n: int, alpha: float) -> Tensor:
    """AdaptGST: W(i) = exp(-||c_i - (0.5, 0.5)||^2 / (2 sigma^2)), sigma = alpha sqrt(n). Shape (..., n)."""
    sigma = alpha * math.sqrt(n)
    return torch.exp(-((coords - 0.5) ** 2).sum(-1) / (2 * sigma**2))


_PRIORS: dict[tuple[int, int, float, str], Tensor] = {}


def virtual_prior(n: int, k: int, alpha: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """(neighbours (n, k), prior W (n,)) on the virtual grid of n tokens: like the neighbourhood, the prior
    depends on n alone, so it is computed once per (n, k, alpha, device) rather than in every block."""
    coords, neighbours = virtual_neighbourhood(n, k, device)
    key = (n, k, float(alpha), str(device))
    if key not in _PRIORS:
        _PRIORS[key] = gaussian_prior(coords, n, alpha)
    return neighbours, _PRIORS[key]


def neighbourhood_entropy(attn: Tensor, neighbours: Tensor, normalized: bool = False) -> Tensor:
    """Local entropy of the class-token attention over each token's neighbourhood.

    attn: (B, H, n) class-token attention to the patch tokens; neighbours: (n, k) or (B, n, k).
    Literal (Eq. 5): H = -sum_{j in N(i)} A_j log A_j. Normalised: the entropy of A restricted to N(i)
    and renormalised, log Z - sum A log A / Z with Z = sum_{N(i)} A.
    """
    B, H, n = attn.shape
    a = attn.clamp_min(_EPS)
    idx = neighbours.reshape(-1, n * neighbours.shape[-1]) if neighbours.dim() == 3 else neighbours.reshape(1, -1)
    idx = idx[:, None].expand(B, H, -1)
    alog = (a * a.log()).gather(-1, idx).unflatten(-1, (n, -1)).sum(-1)
    if not normalized:
        return -alog
    z = a.gather(-1, idx).unflatten(-1, (n, -1)).sum(-1)
    return z.log() - alog / z


def pr_degree(attn: Tensor, entropy: Tensor, prior: Tensor) -> Tensor:
    """PR-Degree S_i = W(i) sum_h softmax_h(-H)[h, i] A[h, i]: (B, n) from attn/entropy (B, H, n)."""
    head_weight = (-entropy).softmax(dim=1)
    return prior * (head_weight * attn).sum(dim=1)


def pr_grouping(score: Tensor) -> tuple[Tensor, Tensor]:
    """Sequence positions of A = [cls, p1, p3, ...] and B = [p2, p4, ...], patches ranked by `score` (B, n)."""
    order = stable_argsort(score, descending=True) + 1  # +1: skip the class token
    cls = order.new_zeros(order.shape[0], 1)
    return torch.cat([cls, order[:, 0::2]], dim=1), order[:, 1::2]


def cc_function(cos: Tensor, s_a: Tensor, s_b: Tensor, s_min: Tensor, d1: float, d2: float) -> Tensor:
    """CC-Function F = F_sim^d1 * F_res^d2 (Eq. 8-9).

    F_sim = (cos(k_a, k_b) + 1) / 2; F_res = S^_a S^_b with S^ = min_k S_k / S (inverse response).
    cos (B, Na, Nb) the keys' cosine similarity, s_a (B, Na), s_b (B, Nb), s_min (B, 1).
    """
    f_sim = (cos + 1) / 2
    if d1 != 1:  # x ** 1 is x: skip a pass over the (B, Na, Nb) matrix in the default setting
        f_sim = f_sim.pow(d1)
    # (u v)^d = u^d v^d: the power of the (B, Na) and (B, Nb) factors, not of their (B, Na, Nb) product
    f_res = (s_min / s_a).pow(d2)[:, :, None] * (s_min / s_b).pow(d2)[:, None, :]
    return f_sim * f_res


def prn_fuse(merge: BipartiteMerge, x: Tensor, score: Tensor, state: TokenState) -> Tensor:
    """PRN-Fuse: PR-weighted average of each group, rescaled to the group's largest norm; sizes add.

    Tokens that take part in no merge are returned unchanged (bit for bit).
    """
    out = merge.weighted_mean(x, score[..., None])
    # Rescale only the destinations that received sources: the others keep their own norm already.
    # Largest source norm of each source's group (no scatter 'amax': it does not export well).
    r = merge.src_pos.shape[1]
    norms = take_tokens(x, torch.cat([merge.src_pos, merge.dst_pos], dim=1)).norm(dim=-1, keepdim=True)
    src_max = grouped_max(norms[:, :r, 0], merge.dst_idx)[..., None]
    max_norm = torch.maximum(src_max, norms[:, r:])
    rows = merge.fused_rows()
    fused_dst = take_tokens(out, rows)
    rescaled = fused_dst / fused_dst.norm(dim=-1, keepdim=True).clamp_min(_EPS) * max_norm
    # In place: `out` is this function's own fresh tensor (copying it per block made PRN-Fuse cost more than
    # ToMe's fusion).
    put_tokens_(out, rows, rescaled.to(x.dtype))
    merge_state(merge, state)
    return out


class STM(TokenReducer):
    """STM-ReID for one block. Component switches reproduce the paper's Table 5 ablations.

    dse: group by PR-Degree (else ToMe's alternating split); ccf: match with the CC-Function (else
    cosine); prn: PRN-Fuse (else size-weighted mean). keys: 'concat' (full D-dim keys) or 'mean'
    (averaged over heads, as ToMe). entropy: 'literal' or 'normalized'. coords: 'virtual' or 'tracked'.
    """

    needs_cls_attn = True

    def __init__(
        self,
        r: int,
        alpha: float = 0.1,
        k: int = 9,
        delta1: float = 1.0,
        delta2: float = 0.05,
        dse: bool = True,
        ccf: bool = True,
        prn: bool = True,
        entropy: str = "literal",
        coords: str = "virtual",
        keys: str = "concat",
    ):
        if entropy not in ("literal", "normalized"):
            raise ValueError(f"MERGE.STM.ENTROPY must be 'literal' or 'normalized', got {entropy!r}")
        if coords not in ("virtual", "tracked"):
            raise ValueError(f"MERGE.STM.COORDS must be 'virtual' or 'tracked', got {coords!r}")
        if keys not in ("concat", "mean"):
            raise ValueError(f"MERGE.STM.KEYS must be 'concat' or 'mean', got {keys!r}")
        self.r, self.alpha, self.k, self.delta1, self.delta2 = r, alpha, k, delta1, delta2
        self.dse, self.ccf, self.prn = dse, ccf, prn
        self.entropy, self.coords, self.keys = entropy, coords, keys
        self.needs_cls_attn = dse or ccf or prn
        self.needs_pos = coords == "tracked"
        if self.needs_pos:
            # The k nearest tokens per image: a stable sort of data-dependent distances full of exact ties (the
            # patch grid); the only exportable stable sort here (a rank count) is O(n^3) per image for it.
            self.export_refusal = ("STM with tracked coordinates (MERGE.STM.COORDS tracked) sorts data-dependent "
                                   "token distances per image, which has no exportable stable equivalent at an "
                                   "acceptable cost; use MERGE.STM.COORDS virtual")

    def num_out(self, num_tokens: int) -> int:
        return num_tokens - bipartite_r(num_tokens, self.r)

    def matching_flops(self, num_tokens: int, dim: int, heads: int) -> int:
        if self.num_out(num_tokens) == num_tokens:
            return 0
        return bipartite_flops(num_tokens, dim if self.keys == "concat" else dim // heads)

    def assess(self, cls_attn: Tensor, state: TokenState) -> Tensor:
        """DSE-Assess: the PR-Degree (B, n) of the patch tokens from the class token's attention."""
        attn = cls_attn[:, :, 1:]
        n = attn.shape[-1]
        if self.coords == "tracked":
            coords = state.pos[:, 1:]
            neighbours = knn_indices(coords, self.k)
            prior = gaussian_prior(coords, n, self.alpha)
        else:
            neighbours, prior = virtual_prior(n, self.k, self.alpha, attn.device)
        entropy = neighbourhood_entropy(attn, neighbours, normalized=self.entropy == "normalized")
        return pr_degree(attn, entropy, prior)

    def reduce(self, x: Tensor, keys: Tensor, cls_attn: Tensor | None, state: TokenState) -> Tensor:
        r = bipartite_r(x.shape[1], self.r)
        valid = state.valid() if state.may_empty else None
        with torch.no_grad():
            metric = keys.mean(dim=1) if self.keys == "mean" else keys.transpose(1, 2).flatten(2)
            score = None
            if self.needs_cls_attn:
                score = self.assess(cls_attn, state)
                # The class token gets score 1; it is never merged, so the value only has to be finite.
                score = torch.cat([score.new_ones(score.shape[0], 1), score.clamp_min(_EPS)], dim=1)
                if valid is not None:  # empty slots weigh nothing in PRN-Fuse and rank last in the grouping
                    score = score * valid
            a_idx = b_idx = None
            if self.dse:
                a_idx, b_idx = pr_grouping(score[:, 1:])
            scores = bipartite_cosine(metric, a_idx, b_idx)
            if self.ccf:
                s_a, s_b = bipartite_split(score, a_idx, b_idx)
                patch_score = score[:, 1:] if valid is None else score[:, 1:].masked_fill(~valid[:, 1:], math.inf)
                s_min = patch_score.amin(dim=1, keepdim=True)
                scores = cc_function(scores, s_a, s_b, s_min, self.delta1, self.delta2)
            if valid is not None:
                v_a, v_b = bipartite_split(valid[..., None], a_idx, b_idx)
                scores = mask_invalid(scores, v_a[..., 0], v_b[..., 0])
            merge = BipartiteMerge.from_match(*bipartite_match(scores, r), a_idx, b_idx, may_empty=valid is not None)
        if self.prn:
            return prn_fuse(merge, x, score, state)
        return size_weighted_merge(merge, x, state)


def build_stm(merge, depth: int, rs: dict[int, int] | None) -> dict[int, TokenReducer]:
    """STM-ReID reducers for the blocks of the r schedule, with the options of MERGE.STM."""
    s = merge.STM
    return {
        i: STM(r, s.ALPHA, s.K, s.DELTA1, s.DELTA2, s.DSE, s.CCF, s.PRN, s.ENTROPY, s.COORDS, s.KEYS)
        for i, r in rs.items()
        if r > 0
    }


register_method(MergeMethod(
    "stm", build_stm, uses_r=True, gflops_knob="r",
    options={
        "ALPHA": 0.1,  # AdaptGST: sigma = ALPHA * sqrt(N)
        "K": 9,  # neighbourhood size for the local entropy
        "DELTA1": 1.0,  # exponent of the similarity term of the CC-Function
        "DELTA2": 0.05,  # exponent of the response term of the CC-Function
        "DSE": True,  # DSE-Assess: PR-Degree ordered grouping (else ToMe's alternating split)
        "CCF": True,  # CCF-Match: CC-Function (else plain cosine similarity)
        "PRN": True,  # PRN-Fuse: PR-weighted, max-norm fusion (else size-weighted mean)
        "ENTROPY": "literal",  # literal (Eq. 5) | normalized (A / sum over the neighbourhood)
        "COORDS": "virtual",  # virtual (Dynamic Virtual Coordinates) | tracked (true centroids)
        "KEYS": "concat",  # concat (full D-dim keys) | mean (averaged over heads, as ToMe)
    },
    summary="STM-ReID: DSE-Assess, CCF-Match, PRN-Fuse (options under MERGE.STM)"))
