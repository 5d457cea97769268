"""The model fingerprint: everything that changes a feature (architecture, weights, merging, feature, input),
as canonical JSON. Galleries store it and compare query models with it; exported files carry it."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from ..merging import learned_state_dict, method_fingerprint
from ..utils.files import sha256_file

__all__ = ["fingerprint_digest", "model_fingerprint", "tensors_digest"]


def _weights_id(cfg: Any) -> str:
    """sha256 of the checkpoint the model's weights come from, or 'random-init' with the seed."""
    seed = int(cfg.SOLVER.SEED)
    if cfg.TEST.WEIGHT:
        return "sha256:" + sha256_file(cfg.TEST.WEIGHT)
    choice = str(cfg.MODEL.PRETRAIN_CHOICE).lower()
    if choice == "self" and cfg.MODEL.PRETRAIN_PATH:
        return "sha256:" + sha256_file(cfg.MODEL.PRETRAIN_PATH)
    if choice == "imagenet" and cfg.MODEL.PRETRAIN_PATH:
        # The heads (b1/b2 copies aside) stay randomly initialised: the seed is part of the identity.
        return f"imagenet-sha256:{sha256_file(cfg.MODEL.PRETRAIN_PATH)}+seed={seed}"
    return f"random-init:seed={seed}"


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of named tensors (names, dtypes, shapes and values, in name order)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_fingerprint(cfg: Any, model: torch.nn.Module, feature: str, camera_num: int) -> dict[str, Any]:
    """Everything that changes a stored feature: architecture, weights, merging, feature and input.

    Two fingerprints are equal iff features from the two models are comparable. Compared as
    canonical JSON; `fingerprint_digest` is its sha256.
    """
    deployed = getattr(model, "deployed_fingerprint", None)
    if deployed is not None:  # an exported model (reid_lite.deploy): its file's fingerprint, backend and digest
        return deployed(cfg, feature)
    base = model.base
    blocks = list(base.blocks)
    # The registry knows every method's identifying options, plugins' included: any difference refuses.
    r_solved = getattr(model, "merge_r", None)
    solved = getattr(model, "merge_setting", None)  # what a budget chose, when it is not a constant r
    merging = method_fingerprint(cfg.MERGE, r_solved, solved if r_solved is None else None)
    learned = learned_state_dict(model)
    if learned:  # a learned merging (DTEM's embedding): its values, wherever they came from
        merging["learned_sha256"] = tensors_digest(learned)
    in_dim = int(model.in_planes)
    return {
        "architecture": {
            "transformer_type": cfg.MODEL.TRANSFORMER_TYPE, "embed_dim": in_dim, "depth": len(blocks),
            "num_heads": int(blocks[0].attn.num_heads), "stride": list(cfg.MODEL.STRIDE_SIZE),
            "jpm": bool(cfg.MODEL.JPM), "sie_camera": bool(cfg.MODEL.SIE_CAMERA), "sie_coe": float(cfg.MODEL.SIE_COE),
            "camera_num": int(camera_num) if cfg.MODEL.SIE_CAMERA else 0, "neck_feat": cfg.TEST.NECK_FEAT,
        },
        "weights": _weights_id(cfg),
        "merging": merging,
        "feature": {"kind": feature, "dim": in_dim if feature == "global" else int(model.feature_dim),
                    "normalisation": "l2", "flip": bool(cfg.TEST.FLIP)},
        "input": {"size": list(cfg.INPUT.SIZE_TEST), "pixel_mean": list(cfg.INPUT.PIXEL_MEAN),
                  "pixel_std": list(cfg.INPUT.PIXEL_STD)},
    }


def fingerprint_digest(fp: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a fingerprint."""
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()
