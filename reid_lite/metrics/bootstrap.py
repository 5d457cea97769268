"""Confidence intervals for retrieval metrics: a bootstrap over queries, paired across methods.

    per_q = per_query_metrics(q_feats, g_feats, q_pids, g_pids, q_camids, g_camids)   # one method
    draws = bootstrap_draws(num_queries, resamples=1000, seed=0)                       # shared by all methods
    summary = metric_intervals(per_q, draws)           # {'rank1': .., 'rank1_ci95': [lo, hi], 'mAP': .., ...}
    diff = paired_difference(per_q_stm, per_q_tome, draws)   # STM - ToMe with its interval

Queries are the unit that varies: a test split of a few hundred queries measures Rank-1 to a few points.
Every method is resampled with the same draws, so a paired difference keeps what the methods share (the
same hard queries) out of its interval: two methods 1 point apart can differ significantly when they
fail on the same queries. Intervals are percentile intervals (2.5th and 97.5th of the resampled means).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .distance import pairwise_distance
from .rank import RankAccumulator

__all__ = ["METRICS", "bootstrap_draws", "metric_intervals", "paired_difference", "per_query_metrics"]

#: The per-query quantities whose means are the reported metrics.
METRICS = ("rank1", "mAP", "mINP")


def per_query_metrics(q_feats: Any, g_feats: Any, q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any,
                      metric: str = "euclidean") -> dict[str, np.ndarray]:
    """Per valid query (Market-1501 protocol, junk removed): 'rank1' (0/1), 'mAP' (its AP), 'mINP' (its INP).

    Distances as `pairwise_distance(metric)`; the means equal `evaluate_rank`'s Rank-1, mAP and mINP."""
    q, g = (torch.as_tensor(np.asarray(f), dtype=torch.float32) for f in (q_feats, g_feats))
    dist = pairwise_distance(q, g, metric=metric).numpy()
    acc = RankAccumulator(np.asarray(g_pids), np.asarray(g_camids), max_rank=1)
    acc.update(dist, np.asarray(q_pids), np.asarray(q_camids))
    per_q = acc.per_query()
    return {"rank1": (per_q["first_hit"] == 0).astype(np.float64), "mAP": per_q["ap"], "mINP": per_q["inp"]}


def bootstrap_draws(num_queries: int, resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """(resamples, num_queries) query indices drawn with replacement: reuse them for every method compared."""
    if num_queries < 1 or resamples < 1:
        raise ValueError(f"a bootstrap needs queries and resamples, got {num_queries} and {resamples}")
    return np.random.default_rng(seed).integers(0, num_queries, size=(resamples, num_queries))


def _interval(samples: np.ndarray) -> list[float]:
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return [float(lo), float(hi)]


def metric_intervals(per_query: dict[str, np.ndarray], draws: np.ndarray) -> dict[str, Any]:
    """Each metric's mean and 95% interval: {'rank1': m, 'rank1_ci95': [lo, hi], 'mAP': .., ...}."""
    out: dict[str, Any] = {}
    for key in METRICS:
        values = per_query[key]
        if draws.shape[1] != len(values):
            raise ValueError(f"draws are for {draws.shape[1]} queries, the method has {len(values)} valid ones")
        out[key] = float(values.mean())
        out[f"{key}_ci95"] = _interval(values[draws].mean(axis=1))
    return out


def paired_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray], draws: np.ndarray) -> dict[str, Any]:
    """`a - b` per metric with its 95% interval over the same resampled queries, and whether the interval
    excludes 0 ('significant'): {'rank1': {'diff': d, 'ci95': [lo, hi], 'significant': bool}, ...}."""
    out: dict[str, Any] = {}
    for key in METRICS:
        if len(a[key]) != len(b[key]):
            raise ValueError(f"paired methods must share their queries: {len(a[key])} vs {len(b[key])}")
        delta = a[key] - b[key]
        lo, hi = _interval(delta[draws].mean(axis=1))
        out[key] = {"diff": float(delta.mean()), "ci95": [lo, hi], "significant": bool(lo > 0 or hi < 0)}
    return out
