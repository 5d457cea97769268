"""Merging of local groups in place, shared by the spatial methods (LoTM, DHTM).

A merge is described by `root` (B, T): the slot each token joins (itself when it stays). `fold_groups`
fuses every group into its root slot and empties the others (size 0); `compact_slots` then drops the
empty slots, keeping the others in sequence order, so that a method that keeps raster order (its roots
where its tokens were) still does after merging. Both are a handful of gathers and scatters: no loop
over tokens or images, static shapes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import TokenReducer, TokenState, take_tokens
from .exportable import stable_argsort

WEIGHTINGS = ("mean", "size")


class LocalMerge(TokenReducer):
    """What LoTM and DHTM share: `k` merges per block, at most half of the patch tokens (each merge joins two
    tokens), so the capacity is T - min(k, (T - 1) // 2); a larger `k` is an error naming `k_key`."""

    k: int
    k_key: str = "K"  # the config option named in errors, e.g. MERGE.LOTM.K
    unit: str = "merges"  # what one merge is called in errors

    def num_out(self, num_tokens: int) -> int:
        return num_tokens - min(self.k, (num_tokens - 1) // 2)

    def check_tokens(self, num_tokens: int, block: int) -> None:
        most = (num_tokens - 1) // 2
        if self.k > most:
            raise ValueError(f"{self.k_key} {self.k} is too large: block {block} receives {num_tokens} tokens "
                             f"(the class token and {num_tokens - 1} patches) and can merge at most {most} "
                             f"{self.unit}")


def fold_groups(x: Tensor, state: TokenState, root: Tensor, weighting: str = "size") -> Tensor:
    """Fuse each group of tokens into its root slot; the other members' slots become empty.

    weighting 'size': the size-weighted mean (the mean over the patches the group holds); 'mean': the
    plain mean of the group's tokens. Sizes add, positions are size-weighted centroids, sources add.
    Roots that receive nothing are returned unchanged (bit for bit). The class token must be its own root.
    """
    moved = root != torch.arange(root.shape[1], device=root.device)
    stay = (~moved)[..., None]
    idx = root[..., None]
    size = state.size
    w = size if weighting == "size" else (size > 0).to(size.dtype)

    def fuse(t: Tensor, weight: Tensor) -> Tensor:
        w_moved = weight * moved[..., None]
        den = take_tokens(weight.scatter_add(1, idx, w_moved).clamp_min(torch.finfo(weight.dtype).tiny), root)
        contrib = w_moved * (t - take_tokens(t, root)) / den
        return t.scatter_add(1, idx.expand(-1, -1, t.shape[-1]), contrib.to(t.dtype)) * stay.to(t.dtype)

    if state.pos is not None:
        state.pos = fuse(state.pos, size)
    if state.source is not None:
        state.source = state.source.scatter_add(1, idx.expand_as(state.source), state.source * moved[..., None]) * stay
    out = fuse(x, w)
    state.size = size.scatter_add(1, idx, size * moved[..., None]) * stay
    return out


def compact_slots(x: Tensor, state: TokenState, num_out: int) -> Tensor:
    """Keep the first `num_out` valid slots of every image in sequence order (the class token first)."""
    keep = stable_argsort((~state.valid()).to(torch.int32))[:, :num_out]
    for name in ("size", "pos", "source"):
        t = getattr(state, name)
        if t is not None:
            setattr(state, name, take_tokens(t, keep))
    return take_tokens(x, keep)


def check_weighting(weighting: str, key: str) -> str:
    """`weighting` if it is one of WEIGHTINGS, else a ValueError naming the config `key`."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"{key} must be one of {WEIGHTINGS}, got {weighting!r}")
    return weighting
