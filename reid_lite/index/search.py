"""Nearest-neighbour search over L2-normalised features (faiss) and chunked retrieval evaluation."""

from __future__ import annotations

import warnings
from typing import Literal

import faiss
import numpy as np
import torch

from reid_lite.metrics.distance import Metric, as_float_tensor, l2_normalize, pairwise_distance
from reid_lite.metrics.rank import RankAccumulator

__all__ = ["FeatureIndex", "evaluate_retrieval", "gpu_available"]

IndexType = Literal["flat", "ivfpq"]


def gpu_available() -> bool:
    """True when the installed faiss has GPU support and sees at least one GPU."""
    try:
        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except (RuntimeError, AttributeError):  # a broken CUDA runtime must not break CPU search
        return False


def _as_f32(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D (N, D) array, got shape {x.shape}")
    return x


class FeatureIndex:
    """faiss index over float32 L2-normalised features; scores are inner products (= cosine).

    * ``index_type="flat"`` (default): exact ``IndexFlatIP``.
    * ``index_type="ivfpq"``: ``IndexIVFPQ`` (inner-product metric) with ``nlist`` inverted lists and
      ``m`` sub-quantizers of ``nbits`` bits; trained on a random sample of ``train_size`` vectors of the
      first :meth:`add` call (or an explicit :meth:`train`); ``nprobe`` lists are visited per query.

    GPU: with ``use_gpu=None`` (auto) or ``True`` the index is moved to GPU ``gpu_device`` when faiss has
    GPU support and ``faiss.get_num_gpus() > 0``; otherwise, or if the GPU clone fails (e.g. an IVF-PQ
    sub-quantizer size the GPU kernels do not support), it stays on CPU with a warning, never an error.

    Features are expected to be L2-normalised already; pass ``normalize=True`` to normalise on the fly.
    """

    def __init__(
        self,
        dim: int,
        index_type: IndexType = "flat",
        *,
        nlist: int = 1024,
        m: int = 64,
        nbits: int = 8,
        nprobe: int = 16,
        train_size: int | None = None,
        use_gpu: bool | None = None,
        gpu_device: int = 0,
        normalize: bool = False,
        seed: int = 0,
    ) -> None:
        if index_type not in ("flat", "ivfpq"):
            raise ValueError(f"index_type must be 'flat' or 'ivfpq', got {index_type!r}")
        if index_type == "ivfpq" and dim % m != 0:
            raise ValueError(f"dim ({dim}) must be divisible by m ({m}) for IVF-PQ")
        self.dim = int(dim)
        self.index_type = index_type
        self.nlist, self.m, self.nbits, self.nprobe = int(nlist), int(m), int(nbits), int(nprobe)
        # faiss' k-means wants 39..256 points per centroid; PQ wants >= 2**nbits points per sub-codebook.
        self.train_size = train_size or max(64 * self.nlist, 64 * (1 << self.nbits))
        self.normalize = normalize
        self.seed = seed
        self._gpu_res = None
        self.on_gpu = False
        cpu_index = self._build_cpu_index()
        self.index = self._maybe_to_gpu(cpu_index, use_gpu, gpu_device)
        self._set_nprobe()

    # ------------------------------------------------------------------ construction
    def _build_cpu_index(self) -> faiss.Index:
        if self.index_type == "flat":
            return faiss.IndexFlatIP(self.dim)
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFPQ(quantizer, self.dim, self.nlist, self.m, self.nbits,
                                 faiss.METRIC_INNER_PRODUCT)
        self._quantizer = quantizer  # the IVF index does not own it from Python: keep it alive
        return index

    def _maybe_to_gpu(self, index: faiss.Index, use_gpu: bool | None, device: int) -> faiss.Index:
        if use_gpu is False:
            return index
        if not gpu_available():
            if use_gpu:
                warnings.warn("GPU faiss requested but unavailable; using CPU faiss", stacklevel=3)
            return index
        try:
            self._gpu_res = faiss.StandardGpuResources()
            gpu_index = faiss.index_cpu_to_gpu(self._gpu_res, device, index)
        except (RuntimeError, AttributeError, MemoryError) as exc:  # unsupported on GPU: fall back
            warnings.warn(f"could not move the faiss index to GPU ({exc}); using CPU", stacklevel=3)
            self._gpu_res = None
            return index
        self.on_gpu = True
        return gpu_index

    def _set_nprobe(self) -> None:
        if self.index_type == "ivfpq":
            if self.on_gpu:
                self.index.nprobe = self.nprobe
            else:
                faiss.extract_index_ivf(self.index).nprobe = self.nprobe

    # ------------------------------------------------------------------ data
    @property
    def ntotal(self) -> int:
        """Number of indexed vectors."""
        return int(self.index.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    def _prep(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        x = _as_f32(x)
        if x.shape[1] != self.dim:
            raise ValueError(f"expected dimension {self.dim}, got {x.shape[1]}")
        if self.normalize:
            x = l2_normalize(x).numpy()
        return x

    def train(self, feats: np.ndarray | torch.Tensor) -> None:
        """Trains the IVF-PQ coarse quantizer and codebooks on (a random sample of) ``feats``."""
        if self.index_type == "flat":
            return
        x = self._prep(feats)
        need = max(self.nlist, 1 << self.nbits)
        if x.shape[0] < need:
            raise ValueError(f"IVF-PQ training needs >= {need} vectors (nlist={self.nlist}, "
                             f"nbits={self.nbits}), got {x.shape[0]}")
        if x.shape[0] > self.train_size:
            rng = np.random.default_rng(self.seed)
            x = x[np.sort(rng.choice(x.shape[0], self.train_size, replace=False))]
        self.index.train(x)

    def add(self, feats: np.ndarray | torch.Tensor) -> None:
        """Appends ``feats`` (ids continue from :attr:`ntotal`); trains IVF-PQ first if needed."""
        x = self._prep(feats)
        if not self.index.is_trained:
            self.train(x)
        self.index.add(x)

    def reset(self) -> None:
        """Removes all vectors (a trained IVF-PQ keeps its codebooks)."""
        self.index.reset()

    def search(
        self, queries: np.ndarray | torch.Tensor, k: int, chunk: int = 4096
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` inner-product search, ``chunk`` queries at a time.

        Returns:
            ``(scores, indices)``: (Q, k) float32 scores (descending) and int64 gallery ids. ``k`` is
            clamped to :attr:`ntotal`; IVF-PQ may return fewer than ``k`` hits when the probed lists
            are small, those slots hold id -1 (faiss convention).
        """
        q = self._prep(queries)
        if self.ntotal == 0:
            raise ValueError("the index is empty; add() features first")
        k = int(min(k, self.ntotal))
        if k < 1:
            raise ValueError("k must be >= 1")
        scores = np.empty((q.shape[0], k), dtype=np.float32)
        ids = np.empty((q.shape[0], k), dtype=np.int64)
        for s in range(0, q.shape[0], chunk):
            e = min(s + chunk, q.shape[0])
            scores[s:e], ids[s:e] = self.index.search(q[s:e], k)
        return scores, ids


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
    one torch matmul, ranked and folded into a :class:`~reid_lite.metrics.rank.RankAccumulator`. The
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
