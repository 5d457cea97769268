"""The contract every token-reduction method implements, and the bipartite-merge primitives they share.

A reducer is called inside a block after `x = x + attn(norm1(x))` and before the MLP with
the block's tokens `x` (B, T, C), the attention keys (B, H, T, d), and the class token's per-head
attention row (B, H, T) when it asked for it (`needs_cls_attn`). It returns fewer tokens and updates
the `TokenState` (token sizes, optional source map and tracked positions) in place. The class token
is index 0 and is never merged.

Capacity contract. `num_out(T)` is a capacity: the block always returns that many slots (static
shapes, one compiled graph), but a reducer that declares `may_empty = True` may leave some slots
empty in some images. An empty slot has size 0 (and a zero source row); from then on
`TokenState.may_empty` is set and (a) the attention bias puts -inf on size-0 keys, with or without
proportional attention, (b) reducers ignore invalid slots (`TokenState.valid`, `mask_invalid`): they
are never chosen by matching or top-k and weigh nothing in a fusion, (c) before JPM the valid tokens
are taken in order and the empty ones never reach a feature, and (d) the effective token count
(`TokenState.valid_count`) does not count them. Reducers without `may_empty` (ToMe, STM, EViT) never
produce empty slots, and while none exists none of this runs: their outputs are unchanged bit for bit.

The merge primitives follow ToMe's design: small pure tensor functions; `bipartite_match` turns a
score matrix into index tensors and `BipartiteMerge` applies them to any per-token tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .exportable import top_and_rest
from .ops import cosine_scores, full_precision, grid_positions


@dataclass
class TokenState:
    """What travels with the tokens through the blocks of one forward pass.

    size: (B, T, 1) number of patches each token holds (None until the first reduction: all ones).
    source: (B, T, P) which patches each token holds, kept when tracing is on (for visualisation).
    pos: (B, T, 2) size-weighted centroid of each token's patches on the real patch grid, in [0, 1]^2,
        kept when a method asks for it (STM's tracked-coordinates variant).
    may_empty: some slot may be empty (size 0): set by the first reducer with `may_empty`; a Python
        bool, so the masking it switches on is decided when the graph is traced, never per image.
    count_tokens: record the valid tokens entering each block in `counts` (effective FLOPs).
    block_input: the normalised input of the current block (what its attention saw), set by the block
        for a reducer with `needs_block_input` (DTEM's embedding reads it).
    active: soft (training-time) reducers keep every token and shrink sizes instead; the first `active`
        tokens are those a hard merge would still hold, the others were merged away softly (None: all).
    valid_rows: (shape of the tokens, (R,) indices of their valid slots in the flattened (B * T) rows), set in
        eager mode by a reducer that leaves empty slots (ATM) and cleared by the next reduction: blocks then run
        their MLP (per token) on those R rows only, so that the empty slots cost nothing there (None: all rows).
    """

    grid: tuple[int, int]
    prop_attn: bool = True
    size: Tensor | None = None
    source: Tensor | None = None
    pos: Tensor | None = None
    track_pos: bool = False
    trace_source: bool = False
    may_empty: bool = False
    count_tokens: bool = False
    counts: list[Tensor] = field(default_factory=list)
    block_input: Tensor | None = None
    active: int | None = None
    valid_rows: tuple[torch.Size, Tensor] | None = None

    def attn_bias(self) -> Tensor | None:
        """Added to every key's logit, shape (B, 1, 1, T): log(size) with proportional attention (log 0 =
        -inf masks empty slots), else -inf on empty slots only, else None."""
        if self.size is None:
            return None
        if self.prop_attn:
            return self.size.log()[:, None, None, :, 0]
        if self.may_empty:
            return torch.zeros_like(self.size).masked_fill(self.size == 0, -math.inf)[:, None, None, :, 0]
        return None

    def valid(self) -> Tensor:
        """(B, T) True for the slots that hold tokens (size > 0). Only meaningful once sizes exist."""
        return self.size[..., 0] > 0

    def valid_count(self, x: Tensor) -> Tensor:
        """(B,) number of valid tokens (class token included) of the tokens `x` the state describes."""
        if self.size is None or not self.may_empty:
            return torch.full((x.shape[0],), x.shape[1], device=x.device)
        return self.valid().sum(dim=1)

    def rows_of(self, x: Tensor) -> Tensor | None:
        """The valid rows of `x` flattened to (B * T, C) when they were recorded for tokens of its shape, else None."""
        if self.valid_rows is None or self.valid_rows[0] != x.shape:
            return None
        return self.valid_rows[1]

    def init(self, x: Tensor) -> None:
        """Fill in sizes (and positions/sources when requested) for the unreduced tokens `x`."""
        B, T, _ = x.shape
        if self.size is None:
            self.size = x.new_ones(B, T, 1, dtype=torch.float32)
        if self.track_pos and self.pos is None:
            self.pos = grid_positions(self.grid, x.device).expand(B, -1, -1)
        if self.trace_source and self.source is None:
            eye = torch.eye(T - 1, device=x.device, dtype=torch.float32)
            self.source = torch.cat([eye.new_zeros(1, T - 1), eye])[None].expand(B, -1, -1)


class TokenReducer:
    """Base class of a reduction method for one block. Subclasses implement `reduce` and `num_out`.

    `may_empty`: this reducer may return empty slots (size 0), a different number per image; static per
    reducer, so fixed-r methods pay nothing for the masking that empty slots need.
    `cls_head_only`: valid only in the last block in front of a head that reads the class token alone
    (ATM's last layer); `build_reducers` puts its `fallback` there instead for any other model (JPM).
    `export_refusal`: None when the reducer traces to ONNX (reid_lite.deploy), else why it cannot, which
    the export's refusal names; a method (a plugin's too) declares it on its reducer, class or instance.
    `needs_block_input`: the block puts its normalised input in `TokenState.block_input` first.
    A reducer with learned parameters is also an `nn.Module` (DTEM): `attach_reducer` registers it on its
    block, so its parameters live in the model's state dict. `weights_missing` is then None once they were
    loaded (or freshly initialised on request), else the reason they are not, which loading errors name.
    """

    needs_cls_attn: bool = False
    needs_pos: bool = False
    needs_block_input: bool = False
    weights_missing: str | None = None
    may_empty: bool = False
    cls_head_only: bool = False
    fallback: TokenReducer | None = None
    export_refusal: str | None = None

    def __call__(self, x: Tensor, keys: Tensor, cls_attn: Tensor | None, state: TokenState) -> Tensor:
        if self.num_out(x.shape[1]) == x.shape[1]:
            return x  # nothing to reduce: leave the state untouched, so r = 0 changes nothing
        state.init(x)
        state.valid_rows = None
        if state.may_empty:
            # Empty slots carry zeros into every reduction: they add nothing to sums, norms or means.
            x = x * state.valid()[..., None].to(x.dtype)
        out = self.reduce(x, keys, cls_attn, state)
        if self.may_empty:
            state.may_empty = True
        return out

    def reduce(self, x: Tensor, keys: Tensor, cls_attn: Tensor | None, state: TokenState) -> Tensor:
        """The method itself: `x` (B, T, C) the tokens after attention (class token first), `keys` (B, H, T, d)
        the block's attention keys per head, `cls_attn` (B, H, T) the class token's attention row when the
        reducer sets `needs_cls_attn` (else None). Returns (B, num_out(T), C) and updates `state` (sizes, and
        the source map or positions when they are tracked) to match."""
        raise NotImplementedError

    def bind(self, block: nn.Module) -> None:
        """Called by `attach_reducer` before the reducer joins `block`: a learned reducer creates its parameters
        for the block's width here (its builder does not know the model). Default: nothing."""

    def num_out(self, num_tokens: int) -> int:
        """Slots left (class token included) when `num_tokens` come in: the static capacity, for FLOPs and
        shapes; with `may_empty` some of them may be empty in some images."""
        raise NotImplementedError

    def matching_flops(self, num_tokens: int, dim: int, heads: int) -> int:
        """Multiply-adds of the method's own matrix products (e.g. the similarity matrix), as fvcore counts."""
        return 0

    def check_tokens(self, num_tokens: int, block: int) -> None:
        """Raise ValueError (naming the option and the 1-based `block`) when this reducer would silently do
        less than configured on `num_tokens` incoming tokens; called by `build_reducers`. Default: no check."""


def static_shapes(x: Tensor) -> bool:
    """Whether shapes must not depend on tensor values here: while exporting, compiling or jit-tracing (fvcore),
    and on the meta device (no values). A reducer may then not read a count back to size its output."""
    return (torch.compiler.is_exporting() or torch.compiler.is_compiling() or torch.jit.is_tracing()
            or x.device.type == "meta")


def attach_reducer(block: nn.Module, reducer: TokenReducer | None) -> None:
    """Set `block.reducer`. A reducer that is an `nn.Module` (learned parameters) becomes a registered
    submodule, on the block's device and dtype and in its train/eval mode, so that its parameters are saved,
    loaded and moved with the model; any other reducer (or None) is a plain attribute, as before."""
    if isinstance(getattr(block, "reducer", None), nn.Module):
        del block.reducer  # a registered reducer cannot be replaced by a plain object in place
    if reducer is not None:
        reducer.bind(block)
    if isinstance(reducer, nn.Module):
        ref = next(block.parameters(), None)
        if ref is not None:
            reducer.to(device=ref.device, dtype=ref.dtype)
        reducer.train(block.training)
    block.reducer = reducer


def bipartite_r(num_tokens: int, r: int) -> int:
    """How many tokens bipartite matching can merge: at most half of the non-class tokens (ToMe)."""
    return max(0, min(r, (num_tokens - 1) // 2))


@dataclass
class BipartiteMerge:
    """Which A tokens merge into which B tokens, as positions in the token sequence.

    unm_pos (B, Na - r): A tokens kept, in A's order; src_pos (B, r): A tokens merged away;
    dst_idx (B, r): the B token (index into B) each of them merges into; b_pos (B, Nb): the B tokens,
    or None for ToMe's alternating split (B = x[:, 1::2]). Output order: kept A tokens, then all B tokens.
    Working with sequence positions means a merge reads `x` with row gathers and writes its fused rows in
    place (`take_tokens`, `put_tokens_`), never copying the A or B part on its own.
    """

    unm_pos: Tensor
    src_pos: Tensor
    dst_idx: Tensor
    b_pos: Tensor | None = None
    may_empty: bool = False  # weights may be 0 for a whole group (empty slots): guard the division
    dst_pos: Tensor = field(init=False)  # (B, r) sequence position of the B token each source goes into

    def __post_init__(self) -> None:
        # Computed once: the fusion and PRN-Fuse's norms both read it.
        self.dst_pos = 2 * self.dst_idx + 1 if self.b_pos is None else self.b_pos.gather(1, self.dst_idx)

    @classmethod
    def from_match(cls, unm_idx: Tensor, src_idx: Tensor, dst_idx: Tensor,
                   a_idx: Tensor | None = None, b_idx: Tensor | None = None, may_empty: bool = False) -> BipartiteMerge:
        """From `bipartite_match`'s indices into A and the A/B sequence positions (None: alternating)."""
        if a_idx is None:
            return cls(2 * unm_idx, 2 * src_idx, dst_idx, None, may_empty)
        return cls(a_idx.gather(1, unm_idx), a_idx.gather(1, src_idx), dst_idx, b_idx, may_empty)

    def __call__(self, t: Tensor) -> Tensor:
        """Merge a per-token tensor (B, T, C) by summing (sizes, source maps): kept A tokens, then every B token
        plus the sources merged into it, added in source order."""
        out = take_tokens(t, self.kept_pos(t.shape[1]))
        return put_tokens_(out, self.fused_rows(), take_tokens(t, self.src_pos), accumulate=True)

    def kept_pos(self, num_tokens: int) -> Tensor:
        """(B, T - r) sequence positions of the output's tokens: the kept A tokens, then every B token."""
        b_pos = self.b_pos
        if b_pos is None:
            b_pos = torch.arange(1, num_tokens, 2, device=self.unm_pos.device).expand(self.unm_pos.shape[0], -1)
        return torch.cat([self.unm_pos, b_pos], dim=1)

    def fused_rows(self) -> Tensor:
        """(B, r) row of the output that each merged-away token went into (its destination, after the kept A)."""
        return self.dst_idx + self.unm_pos.shape[1]

    def weighted_mean(self, t: Tensor, w: Tensor) -> Tensor:
        """The merged tokens (B, T - r, C): kept A tokens, then the w-weighted average of each B group.

        Computed as b + sum_src w_src (src - b) / sum_group w, which touches only the r merged rows, so
        tokens that receive no source come back unchanged (bit for bit). The output is one gather of the kept
        rows that the r contributions are then added into in place: no copy of the B part, no concatenation.
        """
        w_src = take_tokens(w, self.src_pos)
        w_b = w[:, 1::2] if self.b_pos is None else take_tokens(w, self.b_pos)
        den = w_b.scatter_add(1, self.dst_idx[..., None], w_src)
        if self.may_empty:  # an empty source merged into an empty destination: 0 / 0
            den = den.clamp_min(torch.finfo(den.dtype).tiny)
        contrib = w_src * (take_tokens(t, self.src_pos) - take_tokens(t, self.dst_pos)) / take_tokens(den, self.dst_idx)
        out = take_tokens(t, self.kept_pos(t.shape[1]))
        return put_tokens_(out, self.fused_rows(), contrib.to(t.dtype), accumulate=True)


def batch_rows(idx: Tensor, num_tokens: int) -> Tensor:
    """(B * K,) rows of the flattened (B * num_tokens) batch that the per-image token indices idx (B, K) name."""
    return (idx + torch.arange(0, idx.shape[0] * num_tokens, num_tokens, device=idx.device)[:, None]).reshape(-1)


def take_tokens(t: Tensor, idx: Tensor) -> Tensor:
    """t[b, idx[b, j]] for every b, j: (B, T, C), (B, K) -> (B, K, C).

    A row gather on the flattened batch: much faster on CPU than `gather` with an index expanded
    over the channels.
    """
    B, T = t.shape[:2]
    rows = batch_rows(idx, T)
    return t.reshape(B * T, *t.shape[2:]).index_select(0, rows).view(B, idx.shape[1], *t.shape[2:])


def put_tokens_(t: Tensor, idx: Tensor, values: Tensor, accumulate: bool = False) -> Tensor:
    """t[b, idx[b, j]] = values[b, j] (or += with `accumulate`, in j order) in place; t (B, T, C) contiguous,
    idx (B, K), values (B, K, C). Returns t.

    The inverse of `take_tokens`: one row copy (`index_copy_`) or row add (`index_add_`) on the flattened batch,
    several times faster on CPU than `scatter_`/`scatter_add_` with an index expanded over the channels.
    """
    B, T = t.shape[:2]
    rows = batch_rows(idx, T)
    flat, src = t.view(B * T, *t.shape[2:]), values.reshape(-1, *values.shape[2:])
    if accumulate:
        flat.index_add_(0, rows, src)
    else:
        flat.index_copy_(0, rows, src)
    return t


def bipartite_split(t: Tensor, a_idx: Tensor | None = None, b_idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The A and B parts of a per-token tensor (B, T, C): alternating when no indices are given.

    With indices, both parts are views of one gather (one pass over the rows instead of two).
    """
    if a_idx is None:
        return t[:, ::2], t[:, 1::2]
    ab = take_tokens(t, torch.cat([a_idx, b_idx], dim=1))
    return ab[:, : a_idx.shape[1]], ab[:, a_idx.shape[1]:]


def bipartite_cosine(t: Tensor, a_idx: Tensor | None = None, b_idx: Tensor | None = None) -> Tensor:
    """`cosine_scores` of the A and B parts of `t` (B, T, C) (`bipartite_split`), in fp32.

    With indices, the parts are fresh (one gather) and are normalised in place: for full-width keys (STM's
    768-d) each avoided copy is megabytes per block. The same values as `cosine_scores`, bit for bit.
    """
    if a_idx is None or (torch.is_grad_enabled() and t.requires_grad):
        return cosine_scores(*bipartite_split(t, a_idx, b_idx))
    with full_precision(t.device):
        a, b = (part.float() for part in bipartite_split(t, a_idx, b_idx))  # fresh views (or their fp32 copies)
        a.div_(a.norm(dim=-1, keepdim=True))
        b.div_(b.norm(dim=-1, keepdim=True))
        return a @ b.transpose(-1, -2)


def bipartite_match(scores: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """ToMe's bipartite soft matching on an (B, Na, Nb) score matrix whose row 0 is the class token.

    Each A token picks its best B partner; the r A tokens with the highest best score merge.
    Returns (unm_idx, src_idx, dst_idx) as indices into A (the first two) and B. Sorting is stable so
    that ties resolve by index, the same for every batch composition.
    """
    scores = scores.clone()
    scores[:, 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    src_idx, unm_idx = top_and_rest(node_max, r)  # stable: ties resolve by index; exportable
    dst_idx = node_idx.gather(1, src_idx)
    return unm_idx, src_idx, dst_idx


def mask_invalid(scores: Tensor, valid_a: Tensor, valid_b: Tensor) -> Tensor:
    """-inf on the rows of invalid A slots and the columns of invalid B slots of (B, Na, Nb) scores, so
    that matching never picks an empty slot (it ranks an empty A slot last and never merges into one)."""
    return scores.masked_fill(~valid_a[:, :, None] | ~valid_b[:, None, :], -math.inf)


def merge_state(merge: BipartiteMerge, state: TokenState) -> None:
    """Carry sizes, sources and tracked positions through a merge (sizes add, positions average)."""
    if state.pos is not None:
        state.pos = merge.weighted_mean(state.pos, state.size)
    if state.source is not None:
        state.source = merge(state.source)
    state.size = merge(state.size)


def size_weighted_merge(merge: BipartiteMerge, x: Tensor, state: TokenState) -> Tensor:
    """ToMe's fusion: the size-weighted average of each group; updates the state."""
    out = merge.weighted_mean(x, state.size)
    merge_state(merge, state)
    return out
