"""Ranking metrics (CMC / mAP / mINP), chunked retrieval evaluation, distances, k-reciprocal re-ranking and
bootstrap confidence intervals over queries."""

from reid_lite.metrics.bootstrap import bootstrap_draws, metric_intervals, paired_difference, per_query_metrics
from reid_lite.metrics.distance import l2_normalize, pairwise_distance
from reid_lite.metrics.rank import RankAccumulator, RankResult, evaluate_rank
from reid_lite.metrics.rerank import re_ranking
from reid_lite.metrics.retrieval import evaluate_retrieval

__all__ = [
    "RankAccumulator",
    "RankResult",
    "bootstrap_draws",
    "evaluate_rank",
    "evaluate_retrieval",
    "l2_normalize",
    "metric_intervals",
    "paired_difference",
    "per_query_metrics",
    "pairwise_distance",
    "re_ranking",
]
