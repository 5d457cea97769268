"""Pairwise distances as TransReID / torchreid compute them (torch, float32)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Metric", "as_float_tensor", "l2_normalize", "pairwise_distance"]

Metric = Literal["cosine", "euclidean"]


def as_float_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Float32 contiguous CPU tensor; shares memory with ``x`` when it already is one (no copy)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(dtype=torch.float32).contiguous()
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def l2_normalize(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Row-wise L2 normalisation, ``F.normalize`` semantics (norm clamped at 1e-12)."""
    return F.normalize(as_float_tensor(x), p=2, dim=1)


def pairwise_distance(
    q: torch.Tensor,
    g: torch.Tensor,
    metric: Metric = "euclidean",
    g_sqnorm: torch.Tensor | None = None,
) -> torch.Tensor:
    """(len(q), len(g)) distance block.

    * ``euclidean``: squared Euclidean distance ``||q||^2 + ||g||^2 - 2 q.g`` exactly as TransReID's
      ``euclidean_distance`` (one ``addmm``, no sqrt, no clamping; ranking is the same as Euclidean).
    * ``cosine``: ``1 - q.g``; the caller passes rows already L2-normalised (see `l2_normalize`),
      which is torchreid's ``cosine_distance``.

    Args:
        q: (B, D) float32 query features.
        g: (G, D) float32 gallery features.
        metric: ``"euclidean"`` or ``"cosine"``.
        g_sqnorm: optional precomputed ``(g ** 2).sum(1)`` so chunked callers compute it once.
    """
    if metric == "euclidean":
        if g_sqnorm is None:
            g_sqnorm = g.pow(2).sum(dim=1)
        base = q.pow(2).sum(dim=1, keepdim=True) + g_sqnorm.unsqueeze(0)
        return torch.addmm(base, q, g.t(), beta=1.0, alpha=-2.0)
    if metric == "cosine":
        # In place: -s + 1 == 1 - s exactly, and no second (B, G) temporary.
        return torch.mm(q, g.t()).neg_().add_(1.0)
    raise ValueError(f"unknown metric {metric!r}; use 'cosine' or 'euclidean'")
