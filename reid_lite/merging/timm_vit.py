"""Token reduction inside timm's VisionTransformer (ViT, DeiT), for the ImageNet comparison (Table 4).

Patching in the manner of ToMe: each block's class is swapped for a subclass whose forward reduces
tokens after attention; the model's `forward_features` starts a fresh `TokenState` per call.
Global pooling must be the class token ('token'); average pooling over merged tokens would need sizes.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import TokenReducer, TokenState, attach_reducer
from .ops import attend


class _MergingBlock(nn.Module):
    """Replacement forward of timm's `Block`, same parameters."""

    reducer: TokenReducer | None
    _merge_owner: nn.Module

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        state: TokenState | None = self._merge_owner._merge_state
        reducer = self.reducer if state is not None else None
        bias = state.attn_bias() if state is not None else None
        h = self.norm1(x)
        y, k, cls_attn = attend(self.attn, h, bias, reducer is not None and reducer.needs_cls_attn)
        x = x + self.drop_path1(self.ls1(y))
        if reducer is not None:
            if reducer.needs_block_input:
                state.block_input = h
            x = reducer(x, k, cls_attn, state)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _merging_vit_class(cls: type) -> type:
    class MergingVisionTransformer(cls):
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
    if getattr(model, "num_prefix_tokens", 1) != 1 or getattr(model, "global_pool", "token") != "token":
        raise ValueError("token reduction needs exactly one class token and global_pool='token'")
    if not model.__class__.__name__.startswith("Merging"):
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
