"""Ranking metrics (CMC / mAP / mINP), chunked retrieval evaluation, distances and k-reciprocal re-ranking."""

from reid_lite.metrics.distance import l2_normalize, pairwise_distance
from reid_lite.metrics.rank import RankAccumulator, RankResult, evaluate_rank
from reid_lite.metrics.rerank import re_ranking
from reid_lite.metrics.retrieval import evaluate_retrieval

__all__ = [
    "RankAccumulator",
    "RankResult",
    "evaluate_rank",
    "evaluate_retrieval",
    "l2_normalize",
    "pairwise_distance",
    "re_ranking",
]
