"""EViT (Liang et al., ICLR 2022): keep the most attended patch tokens, fuse the rest into one token."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import TokenReducer, TokenState
from .base import take_tokens as _take
from .exportable import stable_argsort
from .knobs import option_knob
from .registry import MergeMethod, register_method
from .schedule import check_layers


class EViT(TokenReducer):
    """Keep ceil(keep_rate * (T - 1)) patch tokens by the class token's head-averaged attention.

    The inattentive tokens are fused into one extra token, appended last, as the official code does:
    their sum weighted by the (unnormalised) class attention. Kept tokens come in attention order.
    """

    needs_cls_attn = True

    def __init__(self, keep_rate: float, fuse_token: bool = True):
        if not 0.0 < keep_rate <= 1.0:
            raise ValueError(f"MERGE.EVIT.KEEP_RATE must be in (0, 1], got {keep_rate}")
        self.keep_rate, self.fuse_token = keep_rate, fuse_token

    def num_kept(self, num_tokens: int) -> int:
        return math.ceil(self.keep_rate * (num_tokens - 1))

    def num_out(self, num_tokens: int) -> int:
        keep = self.num_kept(num_tokens)
        if keep >= num_tokens - 1:
            return num_tokens
        return 1 + keep + int(self.fuse_token)

    def reduce(self, x: Tensor, keys: Tensor, cls_attn: Tensor | None, state: TokenState) -> Tensor:
        keep = self.num_kept(x.shape[1])
        attn = cls_attn[:, :, 1:].mean(dim=1)  # (B, T-1)
        rank = attn.masked_fill(~state.valid()[:, 1:], -1.0) if state.may_empty else attn  # empty slots last
        order = stable_argsort(rank, descending=True)  # argsort(stable=True), exportable
        kept, dropped = order[:, :keep] + 1, order[:, keep:] + 1
        parts = [x[:, :1], _take(x, kept)]
        size_parts = [state.size[:, :1], _take(state.size, kept)]
        if self.fuse_token:
            w = attn.gather(1, dropped - 1)[..., None]
            parts.append((_take(x, dropped) * w.to(x.dtype)).sum(dim=1, keepdim=True))
            size_parts.append(_take(state.size, dropped).sum(dim=1, keepdim=True))
        for name in ("source", "pos"):
            t = getattr(state, name)
            if t is None:
                continue
            new = [t[:, :1], _take(t, kept)]
            if self.fuse_token:
                dropped_t = _take(t, dropped)
                if name == "source":
                    new.append(dropped_t.sum(dim=1, keepdim=True))
                else:
                    sz = _take(state.size, dropped)
                    den = sz.sum(dim=1, keepdim=True)
                    if state.may_empty:  # every dropped slot may be empty: the fused token is then empty too
                        den = den.clamp_min(torch.finfo(den.dtype).tiny)
                    new.append((dropped_t * sz).sum(dim=1, keepdim=True) / den)
            setattr(state, name, torch.cat(new, dim=1))
        state.size = torch.cat(size_parts, dim=1)
        return torch.cat(parts, dim=1)


def build_evit(merge, depth: int, rs: dict[int, int] | None) -> dict[int, TokenReducer]:
    """EViT reducers in the blocks of MERGE.EVIT.LAYERS (EViT has its own schedule, not r)."""
    opts = merge.EVIT
    return {i - 1: EViT(opts.KEEP_RATE, opts.FUSE_TOKEN) for i in check_layers(opts.LAYERS, depth, "MERGE.EVIT.LAYERS")}


register_method(MergeMethod(
    "evit", build_evit, prop_attn=False,  # EViT's paper has no size bias
    # A budget sets the keep rate in MERGE.EVIT.LAYERS: 1 keeps everything, 0.001 keeps one patch per block.
    gflops_knob=option_knob("keep_rate", "EVIT.KEEP_RATE", 1.0, 0.001, doc="MERGE.EVIT.KEEP_RATE"),
    options={
        "KEEP_RATE": 0.9,  # patch tokens kept: ceil(KEEP_RATE * (N - 1))
        "LAYERS": [4, 7, 10],  # 1-based blocks that reduce
        "FUSE_TOKEN": True,  # fuse the inattentive tokens into one (else drop them)
    },
    summary="EViT: keep the most attended patches in MERGE.EVIT.LAYERS, fuse the rest into one token"))
