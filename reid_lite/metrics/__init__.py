"""Ranking metrics (CMC / mAP / mINP), distances and k-reciprocal re-ranking."""

from reid_lite.metrics.distance import l2_normalize, pairwise_distance
from reid_lite.metrics.rank import RankAccumulator, RankResult, evaluate_rank
from reid_lite.metrics.rerank import re_ranking

__all__ = [
    "RankAccumulator",
    "RankResult",
    "evaluate_rank",
    "l2_normalize",
    "pairwise_distance",
    "re_ranking",
]
