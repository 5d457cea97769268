"""The one place a configuration becomes a model: TransReID, its token merging with the budgets solved
(GFLOPs, latency), and its weights (ImageNet, a TransReID checkpoint).

    model = build_model(cfg, num_classes, camera_num)
    model = build_model_for_checkpoint(cfg, "transreid.pth", camera_num=6)
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from .compress.budget import merge_with_budget, refresh_budget, synthetic_calibration
from .compress.latency import apply_latency_budget
from .models import TransReID, check_sie_counts
from .models.checkpoint import (
    load_imagenet_backbone,
    load_transreid_checkpoint,
    load_transreid_state,
    sie_table_cameras,
)
from .utils.checkpoint_file import CheckpointError, read_state_dict

logger = logging.getLogger(__name__)

__all__ = ["build_model", "build_model_for_checkpoint", "load_checkpoint"]


def build_model(cfg, num_classes: int, camera_num: int = 0, view_num: int = 0) -> TransReID:
    """Build TransReID as the official `make_model(cfg, num_class, camera_num, view_num)` does, with
    token reduction attached as cfg.MERGE configures it.

    SIE uses `camera_num` when MODEL.SIE_CAMERA and `view_num` when MODEL.SIE_VIEW; either must then be at
    least 2 (ValueError otherwise: one camera carries no side information, and a checkpoint's table size is
    what matters, see `build_model_for_checkpoint`). Weights:
    MODEL.PRETRAIN_CHOICE 'imagenet' loads a timm-format ViT file from MODEL.PRETRAIN_PATH into the
    backbone (when a path is set), 'self' loads a full TransReID checkpoint from it, 'none' keeps the
    random initialisation.
    """
    m = cfg.MODEL
    check_sie_counts(cfg, camera_num, view_num)
    model = TransReID(num_classes, camera_num if m.SIE_CAMERA else 0, view_num if m.SIE_VIEW else 0, cfg)
    choice = m.PRETRAIN_CHOICE.lower()
    if m.PRETRAIN_PATH and choice == "imagenet":
        load_imagenet_backbone(model.base, m.PRETRAIN_PATH, trust=m.TRUST_CHECKPOINT)
        if model.jpm:  # the branches copy the last block after the ImageNet weights are in, as officially
            model.b1.load_state_dict(_branch_state(model))
            model.b2.load_state_dict(_branch_state(model))
        logger.info("loaded ImageNet weights from %s", m.PRETRAIN_PATH)
    elif choice == "self":
        if not m.PRETRAIN_PATH:
            raise CheckpointError("MODEL.PRETRAIN_CHOICE 'self' needs MODEL.PRETRAIN_PATH (a TransReID checkpoint)")
    elif choice not in ("imagenet", "none"):
        raise ValueError(f"MODEL.PRETRAIN_CHOICE must be 'imagenet', 'self' or 'none', got {m.PRETRAIN_CHOICE!r}")
    # Image-dependent budgets (ATM) need images; without a dataset here, seeded synthetic pedestrians.
    merge_with_budget(model, cfg.MERGE, lambda: synthetic_calibration(cfg, int(cfg.MERGE.CALIBRATION_IMAGES),
                                                                      int(model.base.cam_num)))
    if choice == "self":  # after the merging: a learned one (DTEM) loads its weights with the checkpoint's
        load_checkpoint(model, m.PRETRAIN_PATH, trust=m.TRUST_CHECKPOINT)
    if cfg.MERGE.TARGET_LATENCY_MS > 0 and str(m.BACKEND).lower() == "torch":
        apply_latency_budget(model, cfg)  # measured here, on MODEL.DEVICE at TEST.IMS_PER_BATCH
    return model


def build_model_for_checkpoint(cfg, path: str | Path, num_classes: int = 1, camera_num: int = 0,
                               view_num: int = 0) -> TransReID:
    """Build TransReID for a trained checkpoint and load it strictly, classifiers excluded.

    With MODEL.SIE_CAMERA the camera count comes from the checkpoint's SIE table, not from `camera_num`
    (the cameras of the data at hand): a model trained on 6 cameras embeds crops of 2 with its 6-row table.
    `camera_num` is only checked against it: ids of the data must index the table. The file is read once
    (weights-only unless MODEL.TRUST_CHECKPOINT).
    """
    state = read_state_dict(path, trust=cfg.MODEL.TRUST_CHECKPOINT)
    if cfg.MODEL.SIE_CAMERA:
        table = sie_table_cameras(state, view_num if cfg.MODEL.SIE_VIEW else 0)
        if table == 0:
            raise CheckpointError(f"{path} has no camera SIE table (base.sie_embed): it was trained without "
                                  "it; set MODEL.SIE_CAMERA False")
        if camera_num > table:
            raise CheckpointError(f"the data has {camera_num} cameras (ids 0..{camera_num - 1}) but {path} "
                                  f"was trained with {table} (its SIE table); camera ids must be below {table}")
        if camera_num and camera_num != table:
            logger.info("%s: SIE table of %d cameras (the data has %d)", path, table, camera_num)
        camera_num = table
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.PRETRAIN_CHOICE = "none"  # the checkpoint replaces every weight: no ImageNet file is read
    model = build_model(cfg, num_classes, camera_num, view_num)
    load_transreid_state(model, state, str(path), ignore_classifier=True)
    refresh_budget(model)  # an image-dependent budget was solved on the build's weights
    return model


def load_checkpoint(model: nn.Module, path: str | Path, trust: bool = False, ignore_classifier: bool = False) -> None:
    """Load an official TransReID checkpoint into `model` strictly (`load_transreid_checkpoint`), then solve an
    image-dependent GFLOPs budget again on the new weights (`refresh_budget`; nothing for other models)."""
    load_transreid_checkpoint(model, path, trust, ignore_classifier)
    refresh_budget(model)


def _branch_state(model: TransReID) -> dict:
    block = {f"0.{k}": v for k, v in model.base.blocks[-1].state_dict().items()}
    norm = {f"1.{k}": v for k, v in model.base.norm.state_dict().items()}
    return {**block, **norm}
