"""Models: TransReID (ViT backbone, SIE, JPM, BNNeck) and its checkpoint loading."""

from __future__ import annotations

import logging

from torch import nn

from .checkpoint import (
    CheckpointError,
    load_imagenet_backbone,
    load_transreid_checkpoint,
    read_state_dict,
    sie_table_cameras,
)
from .transreid import TransReID, shuffle_unit
from .vit import BACKBONES, Attention, Block, PatchEmbedOverlap, TransReIDViT

logger = logging.getLogger(__name__)


def build_model(cfg, num_classes: int, camera_num: int = 0, view_num: int = 0) -> TransReID:
    """Build TransReID as the official `make_model(cfg, num_class, camera_num, view_num)` does, with
    token reduction attached as cfg.MERGE configures it.

    SIE uses `camera_num` when MODEL.SIE_CAMERA and `view_num` when MODEL.SIE_VIEW. Weights:
    MODEL.PRETRAIN_CHOICE 'imagenet' loads a timm-format ViT file from MODEL.PRETRAIN_PATH into the
    backbone (when a path is set), 'self' loads a full TransReID checkpoint from it, 'none' keeps the
    random initialisation.
    """
    from ..merging import apply_merging

    m = cfg.MODEL
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
        load_transreid_checkpoint(model, m.PRETRAIN_PATH, trust=m.TRUST_CHECKPOINT)
    elif choice not in ("imagenet", "none"):
        raise ValueError(f"MODEL.PRETRAIN_CHOICE must be 'imagenet', 'self' or 'none', got {m.PRETRAIN_CHOICE!r}")
    apply_merging(model, cfg.MERGE)
    if cfg.MERGE.TARGET_LATENCY_MS > 0 and str(m.BACKEND).lower() == "torch":
        from ..deploy.latency import apply_latency_budget

        apply_latency_budget(model, cfg)  # measured here, on MODEL.DEVICE at TEST.IMS_PER_BATCH
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
    "count_parameters",
    "load_imagenet_backbone",
    "load_transreid_checkpoint",
    "read_state_dict",
    "shuffle_unit",
    "sie_table_cameras",
]
