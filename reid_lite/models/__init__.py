"""Models: TransReID (ViT backbone, SIE, JPM, BNNeck) and its checkpoint loading."""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from .checkpoint import (
    CheckpointError,
    check_checkpoint_file,
    load_imagenet_backbone,
    load_transreid_checkpoint,
    load_transreid_state,
    read_state_dict,
    sie_table_cameras,
)
from .transreid import TransReID, shuffle_unit
from .vit import BACKBONES, Attention, Block, PatchEmbedOverlap, TransReIDViT

logger = logging.getLogger(__name__)


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
    from ..merging import apply_merging

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
    from ..merging.budget import synthetic_calibration

    # Image-dependent budgets (ATM) need images; without a dataset here, seeded synthetic pedestrians.
    apply_merging(model, cfg.MERGE, lambda: synthetic_calibration(cfg, int(cfg.MERGE.CALIBRATION_IMAGES),
                                                                  int(model.base.cam_num)))
    if choice == "self":  # after the merging: a learned one (DTEM) loads its weights with the checkpoint's
        load_transreid_checkpoint(model, m.PRETRAIN_PATH, trust=m.TRUST_CHECKPOINT)
    if cfg.MERGE.TARGET_LATENCY_MS > 0 and str(m.BACKEND).lower() == "torch":
        from ..deploy.latency import apply_latency_budget

        apply_latency_budget(model, cfg)  # measured here, on MODEL.DEVICE at TEST.IMS_PER_BATCH
    return model


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
    return model


def _branch_state(model: TransReID) -> dict:
    block = {f"0.{k}": v for k, v in model.base.blocks[-1].state_dict().items()}
    norm = {f"1.{k}": v for k, v in model.base.norm.state_dict().items()}
    return {**block, **norm}


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
    "build_model",
    "build_model_for_checkpoint",
    "check_checkpoint_file",
    "check_input_size",
    "check_sie_counts",
    "count_parameters",
    "load_imagenet_backbone",
    "load_transreid_checkpoint",
    "load_transreid_state",
    "read_state_dict",
    "shuffle_unit",
    "sie_table_cameras",
]
