"""ATM (Lee & Choi, "Lossless Token Merging Even Without Fine-Tuning in Vision Transformers").

Per block l (1-based), after attention: bipartite matching on the keys (averaged over heads, cosine);
every source token whose best partner is more similar than the layer's threshold
theta^l = max(alpha - (e^{beta (l - 1)} - 1), theta_min) (Eq. 1) merges into it, size-weighted. Up to
the splitting depth l_s the split alternates (ToMe); after it, it is size-distinctive: the patch tokens
sorted by merging size, the smaller half are sources and the larger half destinations, so that two
large tokens never merge (Theorem 1). Proportional attention follows from the tracked sizes.

Batching (docs/methods.md, ATM). The paper merges the batch mean of the
per-image counts in every image, so an image's feature depends on its batch-mates: a gallery cannot
accept that. Here the default `MODE image` lets every image merge what its own thresholds say through
the capacity contract: the tokens merged away become empty slots (size 0), and after every merging block
each image's valid tokens are moved to the front in their order (ToMe's output order: the kept A tokens,
then the B tokens), which is the sequence the paper's ATM gives that image at batch size 1. `MODE batch`
is the paper's: every image merges the batch's mean count (rounded), its top pairs by similarity,
threshold or not. `MIN_R` (not in the paper) makes every image merge at least that many pairs per block,
so the capacity shrinks by MIN_R per block; 0 keeps the paper's thresholds alone.

Running at the batch's size, not the capacity (`SHRINK`, on by default). In eager mode the sequence is then
cut to the batch's largest valid token count, so the following blocks run on that many slots instead of the
full capacity, and the MLPs (per token) run on the valid tokens alone (`TokenState.valid_rows`): the FLOPs
the thresholds save are really saved, attention's at the fullest image's count, the MLP's at each image's.
That needs the counts on the host: one host-device synchronisation per merging block (a read of two
numbers; on a GPU it waits for the work queued so far, tens of microseconds next to a block's milliseconds
at batch 256). The slots cut are empty ones at the end,
masked everywhere, so a crop's feature does not depend on its batch-mates (to float rounding: the masked
softmax and matrix products run at another length). Where shapes must be static (ONNX export,
torch.compile, jit tracing, the meta device; `base.static_shapes`) and with `SHRINK False` nothing is read
back: every block keeps its capacity, with the same token order, so the features agree.

Blocks that cannot merge. A threshold above 1 (the early blocks under a positive OFFSET, which a GFLOPs
budget usually solves for) is above every cosine: without MIN_R such a block merges nothing in any image,
so it skips the matching, the masking and the host read and only puts the tokens in the split's order,
bit for bit what the full path gives (`ATM.unmerged_order`); its matching FLOPs are not counted.

The paper keeps only the class token in the last layer of models that classify from it alone. That is
valid only where the last reducing block feeds such a head (TransReID without JPM, timm with
global_pool='token'), never in front of JPM, which reads the patch tokens: `ClsOnly` declares
`cls_head_only` and `build_reducers` keeps it only where the model says so.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import TokenReducer, TokenState, bipartite_split, mask_invalid, static_shapes, take_tokens
from .exportable import stable_argsort, stable_ranks, top_and_rest
from .groups import compact_slots
from .knobs import option_knob
from .ops import bipartite_flops, cosine_scores
from .registry import MergeMethod, register_method
from .schedule import check_layers

MODES = ("image", "batch")
# A cosine of fp32 unit vectors exceeds 1 by float rounding only (a few ulps per 64-term dot product): a block
# whose threshold lies above this merges nothing, whatever the image.
COSINE_MAX = 1.0 + 1e-4


def atm_threshold(layer: int, alpha: float, beta: float, theta_min: float) -> float:
    """Eq. 1: theta^l = max(alpha - (e^{beta (l - 1)} - 1), theta_min) for a 1-based block `layer`."""
    return max(alpha - (math.exp(beta * (layer - 1)) - 1.0), theta_min)


def merging_error(n_i: Tensor, n_j: Tensor, cos: Tensor) -> Tensor:
    """Merging error of two unit tokens with sizes n_i, n_j (Definition 2, closed form of Eq. 5):
    E = N - sqrt(N^2 - 2 M delta), N = n_i + n_j, M = n_i n_j, delta = 1 - cos. Theorem 1 bounds it
    between M / N delta and 2 M / N delta: merging two large tokens costs the most."""
    total, prod = n_i + n_j, n_i * n_j
    return total - (total.square() - 2 * prod * (1 - cos)).sqrt()


def size_distinctive_split(size: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Sequence positions of the A (sources) and B (destinations) groups of the size-distinctive split.

    size (B, T) merging sizes, the class token at 0; valid (B, T) slots that hold tokens (None: all).
    The valid patch tokens are sorted by size (ties by position); the smaller half, floor(v / 2) of v,
    goes to A after the class token, the larger half to B. Static shapes: A has ceil(T / 2) slots
    (class token included), B floor(T / 2); empty slots fill whatever each group has left over.
    """
    B, T = size.shape
    P = T - 1
    s = size[:, 1:].float()
    ok = torch.ones_like(s, dtype=torch.bool) if valid is None else valid[:, 1:]
    rank = stable_ranks(s.masked_fill(~ok, math.inf))  # each patch's rank by size
    half = (ok.sum(dim=1, keepdim=True) // 2)
    # Group keys: sources first (by rank), then empty slots, then destinations: one sort places them all.
    key = torch.where(rank < half, rank, torch.where(ok, 2 * P + rank, P + rank))
    grouped = stable_argsort(key) + 1  # keys are distinct: any sort gives this order
    na = P // 2
    cls = grouped.new_zeros(B, 1)
    return torch.cat([cls, grouped[:, :na]], dim=1), grouped[:, na:]


class ATM(TokenReducer):
    """ATM for one block: threshold `theta`, split `size_split` (after l_s) or alternating, `mode`
    'image' (per-image counts, empty slots) or 'batch' (the paper's batch-mean count); `shrink`: in eager mode
    cut the sequence to the batch's largest valid token count (one host read per block, see the module)."""

    may_empty = True

    def __init__(self, theta: float, size_split: bool = False, mode: str = "image", min_r: int = 0,
                 shrink: bool = True):
        if mode not in MODES:
            raise ValueError(f"MERGE.ATM.MODE must be one of {MODES}, got {mode!r}")
        if min_r < 0:
            raise ValueError(f"MERGE.ATM.MIN_R must be >= 0, got {min_r}")
        self.theta, self.size_split, self.mode, self.min_r = float(theta), size_split, mode, int(min_r)
        self.shrink = bool(shrink)
        # No similarity can pass the threshold and no pair is forced: the block merges nothing in any image.
        self.merges_nothing = self.theta > COSINE_MAX and self.min_r == 0

    def forced(self, num_tokens: int) -> int:
        """Pairs every image merges (and the block removes from its capacity): MIN_R, at most the sources."""
        return min(self.min_r, (num_tokens - 1) // 2)

    def num_out(self, num_tokens: int) -> int:
        return num_tokens - self.forced(num_tokens)

    def __call__(self, x: Tensor, keys: Tensor, cls_attn: Tensor | None, state: TokenState) -> Tensor:
        if x.shape[1] < 3:
            return x  # nothing to pair
        if self.merges_nothing and not state.may_empty:
            return self.unmerged_order(x, state)
        state.init(x)
        state.valid_rows = None
        if state.may_empty:
            x = x * state.valid()[..., None].to(x.dtype)
        out = self.reduce(x, keys, cls_attn, state)
        state.may_empty = True
        return self.compact(out, state)

    def unmerged_order(self, x: Tensor, state: TokenState) -> Tensor:
        """What the merge gives when nothing merges, without matching: the tokens in the split's order (the A
        slots, then the B slots), which the following blocks' alternating splits and JPM read. Bit for bit the
        output of the full path, which adds zeros; sizes stay all ones (untracked while they are)."""
        if state.size is None and not (state.track_pos or state.trace_source):
            return x if self.size_split else torch.cat(bipartite_split(x), dim=1)  # equal sizes: identity split
        state.init(x)
        a_pos, b_pos = size_distinctive_split(state.size[..., 0]) if self.size_split else (None, None)
        for name in ("size", "pos", "source"):
            t = getattr(state, name)
            if t is not None:
                setattr(state, name, torch.cat(bipartite_split(t, a_pos, b_pos), dim=1))
        return torch.cat(bipartite_split(x, a_pos, b_pos), dim=1)

    def compact(self, x: Tensor, state: TokenState) -> Tensor:
        """Every image's valid tokens first, in order; in eager mode with `shrink`, only as many slots as the
        batch's fullest image holds, and the valid rows recorded for the MLP (`TokenState.valid_rows`), from
        one host read of two counts; else the capacity (static shapes)."""
        if not self.shrink or static_shapes(x):
            return compact_slots(x, state, x.shape[1])
        counts = state.valid().sum(dim=1)
        keep, total = torch.stack([counts.max(), counts.sum()]).tolist()
        x = compact_slots(x, state, keep)
        state.valid_rows = (x.shape, torch.nonzero_static(state.valid().flatten(), size=total)[:, 0])
        return x

    def matching_flops(self, num_tokens: int, dim: int, heads: int) -> int:
        return bipartite_flops(num_tokens, dim // heads) if num_tokens >= 3 and not self.merges_nothing else 0

    def merge_counts(self, node_max: Tensor) -> Tensor:
        """(B,) pairs each image merges, from its sources' best similarities (B, Na - 1)."""
        finite = torch.isfinite(node_max).sum(dim=1)
        count = (node_max > self.theta).sum(dim=1)
        if self.mode == "batch":  # the paper's r^{B,l}: one count for the whole batch
            count = count.float().mean().round().long().expand_as(count)
        count = count.clamp_min(self.min_r)
        return torch.minimum(count, finite)

    def reduce(self, x: Tensor, keys: Tensor, cls_attn: Tensor | None, state: TokenState) -> Tensor:
        T = x.shape[1]
        valid = state.valid() if state.may_empty else None
        with torch.no_grad():
            a_pos = b_pos = None
            if self.size_split:
                a_pos, b_pos = size_distinctive_split(state.size[..., 0], valid)
            # fp32 decisions; accumulated in fp32 from the keys as they are (no fp32 copy of every key)
            k_a, k_b = bipartite_split(keys.mean(dim=1, dtype=torch.float32), a_pos, b_pos)
            scores = cosine_scores(k_a, k_b)
            if valid is not None:
                v_a, v_b = bipartite_split(valid[..., None], a_pos, b_pos)
                scores = mask_invalid(scores, v_a[..., 0], v_b[..., 0])
            node_max, node_idx = scores[:, 1:].max(dim=-1)  # sources: the A patch tokens (class token aside)
            if self.mode == "image" and not self.min_r:
                # Each image merges exactly its sources above the threshold: the top-`count` by rank are those, so
                # the ranks (a sort per block) are not needed. Empty sources score -inf and never pass.
                merging = node_max > self.theta
            else:
                count = self.merge_counts(node_max)
                rank = stable_ranks(node_max, descending=True)
                merging = (rank < count[:, None]) & torch.isfinite(node_max)
            merging = torch.cat([merging.new_zeros(merging.shape[0], 1), merging], dim=1)  # (B, Na)
            dst = torch.cat([node_idx.new_zeros(node_idx.shape[0], 1), node_idx], dim=1)
            forced = self.forced(T)
            keep_a = None
            if forced:  # the top `forced` sources leave the sequence; the others that merge leave empty slots
                kept = top_and_rest(node_max, forced)[1] + 1
                keep_a = torch.cat([kept.new_zeros(kept.shape[0], 1), kept], dim=1)
        return _merge_into(x, state, merging, dst, a_pos, b_pos, keep_a)


def _merge_into(x: Tensor, state: TokenState, merging: Tensor, dst: Tensor, a_pos: Tensor | None,
                b_pos: Tensor | None, keep_a: Tensor | None) -> Tensor:
    """Size-weighted merge of the A tokens flagged `merging` (B, Na) into their B partners `dst`.

    Merged A slots become empty (size 0, zeros); output: the A slots (those of `keep_a` when given,
    positions into A), then the B slots. B tokens that receive nothing are unchanged.
    """
    size_a, size_b = bipartite_split(state.size, a_pos, b_pos)
    w = size_a * merging[..., None]
    den = size_b.scatter_add(1, dst[..., None], w)
    den_dst = take_tokens(den.clamp_min(torch.finfo(den.dtype).tiny), dst)
    gone = ~merging[..., None]

    def fuse(t: Tensor) -> tuple[Tensor, Tensor]:
        t_a, t_b = bipartite_split(t, a_pos, b_pos)
        contrib = w * (t_a - take_tokens(t_b, dst)) / den_dst
        fused = t_b.scatter_add(1, dst[..., None].expand(-1, -1, t.shape[-1]), contrib.to(t.dtype))
        return t_a * gone.to(t.dtype), fused

    def out(parts: tuple[Tensor, Tensor]) -> Tensor:
        a, b = parts
        return torch.cat([a if keep_a is None else take_tokens(a, keep_a), b], dim=1)

    if state.pos is not None:
        state.pos = out(fuse(state.pos))
    if state.source is not None:
        src_a, src_b = bipartite_split(state.source, a_pos, b_pos)
        summed = src_b.scatter_add(1, dst[..., None].expand(-1, -1, src_a.shape[-1]), src_a * merging[..., None])
        state.source = out((src_a * gone, summed))
    state.size = out((size_a * gone, den))
    return out(fuse(x))


class ClsOnly(TokenReducer):
    """The paper's last layer for heads that read the class token alone: keep it, drop every other token.

    `cls_head_only`: valid only in the last block in front of such a head; elsewhere (JPM) the schedule
    uses `fallback` (the block's ordinary reducer, or None) instead.
    """

    cls_head_only = True

    def __init__(self, fallback: TokenReducer | None = None):
        self.fallback = fallback

    def num_out(self, num_tokens: int) -> int:
        return 1

    def reduce(self, x: Tensor, keys: Tensor, cls_attn: Tensor | None, state: TokenState) -> Tensor:
        for name in ("size", "source", "pos"):
            t = getattr(state, name)
            if t is not None:
                setattr(state, name, t[:, :1])
        return x[:, :1]


def build_atm(merge, depth: int, rs: dict[int, int] | None) -> dict[int, TokenReducer]:
    """ATM reducers in MERGE.ATM.LAYERS (empty: every block), thresholds by Eq. 1 for each block plus OFFSET."""
    o = merge.ATM
    if str(o.MODE) not in MODES:
        raise ValueError(f"MERGE.ATM.MODE must be one of {MODES}, got {o.MODE!r}")
    layers = check_layers(o.LAYERS, depth, "MERGE.ATM.LAYERS") if len(o.LAYERS) else list(range(1, depth + 1))
    reducers: dict[int, TokenReducer] = {
        layer - 1: ATM(atm_threshold(layer, o.ALPHA, o.BETA, o.THETA_MIN) + o.OFFSET, layer > o.SPLIT_DEPTH, o.MODE,
                       o.MIN_R, o.SHRINK)
        for layer in layers
    }
    if o.CLS_ONLY_LAST:
        reducers[depth - 1] = ClsOnly(reducers.get(depth - 1))
    return reducers


register_method(MergeMethod(
    "atm", build_atm,
    options={
        "ALPHA": 1.0,  # Eq. 1, initial threshold (DeiT-B "lossless" row of the paper's Table A2)
        "BETA": 0.025,  # Eq. 1, decay rate
        "THETA_MIN": 0.89,  # Eq. 1, floor
        "SPLIT_DEPTH": 9,  # l_s: alternating split in blocks 1..l_s, size-distinctive after (3/4 of 12 blocks)
        "MODE": "image",  # image: each image merges what its thresholds say (empty slots) | batch: the paper's mean
        "MIN_R": 0,  # every image merges at least this many pairs per block (capacity shrinks); 0: the paper
        "LAYERS": [],  # 1-based blocks that merge; empty: every block that can reduce
        "CLS_ONLY_LAST": True,  # last block keeps the class token alone where the head reads only it (never JPM)
        "OFFSET": 0.0,  # not in the paper: added to every block's threshold (after THETA_MIN); the budget knob
        "SHRINK": True,  # eager: run each block at the batch's largest valid count (one host read per block)
    },
    # SHRINK changes what runs, not the features (to float rounding): not part of a gallery's fingerprint.
    identity=("ALPHA", "BETA", "THETA_MIN", "SPLIT_DEPTH", "MODE", "MIN_R", "LAYERS", "CLS_ONLY_LAST", "OFFSET"),
    # A budget shifts every threshold by MERGE.ATM.OFFSET: cosines lie in [-1, 1], so +2 merges nothing and
    # -3 merges every valid source; matched on effective GFLOPs (per-image counts).
    gflops_knob=option_knob("offset", "ATM.OFFSET", 2.0, -3.0, doc="MERGE.ATM.OFFSET, added to every threshold"),
    summary="ATM: layer-wise thresholds, size-distinctive matching after l_s, per-image counts (MERGE.ATM)"))
