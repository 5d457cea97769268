"""Models: TransReID (ViT backbone, SIE, JPM, BNNeck), its checkpoint loading and its fingerprint.

A model is built from a configuration (merging, budgets, weights) by `reid_lite.build.build_model`.
"""

from __future__ import annotations

from torch import nn

from ..config import check_input_size
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
