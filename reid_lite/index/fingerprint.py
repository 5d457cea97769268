"""How a gallery uses the model fingerprint (`reid_lite.models.fingerprint`): the check that binds a gallery to
one model, the query models it accepts, the features in its space and the SIE cameras of its model."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from ..models.checkpoint import sie_table_cameras
from ..models.fingerprint import fingerprint_digest, model_fingerprint, tensors_digest
from ..utils.checkpoint_file import read_state_dict
from .storage import FingerprintMismatch

__all__ = ["QUERY_COMPAT", "accepts_merged_queries", "allow_merged_queries", "check_fingerprint",
           "check_query_fingerprint", "checkpoint_path", "fingerprint_digest", "gallery_space", "model_digest",
           "model_fingerprint", "model_part", "resolve_camera_num",
           "tensors_digest"]

#: Key of a gallery fingerprint recording which other query models it accepts (not part of the model).
QUERY_COMPAT = "compatible_queries"


def _fingerprint_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _fingerprint_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: gallery {va!r} != query {vb!r}")
    return out


def model_part(fp: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint of the model alone: without a gallery's record of the query models it accepts."""
    return {k: v for k, v in fp.items() if k != QUERY_COMPAT}


def model_digest(fp: dict[str, Any]) -> str:
    """sha256 of the model part of a fingerprint (equal for a gallery's model and the same model's queries)."""
    return fingerprint_digest(model_part(fp))


def allow_merged_queries(fp: dict[str, Any]) -> dict[str, Any]:
    """A gallery fingerprint that also accepts queries from the same model with any token merging.

    Only for a gallery embedded without merging (merging.method 'none'): its features are the model's
    own, and a merged query model with the same architecture, weights, feature and input approximates
    them (`tools/test.py --asymmetric` measures how well). Raises ValueError for a merging gallery.
    """
    method = fp.get("merging", {}).get("method")
    if method != "none":
        raise ValueError(f"accepting merged queries needs a gallery embedded without token merging "
                         f"(MERGE.METHOD none); this one merges with {method!r}")
    return {**model_part(fp), QUERY_COMPAT: {"merging": "any"}}


def accepts_merged_queries(fp: dict[str, Any]) -> bool:
    """Whether a gallery fingerprint accepts queries whose model differs from it only in token merging."""
    return (fp.get(QUERY_COMPAT) or {}).get("merging") == "any"


def check_fingerprint(gallery_fp: dict[str, Any], other_fp: dict[str, Any]) -> None:
    """Raise `FingerprintMismatch` listing the differing fields when the models differ at all
    (what a gallery stores must come from its own model; see `check_query_fingerprint` for queries)."""
    diff = _fingerprint_diff(model_part(gallery_fp), model_part(other_fp))
    if diff:
        raise FingerprintMismatch(
            "refused: the query model differs from the model this gallery was built with, so its features "
            "are not comparable (" + "; ".join(diff) + "). Search with the gallery's own model "
            "(omit --config/--weights) or build a new gallery.")


def check_query_fingerprint(gallery_fp: dict[str, Any], query_fp: dict[str, Any]) -> bool:
    """Check a query model against a gallery: returns True for an accepted asymmetric query (the gallery
    accepts merged queries and only the merging differs), False for the gallery's own model, and raises
    `FingerprintMismatch` (listing the differing fields, with the opt-in when it would help) otherwise."""
    diff = _fingerprint_diff(model_part(gallery_fp), model_part(query_fp))
    if not diff:
        return False
    only_merging = all(d.startswith("merging.") for d in diff)
    if only_merging and accepts_merged_queries(gallery_fp):
        return True
    hint = ""
    if only_merging and gallery_fp.get("merging", {}).get("method") == "none":
        hint = (" This gallery was embedded without merging but does not accept merged queries: build it with "
                "--accept-merged-queries (accept_merged_queries=True) to opt in.")
    raise FingerprintMismatch(
        "refused: the query model differs from the model this gallery was built with, so its features "
        "are not comparable (" + "; ".join(diff) + "). Search with the gallery's own model "
        "(omit --config/--weights) or build a new gallery." + hint)


def gallery_space(feats: torch.Tensor | np.ndarray, fp: dict[str, Any]) -> np.ndarray:
    """Features as a gallery with fingerprint `fp` stores them: the global part for a 'global' gallery
    (the first embed_dim columns of the eval feature), L2-normalised, float32, contiguous."""
    x = feats.numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats)
    x = x.astype(np.float32, copy=False)
    if fp["feature"]["kind"] == "global":
        x = x[:, : fp["architecture"]["embed_dim"]]
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norm, 1e-12), dtype=np.float32)


def checkpoint_path(cfg: Any) -> str | None:
    """The full TransReID checkpoint the model's weights come from (TEST.WEIGHT, else a 'self'
    PRETRAIN_PATH), or None (random or ImageNet initialisation: no SIE table to read)."""
    if cfg.TEST.WEIGHT:
        return str(cfg.TEST.WEIGHT)
    if str(cfg.MODEL.PRETRAIN_CHOICE).lower() == "self" and cfg.MODEL.PRETRAIN_PATH:
        return str(cfg.MODEL.PRETRAIN_PATH)
    return None


def resolve_camera_num(cfg: Any, requested: int = 0, camids: Iterable[int | None] = ()) -> int:
    """Cameras of the SIE embedding of the gallery model, checked against the crops' camera ids.

    A checkpoint decides: its SIE table has one row per trained camera (`sie_table_cameras`), so a
    model trained on 6 cameras embeds crops from 2. Without one, `requested` (--camera-num) or else
    the highest camera id + 1. Raises ValueError (naming --camera-num) when the ids do not fit.
    """
    highest = max((int(c) for c in camids if c is not None), default=-1)
    if not cfg.MODEL.SIE_CAMERA:
        return max(1, int(requested), highest + 1)
    path = checkpoint_path(cfg)
    table = sie_table_cameras(read_state_dict(path, trust=cfg.MODEL.TRUST_CHECKPOINT)) if path else 0
    if table:
        if requested and int(requested) != table:
            raise ValueError(f"--camera-num {requested} does not match the checkpoint {path}, whose SIE table has "
                             f"{table} cameras; omit --camera-num (the checkpoint decides)")
        if highest >= table:
            raise ValueError(f"crops from camera {highest} (0-based), but the checkpoint {path} has an SIE table "
                             f"for {table} cameras (0..{table - 1}); it cannot embed cameras it was not trained on: "
                             "map the crops onto its cameras (a --sidecar camid column) or use a model without "
                             "camera SIE (--opts MODEL.SIE_CAMERA False)")
        return table
    if requested and highest >= int(requested):
        raise ValueError(f"crops from camera {highest} (0-based ids), but --camera-num is {requested}; "
                         f"pass --camera-num {highest + 1} or more")
    return max(1, int(requested) or highest + 1)
