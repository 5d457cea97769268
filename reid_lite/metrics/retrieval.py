"""Chunked retrieval evaluation (Rank-k, mAP, mINP, CMC) that never forms the Q x G distance matrix."""

from __future__ import annotations

import numpy as np
import torch

from reid_lite.metrics.distance import Metric, as_float_tensor, l2_normalize, pairwise_distance
from reid_lite.metrics.rank import RankAccumulator

__all__ = ["evaluate_retrieval"]


def evaluate_retrieval(
    query_feats: np.ndarray | torch.Tensor,
    gallery_feats: np.ndarray | torch.Tensor,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    query_chunk: int = 1024,
    max_rank: int = 50,
    metric: Metric = "cosine",
) -> dict[str, float | np.ndarray]:
    """Market-1501 evaluation (rank-1/5/10, mAP, mINP, CMC) without ever forming the Q x G matrix.

    Queries are processed ``query_chunk`` at a time: the dense (chunk, G) distance block is computed with
    one torch matmul, ranked and folded into a `reid_lite.metrics.RankAccumulator`. The
    result equals a one-shot evaluation of the full matrix (row results do not depend on the chunking).

    Peak memory ~ features + ``query_chunk * G * 4`` bytes (distances) + the accumulator's bounded
    sorting blocks; for ``metric="cosine"`` a normalised float32 copy of the gallery is made.

    Args:
        metric: ``"cosine"`` (1 - cosine similarity of L2-normalised features, torchreid's
            ``cosine_distance``) or ``"euclidean"`` (squared Euclidean, TransReID's ``euclidean_distance``,
            on the features as given, normalised or not).

    Returns:
        dict with ``rank1``, ``rank5``, ``rank10``, ``mAP``, ``mINP`` (floats in [0, 1]) and ``cmc``
            (float32 array of length ``min(max_rank, G)``).
    """
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"unknown metric {metric!r}; use 'cosine' or 'euclidean'")
    q_pids, q_camids = np.asarray(q_pids).ravel(), np.asarray(q_camids).ravel()
    q = as_float_tensor(query_feats)
    g = as_float_tensor(gallery_feats)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError("query_feats and gallery_feats must be (Q, D) and (G, D) with the same D")
    if q.shape[0] != q_pids.shape[0] or q.shape[0] != q_camids.shape[0]:
        raise ValueError("q_pids / q_camids must have one entry per query")
    g_sqnorm = None
    if metric == "cosine":
        g = l2_normalize(g)
    else:
        g_sqnorm = g.pow(2).sum(dim=1)
    acc = RankAccumulator(g_pids, g_camids, max_rank=max_rank)
    if acc.num_gallery != g.shape[0]:
        raise ValueError("g_pids / g_camids must have one entry per gallery sample")
    with torch.inference_mode():
        for s in range(0, q.shape[0], query_chunk):
            e = min(s + query_chunk, q.shape[0])
            qc = l2_normalize(q[s:e]) if metric == "cosine" else q[s:e]
            dist = pairwise_distance(qc, g, metric, g_sqnorm=g_sqnorm).numpy()
            acc.update(dist, q_pids[s:e], q_camids[s:e])
            del dist
    res = acc.result()
    cmc = res.cmc

    def at(r: int) -> float:
        return float(cmc[min(r, cmc.shape[0]) - 1])

    return {"rank1": at(1), "rank5": at(5), "rank10": at(10), "mAP": res.mAP, "mINP": res.mINP, "cmc": cmc}
