"""DTEM (Lee & Hong, NeurIPS 2024, "Learning to Merge Tokens via Decoupled Embedding for Efficient Vision
Transformers"): ToMe's bipartite merging driven by a small learned embedding per block instead of the keys.

In each merging block a decoupled embedding z = f(stopgrad(LN1(x_in))) (one linear layer to 64 dims, the
paper's main setting, Eq. 4) decides which tokens merge (cosine, Eq. 5); the ViT's own features are only
merged. Two regimes (the paper's Sections 3-4 and appendix A.2):

- inference (eval mode, or no gradient): hard merging exactly as ToMe (alternating split, bipartite
  matching on cos(z), size-weighted mean, proportional attention), r tokens per block;
- training the embedding (train mode with gradients): the continuous relaxation. Soft grouping
  (`soft_bipartite_assignment`, Eqs. 6-8: r successive global softmaxes at temperature TAU over the
  A x B similarities divided by SCALE, each suppressing the rows it chose) and soft merging (`soft_merge`,
  Eqs. 9-10: B tokens absorb a fraction of A tokens, A sizes shrink). Every token is kept; proportional
  attention fades absorbed tokens out. After each block the r A tokens with the smallest effective size
  leave the active set (appendix A.2); the tokens are reordered as a hard merge orders them (kept A, B,
  then the ones that left), so the next block's split sees what inference would.

Adaptations to TransReID (recorded in the README): the embedding reads the block's normalised input (the
qkv input; the paper's "input to the self-attention", ambiguity 4.5 c); the similarity is divided by SCALE
= 0.1 and then by TAU = 0.1 (ambiguity 4.5 b, the "divided" reading); the soft split is ToMe's
alternation over the active tokens (4.5 d); the class token never merges; JPM's branches receive every
token with its size in training, the merged ones at inference. Modular training (backbone and heads frozen,
ReID losses) is `MERGE.DTEM.TRAIN_EMBEDDING_ONLY` in tools/train.py (`reid_lite.engine.trainer`).
The embedding is saved in the model's state dict (`base.blocks.<i>.reducer.embed.*`, see `learned.py`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..utils.checkpoint_file import CheckpointError
from .base import TokenReducer, TokenState, bipartite_match, bipartite_r, size_weighted_merge, take_tokens
from .exportable import top_and_rest
from .learned import load_reducer_weights, read_reducer_weights
from .ops import bipartite_flops, cosine_scores
from .registry import MergeMethod, register_method
from .tome import tome_match

#: Floor of a softly absorbed token's size: log(size) biases attention, and log 0 has no gradient.
MIN_SIZE = 1e-6


# ----------------------------------------------------------------------------------------- pure tensor functions
def soft_bipartite_assignment(scores: Tensor, r: int, tau: float, eps: float = 1e-6) -> Tensor:
    """DTEM's soft grouping (Eqs. 6-8): a relaxed choice of the r best A -> B edges, at most one per A row.

    scores (B, Na, Nb): similarities already scaled (-inf where an edge is not allowed, e.g. the class row).
    For t = 1..r: A^t = softmax over all Na x Nb entries of S^t / tau; S^{t+1} = S^t + log(1 - rowsum(A^t)).
    Returns E = sum_t A^t, each row divided by max(1, its sum) (that divisor without gradient), so rows sum
    to at most 1. As tau -> 0, E tends to the one-hot edges of ToMe's bipartite matching (`bipartite_match`).
    The r steps are sequential by definition (each suppresses the rows already chosen); r is small.
    """
    B, Na, Nb = scores.shape
    s = scores.float()
    total = torch.zeros_like(s)
    for _ in range(r):
        a = (s / tau).flatten(1).softmax(dim=-1).view(B, Na, Nb)
        total = total + a
        s = s + (1 - a.sum(dim=-1, keepdim=True)).clamp_min(eps).log()
    return total / total.sum(dim=-1, keepdim=True).detach().clamp_min(1.0)


def soft_merge(xa: Tensor, xb: Tensor, ma: Tensor, mb: Tensor, e: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """DTEM's soft merging (Eqs. 9-10) of A tokens into B tokens with the soft edges `e` (B, Na, Nb).

    xa (B, Na, C), xb (B, Nb, C): tokens; ma (B, Na, 1), mb (B, Nb, 1): their sizes. Each B token becomes
    the size-weighted mean of itself and the fractions e_ij m_i of the A tokens; its size grows by them; each
    A token keeps its features and its size shrinks to m_i (1 - sum_j e_ij) (floored at MIN_SIZE times m_i).
    Returns (xb', mb', ma'). With one-hot rows this is ToMe's size-weighted merge of the B tokens.
    """
    et = e.transpose(1, 2).to(xa.dtype)
    mb_new = mb + et @ ma
    xb_new = (mb * xb + et @ (ma * xa)) / mb_new
    ma_new = ma * (1 - e.sum(dim=-1, keepdim=True)).clamp_min(MIN_SIZE)
    return xb_new, mb_new, ma_new


def hard_assignment(scores: Tensor, r: int) -> Tensor:
    """The one-hot (B, Na, Nb) edges ToMe's bipartite matching picks on `scores` (what the soft grouping
    tends to as its temperature falls); row 0 (the class token) never merges."""
    _, src, dst = bipartite_match(scores, r)
    e = torch.zeros_like(scores, dtype=torch.float32)
    rows = torch.arange(scores.shape[0], device=scores.device)[:, None]
    e[rows, src, dst] = 1.0
    return e


def make_embedding(width: int, dim: int, hidden: int = 0, generator: torch.Generator | None = None) -> nn.Module:
    """The decoupled embedding f: one linear layer width -> dim (`hidden` 0, the paper's setting) or a
    two-layer MLP with a GELU. Initialised from `generator` (a random projection, N(0, 1/fan_in), biases
    zero), so a fresh embedding is reproducible and building one never draws from the global RNG."""
    layers = [nn.Linear(width, dim)] if hidden <= 0 else [nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, dim)]
    with torch.no_grad():
        for layer in layers:
            if isinstance(layer, nn.Linear):
                layer.weight.normal_(0.0, layer.in_features ** -0.5, generator=generator)
                layer.bias.zero_()
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


# ----------------------------------------------------------------------------------------- the reducer
class DTEM(TokenReducer, nn.Module):
    """DTEM for one block: merge `r` tokens, chosen with this block's learned embedding `embed`.

    An nn.Module: attached to a block, its embedding is part of the model's state dict. Hard (ToMe-shaped,
    exportable) in eval mode or without gradients; soft while training the embedding.
    """

    needs_block_input = True

    def __init__(self, r: int, block: int, dim: int = 64, hidden: int = 0, tau: float = 0.1, scale: float = 0.1,
                 seed: int = 0, weights: dict[str, Tensor] | None = None, weights_source: str = "",
                 weights_missing: str | None = None):
        nn.Module.__init__(self)
        if dim < 1 or hidden < 0:
            raise ValueError(f"MERGE.DTEM.DIM must be >= 1 and HIDDEN >= 0, got {dim}, {hidden}")
        if tau <= 0 or scale <= 0:
            raise ValueError(f"MERGE.DTEM.TAU and SCALE must be > 0, got {tau}, {scale}")
        self.r, self.block, self.dim, self.hidden = int(r), int(block), int(dim), int(hidden)
        self.tau, self.scale, self.seed = float(tau), float(scale), int(seed)
        self.embed: nn.Module | None = None  # created by `bind`, for the block's width
        self.embed_width = 0
        self._weights = weights
        self.weights_source = weights_source  # the option that gave the weights, 'fresh', 'checkpoint' or ''
        self.weights_missing = weights_missing

    def bind(self, block: nn.Module) -> None:
        width = int(block.attn.qkv.in_features)
        if self.embed is not None and self.embed_width == width:
            return
        gen = torch.Generator().manual_seed(self.seed * 1009 + self.block)
        self.embed = make_embedding(width, self.dim, self.hidden, gen)
        self.embed_width = width
        if self._weights is not None:
            load_reducer_weights({self.block: self}, {self.block: self._weights}, self.weights_source)

    def num_out(self, num_tokens: int) -> int:
        return num_tokens - bipartite_r(num_tokens, self.r)

    def matching_flops(self, num_tokens: int, dim: int, heads: int) -> int:
        if self.num_out(num_tokens) == num_tokens:
            return 0
        proj = num_tokens * dim * self.dim if not self.hidden else num_tokens * self.hidden * (dim + self.dim)
        return proj + bipartite_flops(num_tokens, self.dim)

    def metric(self, state: TokenState) -> Tensor:
        """The decoupled embedding of the block's (normalised) input tokens; no gradient into the ViT. A pending
        embedding computes with its seeded fresh values (a model without trained weights, for FLOPs and speed);
        loading trained weights without it is refused (`learned.resolve_learned_state`)."""
        return self.embed(state.block_input.detach())

    def reduce(self, x: Tensor, keys: Tensor, cls_attn: Tensor | None, state: TokenState) -> Tensor:
        z = self.metric(state)
        if self.training and torch.is_grad_enabled():
            return self.soft_reduce(x, z, state)
        valid = state.valid() if state.may_empty else None
        return size_weighted_merge(tome_match(z, bipartite_r(x.shape[1], self.r), valid), x, state)

    def soft_reduce(self, x: Tensor, z: Tensor, state: TokenState) -> Tensor:
        """Training: soft grouping and merging over the active tokens; returns every token, reordered as a
        hard merge would (kept A, B, the r A tokens that left, then the tokens that left earlier)."""
        T = x.shape[1]
        n = T if state.active is None else state.active
        r = bipartite_r(n, self.r)
        if r == 0:
            return x
        size = state.size.to(x.dtype)
        xa, xb, ma, mb = x[:, 0:n:2], x[:, 1:n:2], size[:, 0:n:2], size[:, 1:n:2]
        scores = cosine_scores(z[:, 0:n:2].float(), z[:, 1:n:2].float()) / self.scale
        scores = torch.cat([torch.full_like(scores[:, :1], -math.inf), scores[:, 1:]], dim=1)  # class token stays
        e = soft_bipartite_assignment(scores, r, self.tau)
        xb, mb, ma = soft_merge(xa, xb, ma, mb, e)
        with torch.no_grad():  # the r A tokens with the smallest effective size leave (appendix A.2)
            key = ma[..., 0].detach().clone()
            key[:, 0] = math.inf
            gone, kept = top_and_rest(key, r, descending=False)
        parts_x = [take_tokens(xa, kept), xb, take_tokens(xa, gone), x[:, n:]]
        parts_m = [take_tokens(ma, kept), mb, take_tokens(ma, gone), size[:, n:]]
        state.size = torch.cat(parts_m, dim=1).float()
        state.active = n - r
        return torch.cat(parts_x, dim=1)


def _weights_missing_reason() -> str:
    return ("MERGE.METHOD dtem needs its learned embedding: set MERGE.DTEM.WEIGHTS to a trained embedding file (or "
            "a checkpoint holding base.blocks.<i>.reducer.*), or MERGE.DTEM.FRESH True for a fresh one (to train it: "
            "tools/train.py ... MERGE.DTEM.TRAIN_EMBEDDING_ONLY True MERGE.DTEM.FRESH True)")


def build_dtem(merge: Any, depth: int, rs: dict[int, int] | None) -> dict[int, TokenReducer]:
    """DTEM reducers for every block of the r schedule (r = 0 too, so the embedding's blocks are MERGE.LAYERS
    whatever r a budget picks). Weights from MERGE.DTEM.WEIGHTS (strictly), a fresh seeded embedding with
    FRESH, or pending until a checkpoint supplies them."""
    o = merge.DTEM
    entries, source, missing = None, "", None
    if o.WEIGHTS:
        if o.FRESH:
            raise ValueError("MERGE.DTEM.WEIGHTS and MERGE.DTEM.FRESH both say where the embedding comes from: "
                             "set one")
        source = f"MERGE.DTEM.WEIGHTS {o.WEIGHTS}"
        entries = read_reducer_weights(o.WEIGHTS)
        missing_blocks = sorted(set(rs) - set(entries))
        extra = sorted(set(entries) - set(rs))
        if missing_blocks or extra:
            raise CheckpointError(f"{source} holds the embedding of blocks {sorted(i + 1 for i in entries)}, but "
                                  f"DTEM merges in blocks {sorted(i + 1 for i in rs)} (MERGE.LAYERS): use the "
                                  "blocks it was trained for")
    elif o.FRESH:
        source = "fresh"
    else:
        missing = _weights_missing_reason()
    return {i: DTEM(r, i, o.DIM, o.HIDDEN, o.TAU, o.SCALE, o.SEED, entries[i] if entries else None, source, missing)
            for i, r in rs.items()}


def trains_embedding_only(cfg: Any) -> bool:
    """Whether a training config asks for DTEM's modular training (MERGE.DTEM.TRAIN_EMBEDDING_ONLY with
    MERGE.METHOD dtem): backbone and heads frozen, only the embedding learns, with soft merging."""
    return str(cfg.MERGE.METHOD).lower() == "dtem" and bool(cfg.MERGE.DTEM.TRAIN_EMBEDDING_ONLY)


register_method(MergeMethod(
    "dtem", build_dtem, uses_r=True, gflops_knob="r", learned=True,
    options={
        "DIM": 64,  # d': embedding dimension (the paper's ViT-S/B setting; 128 for ViT-L)
        "HIDDEN": 0,  # 0: one linear layer (the paper's main setting); > 0: a two-layer MLP of this width
        "TAU": 0.1,  # temperature of the soft grouping (Eq. 6; training only)
        "SCALE": 0.1,  # similarities are divided by this before the soft grouping (appendix A.2; training only)
        "WEIGHTS": "",  # the learned embedding: an embedding file or a checkpoint holding it (weights-only, strict)
        "FRESH": False,  # start from a fresh seeded embedding (to train one) instead of loading it
        "SEED": 0,  # seed of a fresh embedding
        "TRAIN_EMBEDDING_ONLY": False,  # tools/train.py: freeze backbone and heads, train the embedding (soft merging)
    },
    # What changes features: the embedding's shape here, its values through the fingerprint's learned_sha256
    # (so a moved embedding file is the same model, a retrained one at the same path is not).
    identity=("DIM", "HIDDEN"),
    summary="DTEM: ToMe's bipartite merging on a learned per-block embedding (trained with soft merging)"))
