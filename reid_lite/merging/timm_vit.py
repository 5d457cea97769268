"""Token reduction inside timm's VisionTransformer (ViT, DeiT), for the ImageNet comparison (Table 4).

Patching in the manner of ToMe: each block's class is swapped for a subclass whose forward reduces
tokens after attention; the model's `forward_features` starts a fresh `TokenState` per call.
Global pooling must be the class token ('token'); average pooling over merged tokens would need sizes.
Only timm's plain `Block` is patched (other block kinds compute differently: `check_timm_vit` refuses
them). An attention mask (`forward_features(x, attn_mask=...)`) reaches every block's attention, added to
the merging's own bias; it covers the tokens as they enter the blocks, so it must cover every token a block
sees (a mask together with a reduction before that block is a ValueError).
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block as TimmBlock
from torch import Tensor, nn

from .base import TokenReducer, TokenState, attach_reducer
from .ops import attend


class _MergingBlock(nn.Module):
    """Replacement forward of timm's `Block`, same parameters."""

    reducer: TokenReducer | None
    _merge_owner: nn.Module

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if is_causal:
            raise ValueError("token reduction does not support causal attention (is_causal=True)")
        state: TokenState | None = self._merge_owner._merge_state
        reducer = self.reducer if state is not None else None
        bias = state.attn_bias() if state is not None else None
        if attn_mask is not None:
            bias = with_attention_mask(bias, attn_mask, x.shape[1])
        h = self.norm1(x)
        y, k, cls_attn = attend(self.attn, h, bias, reducer is not None and reducer.needs_cls_attn)
        x = x + self.drop_path1(self.ls1(y))
        if reducer is not None:
            if reducer.needs_block_input:
                state.block_input = h
            x = reducer(x, k, cls_attn, state)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def with_attention_mask(bias: Tensor | None, attn_mask: Tensor, tokens: int) -> Tensor:
    """The merging's additive bias (B, 1, 1, T) or None, plus a timm attention mask over `tokens` tokens: a bool
    mask (True: attend, as `scaled_dot_product_attention` reads it) or an additive float one, (..., T or 1, T).
    ValueError when the mask covers another number of tokens (an earlier block reduced them)."""
    if attn_mask.shape[-1] != tokens or attn_mask.shape[-2] not in (1, tokens):
        raise ValueError(f"the attention mask covers {attn_mask.shape[-1]} tokens but this block sees {tokens}: "
                         "tokens were reduced by an earlier block; a mask applies only before the first reduction")
    if attn_mask.dtype == torch.bool:
        dtype = bias.dtype if bias is not None else torch.float32
        attn_mask = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill(~attn_mask,
                                                                                                   float("-inf"))
    return attn_mask if bias is None else bias + attn_mask


def check_timm_vit(model: nn.Module) -> None:
    """Raise TypeError unless every block of the timm ViT `model` is timm's plain `Block` (or already patched),
    and ValueError unless it has exactly one class token and class-token pooling."""
    others = sorted({type(b).__name__ for b in model.blocks if type(b) not in (TimmBlock, _MergingBlock)})
    if others:
        raise TypeError(f"token reduction patches timm's vision_transformer.Block; this model has {others}")
    if getattr(model, "num_prefix_tokens", 1) != 1 or getattr(model, "global_pool", "token") != "token":
        raise ValueError("token reduction needs exactly one class token and global_pool='token'")


def _merging_vit_class(cls: type) -> type:
    class MergingVisionTransformer(cls):
        merges_tokens = True  # patched already: patching again only swaps the reducers

        def forward_features(self, x: Tensor, *args, **kwargs) -> Tensor:
            grid = tuple(self.patch_embed.grid_size)
            self._merge_state = TokenState(grid=grid, prop_attn=self._merge_prop_attn,
                                           track_pos=self._merge_track_pos)
            try:
                return super().forward_features(x, *args, **kwargs)
            finally:
                self._merge_state = None

    MergingVisionTransformer.__name__ = f"Merging{cls.__name__}"
    return MergingVisionTransformer


def patch_timm_vit(model: nn.Module, reducers: dict[int, TokenReducer], prop_attn: bool = True) -> nn.Module:
    """Make a timm VisionTransformer reduce tokens in the blocks of `reducers` ({0-based index: reducer})."""
    check_timm_vit(model)
    if not getattr(type(model), "merges_tokens", False):
        model.__class__ = _merging_vit_class(model.__class__)
    model._merge_state = None
    model._merge_prop_attn = prop_attn
    model._merge_track_pos = any(r.needs_pos for r in reducers.values())
    for i, blk in enumerate(model.blocks):
        if blk.__class__ is not _MergingBlock:
            blk.__class__ = _MergingBlock
        attach_reducer(blk, reducers.get(i))
        object.__setattr__(blk, "_merge_owner", model)  # plain attribute: not a submodule
    return model
