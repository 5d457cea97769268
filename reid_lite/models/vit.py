"""TransReID's ViT backbone: overlapping patch embedding, side-information embedding (SIE) and
transformer blocks that can reduce tokens between attention and MLP.

Parameter names follow the official TransReID code (`patch_embed.proj`, `blocks.N.attn.qkv`, `sie_embed`,
...), so official checkpoints load strictly. With no reducer attached the blocks compute exactly what
the official ones do; attention runs through the fused `scaled_dot_product_attention` kernel.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from functools import partial

import torch
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn

from ..merging.base import TokenReducer, TokenState
from ..merging.ops import attend

_LAYER_NORM = partial(nn.LayerNorm, eps=1e-6)  # ViT's LayerNorm


def _pair(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class PatchEmbedOverlap(nn.Module):
    """Image to patch embedding with overlapping patches (TransReID's `PatchEmbed_overlap`)."""

    def __init__(self, img_size=(256, 128), patch_size=16, stride_size=12, in_chans=3, embed_dim=768):
        super().__init__()
        img_size, patch_size, stride = _pair(img_size), _pair(patch_size), _pair(stride_size)
        self.num_y = (img_size[0] - patch_size[0]) // stride[0] + 1
        self.num_x = (img_size[1] - patch_size[1]) // stride[1] + 1
        self.num_patches = self.num_x * self.num_y
        self.img_size = img_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride)
        # Official initialisation: He-normal on the conv (kept when the rest is re-initialised).
        n = patch_size[0] * patch_size[1] * embed_dim
        nn.init.normal_(self.proj.weight, 0, math.sqrt(2.0 / n))
        nn.init.zeros_(self.proj.bias)

    @property
    def grid_size(self) -> tuple[int, int]:
        """(rows, columns) of the patch grid."""
        return self.num_y, self.num_x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != self.img_size:
            raise ValueError(f"input size {tuple(x.shape[-2:])} does not match the model's {self.img_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with the official parameter names (`qkv`, `proj`)."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, need_cls_attn: bool = False):
        return attend(self, x, bias, need_cls_attn)


class Block(nn.Module):
    """Pre-norm transformer block; an attached `reducer` removes tokens after attention, before the MLP."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.reducer: TokenReducer | None = None

    def forward(self, x: torch.Tensor, state: TokenState | None = None) -> torch.Tensor:
        """Apply the block; with a `state`, use its sizes for proportional attention and let the
        reducer (if any) shrink `x` and update `state` in place."""
        reducer = self.reducer if state is not None else None
        bias = state.attn_bias() if state is not None else None
        h = self.norm1(x)
        y, k, cls_attn = self.attn(h, bias, need_cls_attn=reducer is not None and reducer.needs_cls_attn)
        x = x + self.drop_path(y)
        if reducer is not None:
            if reducer.needs_block_input:
                state.block_input = h
            x = reducer(x, k, cls_attn, state)
        rows = state.rows_of(x) if state is not None and not self.training else None
        if rows is not None:  # empty slots (ATM): the MLP, per token, runs on the valid rows alone
            flat = x.reshape(-1, x.shape[-1])
            return flat.index_add(0, rows, self.mlp(self.norm2(flat.index_select(0, rows))).to(x.dtype)).view_as(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class TransReIDViT(nn.Module):
    """TransReID's vision transformer (`TransReID` in the official code).

    With `local_feature=True` (JPM) it returns all tokens after the first `depth - 1` blocks: the last
    block is copied into the global (`b1`) and jigsaw (`b2`) branches of the model on top.
    """

    def __init__(
        self,
        img_size=(256, 128),
        patch_size: int = 16,
        stride_size=16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        camera: int = 0,
        view: int = 0,
        local_feature: bool = False,
        sie_xishu: float = 1.0,
        norm_layer: Callable[..., nn.Module] = _LAYER_NORM,
    ):
        super().__init__()
        self.embed_dim = self.in_planes = embed_dim
        self.local_feature = local_feature
        self.patch_embed = PatchEmbedOverlap(img_size, patch_size, stride_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        # One camera (or view) carries no side information; the official code would then index a table it
        # never created, so treat it as none.
        camera, view = (camera if camera > 1 else 0), (view if view > 1 else 0)
        self.cam_num, self.view_num, self.sie_xishu = camera, view, sie_xishu
        # Same conditions as the official code: the table exists for > 1 entries, and is used for > 0.
        if camera > 1 and view > 1:
            self.sie_embed = nn.Parameter(torch.zeros(camera * view, 1, embed_dim))
        elif camera > 1:
            self.sie_embed = nn.Parameter(torch.zeros(camera, 1, embed_dim))
        elif view > 1:
            self.sie_embed = nn.Parameter(torch.zeros(view, 1, embed_dim))
        if hasattr(self, "sie_embed"):
            trunc_normal_(self.sie_embed, std=0.02)
        self.pos_drop = nn.Dropout(p=drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, dpr[i],
                  norm_layer=norm_layer)
            for i in range(depth)
        )
        self.norm = norm_layer(embed_dim)
        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init_weights)

    def side_information(self, cam_label: torch.Tensor | int | None, view_label: torch.Tensor | int | None,
                         batch: int | None = None, device: torch.device | None = None) -> torch.Tensor | None:
        """The SIE term added to every token, or None when SIE is off.

        Labels are 0-based ids: an integer tensor of shape (batch,) or one int for the whole batch. Each is
        validated before it indexes the table (see `check_sie_ids`), so a bad id is a ValueError that names
        the valid range rather than an index error (or, on CUDA, a device-side assert).
        """
        if self.cam_num == 0 and self.view_num == 0:
            return None
        device = device if device is not None else self.sie_embed.device
        cams = views = None
        if self.cam_num > 0:
            cams = check_sie_ids(cam_label, self.cam_num, "cam_label", "camera", batch, device, self.training)
        if self.view_num > 0:
            views = check_sie_ids(view_label, self.view_num, "view_label", "view", batch, device, self.training)
        if cams is not None and views is not None:
            idx = cams * self.view_num + views
        else:
            idx = cams if cams is not None else views
        return self.sie_xishu * self.sie_embed[idx]

    def embed(self, x: torch.Tensor, cam_label=None, view_label=None) -> torch.Tensor:
        """Patch embedding, class token, position and side-information embeddings: (B, 1+N, D)."""
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.pos_embed
        sie = self.side_information(cam_label, view_label, x.shape[0], x.device)
        if sie is not None:
            x = x + sie
        return self.pos_drop(x)

    @property
    def trunk(self) -> nn.ModuleList | list[nn.Module]:
        """The blocks this backbone runs itself (all but the last under JPM)."""
        return self.blocks[:-1] if self.local_feature else self.blocks

    def forward(self, x: torch.Tensor, cam_label=None, view_label=None, state: TokenState | None = None):
        x = self.embed(x, cam_label, view_label)
        for blk in self.trunk:
            if state is not None and state.count_tokens:
                state.counts.append(state.valid_count(x))
            x = blk(x, state)
        if state is not None and state.count_tokens:
            state.counts.append(state.valid_count(x))
        if self.local_feature:
            return x
        return self.norm(x)[:, 0]


def check_sie_ids(label: torch.Tensor | int | None, count: int, name: str, what: str, batch: int | None,
                  device: torch.device, training: bool = False) -> torch.Tensor | int:
    """Validate side-information ids before they index an SIE table of `count` rows; returns them on `device`.

    `label` is an int or an integer tensor of shape (batch,). Dtype and length are metadata, checked for
    free. The range is checked by an asynchronous device assert (`torch._assert_async`), never by reading the
    ids back: no host-device synchronisation in a forward pass. On the CPU the assert fires at once and is
    turned into a ValueError naming the range; on an accelerator a bad id fails the next synchronising call
    with a device-side assert carrying the same message; on `meta` it checks nothing. Under torch.compile the
    check is left out (the table lookup's own bounds check remains). `training` is accepted for the callers'
    sake; the check no longer depends on it (it costs no synchronisation in either mode).
    """
    if label is None:
        raise ValueError(f"this model uses a {what} side-information embedding: pass {name}= (0-based ids, "
                         f"0..{count - 1})")
    if isinstance(label, bool) or not isinstance(label, (numbers.Integral, torch.Tensor)):
        raise ValueError(f"{name} must be an integer tensor of {what} ids (0..{count - 1}), got "
                         f"{type(label).__name__}")
    if isinstance(label, numbers.Integral):  # int or numpy integer: one id for the whole batch
        label = int(label)
        if not 0 <= label < count:
            raise ValueError(f"{what} ids must lie in [0, {count}) for this model's SIE table ({name}), got {label}")
        return label
    if label.dtype.is_floating_point or label.dtype.is_complex or label.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer {what} ids (0..{count - 1}), got dtype {label.dtype}")
    if label.dim() > 1 or (label.dim() == 1 and batch is not None and label.shape[0] != batch):
        raise ValueError(f"{name} must have one {what} id (0..{count - 1}) per image: shape ({batch},), got "
                         f"{tuple(label.shape)}")
    if not torch.compiler.is_compiling() and label.numel():
        message = f"{what} ids must lie in [0, {count}) for this model's SIE table ({name})"
        try:
            torch._assert_async(((label >= 0) & (label < count)).all(), message)
        except RuntimeError:  # raised at once only where the ids are already on the host: read them for the message
            lo, hi = (int(v) for v in torch.aminmax(label))
            raise ValueError(f"{message}, got [{lo}, {hi}]; build the model with the checkpoint's camera/view "
                             "count") from None
    return label.to(device=device, dtype=torch.long, non_blocking=True)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _vit_base(**kw) -> TransReIDViT:
    return TransReIDViT(**{**dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4, qkv_bias=True), **kw})


def _vit_small(**kw) -> TransReIDViT:
    # The official vit_small keeps ViT-B's attention scale.
    defaults = dict(embed_dim=768, depth=8, num_heads=8, mlp_ratio=3.0, qkv_bias=False, qk_scale=768**-0.5)
    return TransReIDViT(**{**defaults, **kw})


def _deit_small(**kw) -> TransReIDViT:
    return TransReIDViT(**{**dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4, qkv_bias=True), **kw})


# The official TRANSFORMER_TYPE names, plus short aliases.
BACKBONES: dict[str, Callable[..., TransReIDViT]] = {
    "vit_base_patch16_224_TransReID": _vit_base,
    "deit_base_patch16_224_TransReID": _vit_base,
    "vit_small_patch16_224_TransReID": _vit_small,
    "deit_small_patch16_224_TransReID": _deit_small,
    "vit_base": _vit_base,
    "deit_base": _vit_base,
    "vit_small": _vit_small,
    "deit_small": _deit_small,
}
