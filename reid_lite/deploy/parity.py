"""Parity of a deployed model with PyTorch: per-image cosine, relative difference, top-10 rankings.

Merging takes discrete decisions (which tokens merge). A runtime whose arithmetic differs from
PyTorch's in the last bits can flip a decision between two nearly equal scores, and that image's
feature then moves by more than rounding. PyTorch does the same to itself: perturbing the input by
1e-6 flips the same kind of image (on the demo model, the very same image to the same cosine, 0.9971).
So parity is judged in two parts:

- images equal up to rounding (max relative difference < ROUNDING) must be the majority, and the
  top-10 rankings among them must be PyTorch's (ties within RANK_TIE allowed): a wrong graph fails this;
- every image, flipped or not, must keep a cosine of at least MIN_COSINE with PyTorch's feature.

The report lists the flipped images and how many images PyTorch itself flips under a 1e-6 input
perturbation (`torch_self_flips`, when measured), so that the two can be compared.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

#: Every image's cosine with PyTorch's feature must be at least this (decision flips included).
MIN_COSINE = 0.99
#: Relative difference (max |f - f_ref| / max |f_ref|) below which an image counts as equal up to rounding.
ROUNDING = 1e-3
#: Top-k rankings compared; differences between items whose PyTorch distances tie within RANK_TIE are allowed.
TOP_K = 10
RANK_TIE = 1e-4


@dataclass
class ParityReport:
    """How a backend's features compare with PyTorch's on the same images and cameras.

    min_cosine / mean_cosine: per-image cosine similarity; max_rel_diff: max over images of
    max|f - f_ref| / max|f_ref|; max_rel_diff_rounding: the same over the images equal up to rounding;
    flipped: images beyond rounding (a merging decision went the other way); ranking_same: queries,
    among the images equal up to rounding, whose top-k over the others is PyTorch's; torch_self_flips:
    images PyTorch itself moves beyond rounding under a 1e-6 input perturbation (-1: not measured).
    """

    backend: str
    images: int
    batch_sizes: list[int]
    min_cosine: float
    mean_cosine: float
    max_rel_diff: float
    max_rel_diff_rounding: float
    flipped: list[int]
    ranking_same: int
    ranked: int
    top_k: int
    passed: bool
    failures: list[str] = field(default_factory=list)
    torch_self_flips: int = -1

    def line(self) -> str:
        """One human-readable line."""
        status = "ok" if self.passed else "FAILED: " + "; ".join(self.failures)
        self_flips = f" (PyTorch itself: {self.torch_self_flips})" if self.torch_self_flips >= 0 else ""
        return (f"{self.backend}: {self.images} images, batches {self.batch_sizes}, cosine min {self.min_cosine:.6f} "
                f"mean {self.mean_cosine:.6f}, max rel diff {self.max_rel_diff:.2e} ({self.max_rel_diff_rounding:.2e} "
                f"without flips), decision flips {len(self.flipped)}{self_flips}, same top-{self.top_k} "
                f"{self.ranking_same}/{self.ranked}: {status}")

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-ready dict (stored in the exported file's metadata)."""
        return asdict(self)


def _as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).astype(np.float64)


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def same_ranking(ref: np.ndarray, other: np.ndarray, k: int = TOP_K, tie: float = RANK_TIE) -> np.ndarray:
    """Per query (each row against all other rows, L2-normalised, squared Euclidean): is the top-k the same?

    Positions where the two top-k lists differ are accepted when PyTorch's own distances to the two
    items there differ by at most `tie` (PyTorch cannot tell them apart either).
    """
    a, b = _l2(ref), _l2(other)
    da = ((a[:, None] - a[None]) ** 2).sum(-1)
    db = ((b[:, None] - b[None]) ** 2).sum(-1)
    np.fill_diagonal(da, np.inf)
    np.fill_diagonal(db, np.inf)
    k = min(k, len(a) - 1)
    ra = np.argsort(da, axis=1, kind="stable")[:, :k]
    rb = np.argsort(db, axis=1, kind="stable")[:, :k]
    gap = np.abs(np.take_along_axis(da, ra, 1) - np.take_along_axis(da, rb, 1))
    return ~((ra != rb) & (gap > tie)).any(axis=1)


def compare_features(backend: str, ref: torch.Tensor | np.ndarray, other: torch.Tensor | np.ndarray,
                     batch_sizes: list[int], min_cosine: float = MIN_COSINE, top_k: int = TOP_K) -> ParityReport:
    """ParityReport of `other` (N, D) against PyTorch's `ref` (N, D), rows being the same images."""
    a, b = _as_numpy(ref), _as_numpy(other)
    if a.shape != b.shape:
        raise ValueError(f"{backend}: features of shape {b.shape}, PyTorch's are {a.shape}")
    failures = []
    if not np.isfinite(b).all():
        failures.append("non-finite features")
        b = np.nan_to_num(b)
    cos = (_l2(a) * _l2(b)).sum(1)
    rel = np.abs(a - b).max(1) / np.maximum(np.abs(a).max(1), 1e-12)
    exact = rel < ROUNDING
    flipped = np.flatnonzero(~exact).tolist()
    ranking = same_ranking(a[exact], b[exact], top_k) if exact.sum() > 1 else np.zeros(0, dtype=bool)
    if cos.min() < min_cosine:
        failures.append(f"cosine {cos.min():.6f} < {min_cosine} for image {int(cos.argmin())}")
    if exact.sum() * 2 <= len(a):
        failures.append(f"only {int(exact.sum())}/{len(a)} images equal up to rounding (rel diff < {ROUNDING})")
    if not ranking.all():
        failures.append(f"top-{top_k} ranking differs for {int((~ranking).sum())} images equal up to rounding")
    return ParityReport(backend, len(a), list(batch_sizes), float(cos.min()), float(cos.mean()), float(rel.max()),
                        float(rel[exact].max()) if exact.any() else float("nan"), flipped, int(ranking.sum()),
                        len(ranking), min(top_k, len(a) - 1), not failures, failures)


def self_flips(forward: Any, images: torch.Tensor, reference: torch.Tensor, eps: float = 1e-6, seed: int = 0) -> int:
    """Images whose PyTorch feature moves beyond rounding when the input moves by `eps` (B, 3, H, W) noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        moved = forward(images + eps * torch.randn(images.shape, generator=g))
    a, b = _as_numpy(reference), _as_numpy(moved)
    rel = np.abs(a - b).max(1) / np.maximum(np.abs(a).max(1), 1e-12)
    return int((rel >= ROUNDING).sum())
