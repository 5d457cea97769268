"""TransReID (He et al., ICCV 2021): ViT backbone + BNNeck heads, with the jigsaw patch module (JPM).

`TransReID` covers the official `build_transformer` (global branch only) and `build_transformer_local`
(JPM) with the official state-dict layout: `base.*`, `b1.*`, `b2.*`, `bottleneck*`, `classifier*`.
Token reduction (reid_lite.merging) runs inside the backbone's blocks; the JPM branch consumes the
reduced tokens, their sizes shuffled along with them.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..merging.base import TokenReducer, TokenState, attach_reducer, take_tokens
from ..merging.exportable import stable_argsort
from .vit import BACKBONES, TransReIDViT


def shuffle_unit(features: Tensor, shift: int, group: int, begin: int = 1) -> Tensor:
    """JPM's shift and patch-shuffle of the token sequence (the official `shuffle_unit`).

    Drops the class token (positions before `begin`), rolls the rest, then interleaves `group` groups.
    When the length is not a multiple of `group`, the second-to-last token is repeated to pad, as the
    official code does for its group of 2. Works on any per-token tensor (B, T, C), sizes included.
    """
    x = torch.cat([features[:, begin - 1 + shift :], features[:, begin : begin - 1 + shift]], dim=1)
    pad = (-x.shape[1]) % group
    if pad:
        x = torch.cat([x] + [x[:, -2:-1]] * pad, dim=1)
    B, T, C = x.shape
    return x.view(B, group, T // group, C).transpose(1, 2).reshape(B, T, C)


def jpm_positions(num_valid: Tensor, length: int, shift: int, group: int, divide: int,
                  rearrange: bool = True) -> tuple[Tensor, Tensor]:
    """Per image, the sequence positions JPM's local parts read when only the first `num_valid` patch
    tokens (after the class token) are valid: `shuffle_unit` and the split applied to those alone.

    num_valid (B,) valid patch tokens; `length` the slots after the class token (the capacity). Returns
    positions (B, divide, P) and a validity mask (B, divide, P) with P = length // divide: part k of an
    image with n valid tokens holds n // divide tokens, the rest of its P slots are empty. With
    n = length this is exactly the positions `shuffle_unit` and the split take.
    """
    part = max(1, length // divide)  # at least one (then empty) slot: ATM may cut a batch down to a few tokens
    n = num_valid.clamp_min(1)[:, None, None]
    q = num_valid[:, None, None] // divide
    t = torch.arange(part, device=num_valid.device)
    idx = torch.arange(divide, device=num_valid.device)[:, None] * q + t  # (B, divide, P)
    valid = (t < q).expand_as(idx)
    if rearrange:
        rows = (n + (-n) % group) // group  # padded length / group
        xi = (idx % group) * rows + idx // group  # position in the rolled (and padded) sequence
        xi = torch.where(xi >= n, n - 2, xi)  # the padding repeats the second-to-last token
        idx = (xi + shift - 1).remainder(n)  # the roll by `shift`, on the patch tokens
    pos = torch.where(valid, idx + 1, 0)  # empty slots read the class token, with size 0
    return pos, valid


def weights_init_kaiming(m: nn.Module) -> None:
    if isinstance(m, nn.BatchNorm1d) and m.affine:
        nn.init.constant_(m.weight, 1.0)
        nn.init.constant_(m.bias, 0.0)


def weights_init_classifier(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.001)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0.0)


def _bnneck(dim: int) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(dim)
    bn.bias.requires_grad_(False)
    bn.apply(weights_init_kaiming)
    return bn


def _classifier(dim: int, num_classes: int) -> nn.Linear:
    fc = nn.Linear(dim, num_classes, bias=False)
    fc.apply(weights_init_classifier)
    return fc


def check_images(x: object, size: tuple[int, int], training: bool = False) -> None:
    """Raise ValueError unless `x` is a batch the model can embed: a float tensor (B, 3, H, W) at the model's
    (H, W), B >= 1, and B >= 2 in train mode (BatchNorm's batch statistics need two images).

    Metadata only (shape, dtype, mode): no value is read, so the check never waits on the device; NaN/inf
    pixels are refused where images enter (FeatureExtractor) and where features are stored (gallery writes).
    """
    want = f"a float tensor (B, 3, {size[0]}, {size[1]}) of preprocessed images (reid_lite.data.build_transforms)"
    if not isinstance(x, Tensor):
        raise ValueError(f"the model takes {want}, got {type(x).__name__}")
    shape = tuple(x.shape)
    if x.dim() == 3 and shape[0] == 3:
        raise ValueError(f"the model takes {want}, got one unbatched image {shape}: add the batch dimension (x[None])")
    if x.dim() != 4:
        raise ValueError(f"the model takes {want}, got shape {shape}")
    if shape[1] != 3:
        raise ValueError(f"the model takes {want}, got {shape[1]} channel(s) in shape {shape}: repeat a grayscale "
                         "channel (x.expand(-1, 3, -1, -1)) or drop alpha")
    if not x.is_floating_point():
        raise ValueError(f"the model takes {want}, got dtype {x.dtype}: convert and normalise the pixels first "
                         "(build_transforms, or x.float() / 255 then the config's PIXEL_MEAN/STD)")
    if shape[2:] != tuple(size):
        raise ValueError(f"the model takes {want}, got size {shape[2:]}: resize to INPUT.SIZE_TEST {list(size)}")
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return  # the batch is symbolic in compiled and exported graphs: a guard on it would specialise them
    if shape[0] == 0:
        raise ValueError(f"the model takes {want}, got an empty batch {shape}")
    if training and shape[0] == 1:
        raise ValueError("a batch of one image in train mode: BatchNorm needs at least 2; call model.eval() to "
                         "embed images, or train with batches of 2 or more")


class TransReID(nn.Module):
    """The full TransReID model.

    Called as the official one: `model(images, cam_label=..., view_label=...)`. In eval mode it returns
    the feature (B, D) without JPM, or the concatenation of the global and four local features
    (B, 5 D, locals divided by 4) with JPM; NECK_FEAT 'after' takes them after the BNNeck. In train mode
    it returns (scores, features): lists of five with JPM.
    """

    def __init__(self, num_classes: int, camera_num: int, view_num: int, cfg):
        super().__init__()
        m = cfg.MODEL
        if m.TRANSFORMER_TYPE not in BACKBONES:
            raise ValueError(f"unknown MODEL.TRANSFORMER_TYPE {m.TRANSFORMER_TYPE!r}; one of {sorted(BACKBONES)}")
        if m.ID_LOSS_TYPE != "softmax":
            raise ValueError(f"MODEL.ID_LOSS_TYPE {m.ID_LOSS_TYPE!r} is not supported; use 'softmax'")
        sizes = {k: v for k, v in dict(embed_dim=m.EMBED_DIM, depth=m.DEPTH, num_heads=m.NUM_HEADS).items() if v}
        self.base: TransReIDViT = BACKBONES[m.TRANSFORMER_TYPE](
            img_size=tuple(cfg.INPUT.SIZE_TRAIN),
            stride_size=m.STRIDE_SIZE,
            sie_xishu=m.SIE_COE,
            camera=camera_num,
            view=view_num,
            local_feature=m.JPM,
            drop_path_rate=m.DROP_PATH,
            drop_rate=m.DROP_OUT,
            attn_drop_rate=m.ATT_DROP_RATE,
            **sizes,
        )
        self.in_planes = dim = self.base.in_planes
        self.num_classes = num_classes
        self.neck_feat = cfg.TEST.NECK_FEAT
        self.jpm = m.JPM
        self.prop_attn = True
        self.trace_source = False
        self.count_tokens = False  # record valid tokens per block in last_state.counts (effective FLOPs)
        self.reducers_only = False  # train only the learned reducers (see `train`)
        self.last_state: TokenState | None = None
        self.classifier = _classifier(dim, num_classes)
        self.bottleneck = _bnneck(dim)
        if self.jpm:
            self.b1 = nn.Sequential(copy.deepcopy(self.base.blocks[-1]), copy.deepcopy(self.base.norm))
            self.b2 = nn.Sequential(copy.deepcopy(self.base.blocks[-1]), copy.deepcopy(self.base.norm))
            for i in range(1, 5):
                setattr(self, f"classifier_{i}", _classifier(dim, num_classes))
                setattr(self, f"bottleneck_{i}", _bnneck(dim))
            self.shuffle_groups = m.SHUFFLE_GROUP
            self.shift_num = m.SHIFT_NUM
            self.divide_length = m.DEVIDE_LENGTH
            self.rearrange = m.RE_ARRANGE
            if self.divide_length != 4:
                raise ValueError("MODEL.DEVIDE_LENGTH must be 4: the official JPM has four local heads")

    # -- token reduction ------------------------------------------------------------------------
    @property
    def reducible_blocks(self) -> list[nn.Module]:
        """The blocks in which tokens may be reduced (the JPM branches consume the result)."""
        return list(self.base.trunk)

    def set_reducers(self, reducers: dict[int, TokenReducer], prop_attn: bool = True) -> None:
        """Attach {0-based block index: reducer}; other blocks are left unreduced."""
        blocks = self.reducible_blocks
        bad = [i for i in reducers if not 0 <= i < len(blocks)]
        if bad:
            raise ValueError(f"blocks {[i + 1 for i in bad]} cannot reduce tokens (1..{len(blocks)})")
        for i, blk in enumerate(blocks):
            attach_reducer(blk, reducers.get(i))
        self.prop_attn = prop_attn

    def train(self, mode: bool = True) -> TransReID:
        """Train/eval mode; with `reducers_only` (DTEM's modular training) training keeps every submodule but
        the learned reducers in eval mode (no drop path, frozen BNNeck statistics), while the model itself
        trains (its heads return the training outputs the losses need)."""
        super().train(mode)
        if mode and self.reducers_only:
            for child in self.children():
                child.train(False)
            for reducer in self.reducers.values():
                if isinstance(reducer, nn.Module):
                    reducer.train(True)
        return self

    @property
    def reducers(self) -> dict[int, TokenReducer]:
        return {i: b.reducer for i, b in enumerate(self.reducible_blocks) if b.reducer is not None}

    def _new_state(self) -> TokenState | None:
        reducers = self.reducers
        if not reducers and not self.trace_source:
            return None
        return TokenState(
            grid=self.base.patch_embed.grid_size,
            prop_attn=self.prop_attn,
            track_pos=any(r.needs_pos for r in reducers.values()),
            trace_source=self.trace_source,
            count_tokens=self.count_tokens,
        )

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: Tensor, label: Tensor | None = None, cam_label=None, view_label=None):
        check_images(x, tuple(self.base.patch_embed.img_size), self.training)
        state = self._new_state()
        features = self.base(x, cam_label=cam_label, view_label=view_label, state=state)
        if self.trace_source or self.count_tokens:
            self.last_state = state
        if not self.jpm:
            return self._head_global(features)
        return self._head_jpm(features, state)

    def _head_global(self, global_feat: Tensor):
        feat = self.bottleneck(global_feat)
        if self.training:
            return self.classifier(feat), global_feat
        return feat if self.neck_feat == "after" else global_feat

    def _head_jpm(self, features: Tensor, state: TokenState | None):
        global_feat = self.b1[1](self.b1[0](features, state))[:, 0]

        if state is not None and state.may_empty:
            local_feats = self._locals_with_empty_slots(features, state)
        else:
            local_feats = self._locals(features, state)
        return self._heads(global_feat, local_feats)

    def _locals(self, features: Tensor, state: TokenState | None) -> tuple[Tensor, ...]:
        """JPM's four local features: shift, shuffle and split the tokens (sizes alongside), run b2."""
        B, T, D = features.shape
        size = state.size if state is not None else None
        patches = features[:, 1:] if not self.rearrange else shuffle_unit(features, self.shift_num, self.shuffle_groups)
        part_len = (T - 1) // self.divide_length
        # The four local branches share b2's weights: run them as one batch of 4B sequences.
        parts = patches[:, : part_len * self.divide_length].reshape(B * self.divide_length, part_len, D)
        cls = features[:, :1].repeat_interleave(self.divide_length, dim=0)
        part_state = None
        if size is not None:
            psize = size[:, 1:] if not self.rearrange else shuffle_unit(size, self.shift_num, self.shuffle_groups)
            psize = psize[:, : part_len * self.divide_length].reshape(B * self.divide_length, part_len, 1)
            part_state = TokenState(grid=state.grid, prop_attn=state.prop_attn,
                                    size=torch.cat([psize.new_ones(psize.shape[0], 1, 1), psize], dim=1))
        elif state is not None:
            part_state = TokenState(grid=state.grid, prop_attn=state.prop_attn)
        local = self.b2[1](self.b2[0](torch.cat([cls, parts], dim=1), part_state))[:, 0]
        return local.reshape(B, self.divide_length, D).unbind(1)

    def _locals_with_empty_slots(self, features: Tensor, state: TokenState) -> tuple[Tensor, ...]:
        """JPM's branches when some slots are empty: per image, the valid tokens in their order (a stable
        sort on size > 0) are shifted, shuffled and split as `_locals` does with all tokens; each part keeps
        the static length (T - 1) // 4, its unused slots empty (size 0, masked out of b2's attention)."""
        B, T, D = features.shape
        valid = state.valid()
        order = stable_argsort((~valid[:, 1:]).to(torch.uint8)) + 1  # valid patches first, in order; exportable
        pos, part_valid = jpm_positions(valid[:, 1:].sum(dim=1), T - 1, self.shift_num, self.shuffle_groups,
                                        self.divide_length, self.rearrange)
        seq = torch.where(part_valid, order.gather(1, (pos - 1).clamp_min(0).flatten(1)).view_as(pos), 0)
        seq = seq.flatten(1)
        part_len = pos.shape[-1]
        parts = take_tokens(features, seq).reshape(B * self.divide_length, part_len, D)
        psize = (take_tokens(state.size, seq) * part_valid.flatten(1)[..., None]).reshape(-1, part_len, 1)
        cls = features[:, :1].repeat_interleave(self.divide_length, dim=0)
        part_state = TokenState(grid=state.grid, prop_attn=state.prop_attn, may_empty=True,
                                size=torch.cat([psize.new_ones(psize.shape[0], 1, 1), psize], dim=1))
        local = self.b2[1](self.b2[0](torch.cat([cls, parts], dim=1), part_state))[:, 0]
        return local.reshape(B, self.divide_length, D).unbind(1)

    def _heads(self, global_feat: Tensor, local_feats: tuple[Tensor, ...]):
        feat = self.bottleneck(global_feat)
        local_bn = [getattr(self, f"bottleneck_{i + 1}")(f) for i, f in enumerate(local_feats)]
        if self.training:
            scores = [self.classifier(feat)] + [getattr(self, f"classifier_{i + 1}")(f) for i, f in enumerate(local_bn)]
            return scores, [global_feat, *local_feats]
        if self.neck_feat == "after":
            return torch.cat([feat] + [f / 4 for f in local_bn], dim=1)
        return torch.cat([global_feat] + [f / 4 for f in local_feats], dim=1)

    @property
    def feature_dim(self) -> int:
        """Dimension of the eval-mode feature."""
        return self.in_planes * (5 if self.jpm else 1)
