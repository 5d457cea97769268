"""Models: TransReID (ViT backbone, SIE, JPM, BNNeck), its checkpoint loading and its fingerprint.

A model is built from a configuration (merging, budgets, weights) by `reid_lite.build.build_model`.
"""

from __future__ import annotations

from torch import nn

from ..utils.checkpoint_file import CheckpointError, check_checkpoint_file, read_state_dict
from .checkpoint import (
    load_imagenet_backbone,
    load_transreid_checkpoint,
    load_transreid_state,
    sie_table_cameras,
)
from .fingerprint import model_fingerprint
from .transreid import TransReID, shuffle_unit
from .vit import BACKBONES, Attention, Block, PatchEmbedOverlap, TransReIDViT


def check_sie_counts(cfg, camera_num: int, view_num: int) -> None:
    """Raise ValueError when MODEL.SIE_CAMERA / SIE_VIEW is on with fewer than two cameras / views.

    The official code would index a table it never created; silently building the model without SIE
    would give features that match no SIE-trained checkpoint.
    """
    for key, count, what, arg in (("SIE_CAMERA", camera_num, "camera", "camera_num"),
                                  ("SIE_VIEW", view_num, "view", "view_num")):
        if cfg.MODEL[key] and count < 2:
            raise ValueError(
                f"MODEL.{key} is on but {arg}={count}: the side-information embedding needs at least 2 {what}s. "
                f"Pass the {what} count the model was trained with (a checkpoint's SIE table has one row per "
                f"camera: reid_lite.models.sie_table_cameras), or set MODEL.{key} False")


def check_input_size(cfg, model: nn.Module | None = None) -> None:
    """Raise ValueError when INPUT.SIZE_TEST differs from the image size the model is built for
    (`model`'s patch embedding, or INPUT.SIZE_TRAIN, from which `build_model` sizes it).

    TransReID's position embedding has one entry per patch of that size's grid, so test images of another
    size cannot be embedded (the official code, too, uses one size for both); checked before any image is
    read instead of failing in the first forward.
    """
    embed = getattr(getattr(model, "base", None), "patch_embed", None)
    if model is not None and embed is None:
        return  # not a TransReID: nothing known about its input size
    built = tuple(embed.img_size) if embed is not None else tuple(int(v) for v in cfg.INPUT.SIZE_TRAIN)
    test = tuple(int(v) for v in cfg.INPUT.SIZE_TEST)
    if built != test:
        raise ValueError(f"INPUT.SIZE_TEST {list(test)} differs from INPUT.SIZE_TRAIN {list(built)}, the size "
                         f"the model (its position embedding) is built for: set both to the checkpoint's "
                         f"training size, e.g. INPUT.SIZE_TEST '{list(built)}'")


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of `model`."""
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "BACKBONES",
    "Attention",
    "Block",
    "CheckpointError",
    "PatchEmbedOverlap",
    "TransReID",
    "TransReIDViT",
    "check_checkpoint_file",
    "check_input_size",
    "check_sie_counts",
    "count_parameters",
    "load_imagenet_backbone",
    "load_transreid_checkpoint",
    "load_transreid_state",
    "model_fingerprint",
    "read_state_dict",
    "shuffle_unit",
    "sie_table_cameras",
]
