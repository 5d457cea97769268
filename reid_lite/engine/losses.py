"""TransReID's training losses: ID (cross-entropy, optionally label-smoothed) + hard-mining triplet.

Mirrors the official `loss/make_loss.py`, `loss/triplet_loss.py` and `loss/softmax_loss.py`:

* `CrossEntropyLabelSmooth` (epsilon 0.1) targets `(1 - eps) * onehot + eps / C`, which is exactly
  `F.cross_entropy(..., label_smoothing=eps)`, so that is what we call.
* `TripletLoss` takes Euclidean distances of the raw (pre-BNNeck) features, the hardest positive
  (largest distance, the anchor itself included) and hardest negative (smallest distance) per anchor,
  and a margin ranking loss, or a soft margin `log(1 + exp(d_ap - d_an))` when there is no margin.
* With JPM the model returns five scores/features (global first, then the four local branches):
  `ID = 0.5 * CE(score[0]) + 0.5 * mean(CE(score[1:]))`, the same for the triplet term, and the
  total is `ID_LOSS_WEIGHT * ID + TRIPLET_LOSS_WEIGHT * TRI`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LossFn",
    "TripletLoss",
    "cross_entropy",
    "euclidean_dist",
    "hard_example_mining",
    "jpm_weighted",
    "make_loss",
]

#: `loss_fn(scores, features, targets) -> scalar loss`, scores/features a tensor or a list of five (JPM).
LossFn = Callable[[Tensor | Sequence[Tensor], Tensor | Sequence[Tensor], Tensor], Tensor]

LABEL_SMOOTH_EPSILON = 0.1  # the official CrossEntropyLabelSmooth's default


def euclidean_dist(x: Tensor, y: Tensor) -> Tensor:
    """Pairwise Euclidean distances (M, N) between rows of `x` (M, D) and `y` (N, D).

    Computed as the official code does, `sqrt(clamp(|x|^2 + |y|^2 - 2 x.y, 1e-12))`: the clamp keeps the
    gradient of sqrt finite on the diagonal (distance of an anchor to itself).
    """
    xx = x.pow(2).sum(1, keepdim=True)
    yy = y.pow(2).sum(1, keepdim=True).t()
    dist = xx + yy - 2.0 * x @ y.t()
    return dist.clamp(min=1e-12).sqrt()


def hard_example_mining(dist_mat: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For each anchor, the hardest positive and hardest negative of a square distance matrix.

    Returns `(dist_ap, dist_an, p_inds, n_inds)`, each of shape (N,): the largest distance to a sample of
    the same label (the anchor itself counts, as in the official code, so an anchor with no other
    positive gets ~0) and the smallest distance to a sample of another label, with their column indices.
    Unlike the official `view(N, -1)` trick this does not need the same number of positives per anchor
    (a P x K batch); anchors with no negative get `dist_an = inf` and should be dropped by the caller.
    """
    n = dist_mat.size(0)
    is_pos = labels.view(n, 1).eq(labels.view(1, n))
    dist_ap, p_inds = dist_mat.masked_fill(~is_pos, float("-inf")).max(dim=1)
    dist_an, n_inds = dist_mat.masked_fill(is_pos, float("inf")).min(dim=1)
    return dist_ap, dist_an, p_inds, n_inds


class TripletLoss:
    """Batch-hard triplet loss (Hermans et al. 2017) as TransReID implements it.

    `margin=None` gives the soft margin `mean(log(1 + exp(d_ap - d_an)))` (MODEL.NO_MARGIN); otherwise
    `mean(max(0, d_ap - d_an + margin))`. Features are not normalised (the official default).
    """

    def __init__(self, margin: float | None = None) -> None:
        self.margin = margin

    def __call__(self, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return `(loss, dist_ap, dist_an)` for `features` (N, D) with integer `labels` (N,)."""
        dist_ap, dist_an, _, _ = hard_example_mining(euclidean_dist(features, features), labels)
        valid = torch.isfinite(dist_an)
        if not bool(valid.any()):  # a batch of one identity has no triplet; contribute nothing
            return features.sum() * 0.0, dist_ap, dist_an
        ap, an = dist_ap[valid], dist_an[valid]
        if self.margin is None:
            loss = F.soft_margin_loss(an - ap, torch.ones_like(an))
        else:
            loss = F.margin_ranking_loss(an, ap, torch.ones_like(an), margin=self.margin)
        return loss, dist_ap, dist_an


def cross_entropy(label_smoothing: bool) -> Callable[[Tensor, Tensor], Tensor]:
    """The ID loss: plain cross-entropy, or label-smoothed with epsilon 0.1 (CrossEntropyLabelSmooth)."""
    eps = LABEL_SMOOTH_EPSILON if label_smoothing else 0.0

    def ce(scores: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(scores, targets, label_smoothing=eps)

    return ce


def jpm_weighted(fn: Callable[[Tensor], Tensor], outputs: Tensor | Sequence[Tensor]) -> Tensor:
    """`fn(outputs)` for one output; for JPM's list `0.5 * fn(outputs[0]) + 0.5 * mean(fn(outputs[1:]))`.

    The global branch weighs as much as the four local branches together, as in the official make_loss.
    """
    if isinstance(outputs, Tensor):
        return fn(outputs)
    outputs = list(outputs)
    if len(outputs) == 1:
        return fn(outputs[0])
    local = sum(fn(o) for o in outputs[1:]) / (len(outputs) - 1)
    return 0.5 * local + 0.5 * fn(outputs[0])


def make_loss(cfg: Any, num_classes: int | None = None) -> LossFn:
    """Build `loss_fn(scores, features, targets)` from the config, as the official `make_loss`.

    DATALOADER.SAMPLER 'softmax': ID loss only, plain cross-entropy (the official code ignores
    IF_LABELSMOOTH there). A sampler containing 'triplet' with MODEL.METRIC_LOSS_TYPE 'triplet':
    `ID_LOSS_WEIGHT * ID + TRIPLET_LOSS_WEIGHT * TRI`, ID label-smoothed when MODEL.IF_LABELSMOOTH is
    'on', triplet with margin SOLVER.MARGIN or the soft margin when MODEL.NO_MARGIN. `num_classes` is
    accepted for signature parity with the official function; smoothing does not need it.
    """
    sampler = cfg.DATALOADER.SAMPLER
    if sampler == "softmax":
        ce = cross_entropy(False)

        def softmax_loss(scores, features, targets):  # noqa: ARG001 - features unused by design
            return jpm_weighted(lambda s: ce(s, targets), scores)

        return softmax_loss
    if "triplet" not in sampler:
        raise ValueError(f"unsupported DATALOADER.SAMPLER {sampler!r}: use 'softmax' or 'softmax_triplet'")
    if cfg.MODEL.METRIC_LOSS_TYPE != "triplet":
        raise ValueError(f"MODEL.METRIC_LOSS_TYPE {cfg.MODEL.METRIC_LOSS_TYPE!r} is not supported; use 'triplet'")
    if cfg.MODEL.IF_WITH_CENTER not in ("no", False):
        raise ValueError("center loss (MODEL.IF_WITH_CENTER) is not supported; set it to 'no'")
    ce = cross_entropy(str(cfg.MODEL.IF_LABELSMOOTH).lower() == "on")
    triplet = TripletLoss(None if cfg.MODEL.NO_MARGIN else float(cfg.SOLVER.MARGIN))
    id_w, tri_w = float(cfg.MODEL.ID_LOSS_WEIGHT), float(cfg.MODEL.TRIPLET_LOSS_WEIGHT)

    def loss_fn(scores, features, targets):
        id_loss = jpm_weighted(lambda s: ce(s, targets), scores)
        tri_loss = jpm_weighted(lambda f: triplet(f, targets)[0], features)
        return id_w * id_loss + tri_w * tri_loss

    return loss_fn
