"""A merging method from your own file: drop the r patch tokens the class token attends to least.

Use it by listing this file in MERGE.PLUGINS (YAML or command line), then MERGE.METHOD drop:

    python tools/test.py --config demo_synthetic.yml --compare none,stm,drop \
        MERGE.PLUGINS "['examples/merging_plugin.py']" MERGE.DROP.HEADS max
"""

from __future__ import annotations

import torch
from torch import Tensor

from reid_lite.merging import MergeMethod, TokenReducer, TokenState, register_method
from reid_lite.merging.base import take_tokens


class DropInattentive(TokenReducer):
    """Keep the most attended patch tokens, in sequence order; the r others are dropped."""

    needs_cls_attn = True  # the block passes the class token's attention row (B, H, T)
    may_empty = False  # every returned slot holds a token (True: some slots may have size 0)

    def __init__(self, r: int, heads: str = "mean"):
        if heads not in ("mean", "max"):
            raise ValueError(f"MERGE.DROP.HEADS must be 'mean' or 'max', got {heads!r}")
        self.r, self.heads = r, heads

    def num_out(self, num_tokens: int) -> int:
        """Static capacity: the class token and at least one patch token stay."""
        return num_tokens - max(0, min(self.r, num_tokens - 2))

    def reduce(self, x: Tensor, keys: Tensor, cls_attn: Tensor | None, state: TokenState) -> Tensor:
        attn = cls_attn[:, :, 1:]
        attn = attn.amax(dim=1) if self.heads == "max" else attn.mean(dim=1)
        kept = attn.argsort(dim=1, descending=True, stable=True)[:, : self.num_out(x.shape[1]) - 1]
        idx = torch.cat([kept.new_zeros(kept.shape[0], 1), kept.sort(dim=1).values + 1], dim=1)
        state.size = take_tokens(state.size, idx)
        if state.source is not None:
            state.source = take_tokens(state.source, idx)
        if state.pos is not None:
            state.pos = take_tokens(state.pos, idx)
        return take_tokens(x, idx)


def build(merge, depth: int, rs: dict[int, int] | None) -> dict[int, TokenReducer]:
    """MERGE section, reducible blocks, {0-based block: r} (uses_r) -> {0-based block: reducer}."""
    return {i: DropInattentive(r, merge.DROP.HEADS) for i, r in rs.items() if r > 0}


register_method(MergeMethod(
    "drop", build,
    options={"HEADS": "mean"},  # the config node MERGE.DROP
    uses_r=True,  # reads MERGE.R / R_LIST / LAYERS
    gflops_knob="r",  # MERGE.TARGET_GFLOPS may choose a constant r
    identity=None,  # the options that change features (None: all), for the gallery fingerprint
    summary="drop the least attended patch tokens"))
