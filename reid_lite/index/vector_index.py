"""The one faiss wrapper: exact search for evaluation, flat / IVF-PQ with float16 re-ranking for galleries.

    idx = VectorIndex.exact(dim)                  # evaluation: exact inner product (or metric="l2"), GPU when available
    idx.add(gallery_feats); scores, ids = idx.search(query_feats, k=10)
    idx = VectorIndex(dim, IndexParams(kind="auto"))  # a gallery's index: flat, then IVF-PQ past flat_max
    idx.write(path); VectorIndex.read(path, dim, params, vectors)

Every index is either `IndexIDMap2(IndexFlat*)` ("flat": exact, any ids) or `IndexIVFPQ` (inner product,
trained on a sample, ids kept by the inverted lists): the on-disk format of a gallery's `index.faiss`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["IndexParams", "StoredVectors", "VectorIndex", "VectorIndexError", "gpu_available"]

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


def gpu_available() -> bool:
    """True when the installed faiss has GPU support and sees at least one GPU."""
    try:
        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except (RuntimeError, AttributeError):  # a broken CUDA runtime must not break CPU search
        return False


@dataclass
class IndexParams:
    """Index choice and parameters, persisted in the manifest.

    kind: 'flat' (exact IndexFlatIP behind IndexIDMap2), 'ivfpq' (IndexIVFPQ, inner product, trained on
    a sample, then exact re-ranking of a shortlist from float16 copies), or 'auto': flat until the
    gallery holds more than `flat_max` crops, then converted to IVF-PQ at the next publish.
    nlist/m = 0: chosen from the data at training time (nlist ~ sqrt(N) as a power of two, m = D/8).
    A PostgreSQL gallery's kinds are 'hnsw' (pgvector's HNSW; `auto` means it) and 'flat' (exact); there `m` is
    HNSW's graph degree and `ef_construction`/`ef_search` its build and search breadths (0: pgvector's
    defaults, 16, 64 and 40).
    """

    kind: str = "auto"
    flat_max: int = 100_000
    nlist: int = 0
    m: int = 0
    nbits: int = 8
    nprobe: int = 0
    refine: int = 5  # shortlist = refine * k candidates re-ranked exactly (0 disables)
    train_size: int = 0  # 0: 64 per list (and >= 2**nbits * 64)
    use_gpu: bool | None = None
    ef_construction: int = 0
    ef_search: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict."""
        return dict(self.__dict__)


def _auto_nlist(n: int) -> int:
    return int(min(65536, max(16, 2 ** round(math.log2(max(1.0, math.sqrt(n)))))))


def _auto_m(dim: int) -> int:
    for m in range(max(1, dim // 8), 0, -1):
        if dim % m == 0:
            return m
    return 1


class StoredVectors(Protocol):
    """Exact copies of an IVF-PQ index's vectors, by id, for re-ranking its shortlist (a gallery keeps them in
    float16 segment files: `reid_lite.index.storage.VectorSegments`)."""

    ids: np.ndarray

    def get(self, ids: np.ndarray) -> np.ndarray:
        """float32 (len(ids), D) vectors of `ids` (all must be stored)."""


class VectorIndexError(ValueError):
    """A faiss index that cannot be read or cannot answer (no stored vectors to return)."""


class VectorIndex:
    """One faiss index (see the module docstring): a gallery generation's, or an evaluation's gallery features.

    Scores are inner products (cosine for L2-normalised features), best first; an exact index made with
    ``metric="l2"`` scores squared Euclidean distances instead, smallest first. Result slots without a
    hit hold id -1 (score -inf, +inf for l2).

    GPU: an exact search without an ``allowed`` filter runs on GPU 0 when faiss has GPU support and
    ``params.use_gpu`` is not False; otherwise, or when the copy to the GPU fails, on CPU, with a warning
    only when the GPU was asked for (``use_gpu=True``). IVF-PQ searches run on CPU (selectors, re-ranking).
    """

    def __init__(self, dim: int, params: IndexParams | None = None, index: faiss.Index | None = None,
                 vectors: StoredVectors | None = None) -> None:
        self.dim = int(dim)
        self.params = params if params is not None else IndexParams(kind="flat")
        self.index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        if int(self.index.d) != self.dim:
            raise ValueError(f"the faiss index has dimension {self.index.d}, expected {self.dim}")
        self.vectors = vectors
        self._gpu: faiss.Index | None = None
        self._gpu_ids: np.ndarray | None = None
        self._gpu_failed = False
        self._gpu_lock = threading.Lock()

    @classmethod
    def exact(cls, dim: int, metric: str = "ip", use_gpu: bool | None = None) -> VectorIndex:
        """An exact (flat) index: ``metric`` 'ip' (inner product) or 'l2' (squared Euclidean)."""
        if metric not in METRICS:
            raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
        flat = faiss.IndexFlatIP(dim) if metric == "ip" else faiss.IndexFlatL2(dim)
        return cls(dim, IndexParams(kind="flat", use_gpu=use_gpu), faiss.IndexIDMap2(flat))

    @classmethod
    def read(cls, path: str | Path, dim: int, params: IndexParams, vectors: StoredVectors | None = None
             ) -> VectorIndex:
        """Load an index written by `write`; VectorIndexError when it is unreadable or not `dim`-d."""
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise VectorIndexError(f"cannot read {path}: {exc}") from None
        if int(index.d) != dim:
            raise VectorIndexError(f"{path} holds {index.d}-d vectors, expected {dim}")
        return cls(dim, params, index, vectors)

    def write(self, path: str | Path) -> None:
        """Write the faiss index to `path` (faiss' own format; the float16 segments are written apart)."""
        faiss.write_index(self.index, str(path))

    @property
    def kind(self) -> str:
        """'flat' (exact) or 'ivfpq'."""
        return "flat" if isinstance(self.index, faiss.IndexIDMap2) else "ivfpq"

    @property
    def metric(self) -> str:
        """'ip' (inner product, higher is closer) or 'l2' (squared Euclidean, lower is closer)."""
        return "l2" if self.index.metric_type == faiss.METRIC_L2 else "ip"

    @property
    def ntotal(self) -> int:
        """Number of indexed vectors."""
        return int(self.index.ntotal)

    def clone(self) -> VectorIndex:
        """An independent copy (the float16 segments, immutable, are shared)."""
        return VectorIndex(self.dim, IndexParams(**self.params.to_dict()), faiss.clone_index(self.index), self.vectors)

    def _as_f32(self, x: Any) -> np.ndarray:
        if hasattr(x, "detach"):  # a torch tensor, on any device
            x = x.detach().cpu().numpy()
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected an (N, {self.dim}) array of vectors, got shape {x.shape}")
        return x

    # -- IVF-PQ -----------------------------------------------------------------------------------
    def _ivf(self) -> faiss.IndexIVFPQ:
        return faiss.extract_index_ivf(self.index)

    def _train_ivfpq(self, x: np.ndarray) -> faiss.Index:
        p = self.params
        n = x.shape[0]
        nlist = p.nlist or _auto_nlist(n)
        m = p.m or _auto_m(self.dim)
        if self.dim % m:
            raise ValueError(f"IVF-PQ: feature dim {self.dim} is not divisible by m={m}")
        need = max(nlist, 1 << p.nbits)
        if n < need:
            raise ValueError(f"IVF-PQ needs at least {need} crops to train (nlist={nlist}, nbits={p.nbits}); "
                             f"got {n}. Use index 'flat' or 'auto' for small galleries")
        quantizer = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFPQ(quantizer, self.dim, nlist, m, p.nbits, faiss.METRIC_INNER_PRODUCT)
        ivf.own_fields = True  # the index owns the quantizer: it survives serialisation and clone
        quantizer.this.disown()
        size = p.train_size or max(64 * nlist, 64 * (1 << p.nbits))
        rng = np.random.default_rng(0)
        sample = x if n <= size else x[np.sort(rng.choice(n, size, replace=False))]
        t0 = time.perf_counter()
        ivf.train(np.ascontiguousarray(sample, dtype=np.float32))
        logger.info("trained IVF%d,PQ%dx%d on %d vectors in %.1fs", nlist, m, p.nbits, len(sample),
                    time.perf_counter() - t0)
        ivf.nprobe = p.nprobe or max(8, nlist // 16)  # 64 of 1024 lists: recall@10 ~0.99 at 1M (bench)
        p.nlist, p.m, p.nprobe = nlist, m, int(ivf.nprobe)
        return ivf

    def _conversion_due(self, n_new: int) -> bool:
        """Whether adding `n_new` vectors must first switch this flat index to IVF-PQ (params.kind)."""
        want_ivf = self.params.kind == "ivfpq" or (
            self.params.kind == "auto" and self.ntotal + n_new > self.params.flat_max)
        return self.kind == "flat" and want_ivf and self.ntotal + n_new > 0

    def _convert(self, new_vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Train IVF-PQ on the stored and the new vectors and move the stored ones into it; returns the
        moved (ids, vectors)."""
        if self.metric != "ip":
            raise ValueError("IVF-PQ indexes inner products; a squared-Euclidean (l2) index stays exact (kind 'flat')")
        old_ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        old = self.index.index.reconstruct_n(0, self.ntotal) if self.ntotal else np.empty((0, self.dim), np.float32)
        ivf = self._train_ivfpq(np.concatenate([old, new_vectors]) if len(old) else new_vectors)
        if len(old_ids):
            ivf.add_with_ids(old, old_ids)
        self.index = ivf
        self._gpu = None
        return old_ids, old

    def prepare(self, new_vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Before `new_vectors` are added: switch to IVF-PQ if the params ask for it now. Returns the (ids,
        float32 vectors) moved over (empty when nothing was converted), for a caller that keeps exact copies."""
        if not self._conversion_due(len(new_vectors)):
            return np.empty(0, np.int64), np.empty((0, self.dim), np.float32)
        return self._convert(self._as_f32(new_vectors))

    # -- data -------------------------------------------------------------------------------------
    def add(self, x: Any, ids: np.ndarray | None = None) -> np.ndarray:
        """Append vectors (N, dim) (numpy or torch) under `ids` (default: ntotal, ntotal + 1, ..., the row
        numbers of an index without removals); returns the ids. An index whose params ask for IVF-PQ
        is trained on its first vectors (a gallery calls `prepare` first, to keep float16 copies)."""
        x = self._as_f32(x)
        ids = np.arange(self.ntotal, self.ntotal + len(x), dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
        if ids.shape != (len(x),):
            raise ValueError(f"{len(x)} vectors need {len(x)} ids, got shape {ids.shape}")
        if self._conversion_due(len(x)):
            self._convert(x)
        self.index.add_with_ids(x, ids)
        self._gpu = None
        return ids

    def remove(self, ids: np.ndarray) -> int:
        """Remove `ids`; returns how many were indexed."""
        if not len(ids):
            return 0
        self._gpu = None
        return int(self.index.remove_ids(faiss.IDSelectorBatch(np.asarray(ids, np.int64))))

    def stored_vectors(self, ids: np.ndarray) -> np.ndarray:
        """float32 (len(ids), D) vectors of stored `ids`: exact for a flat index, the float16 re-ranking
        copies for IVF-PQ (its codes are lossy). Every id must be stored (check with the metadata first)."""
        ids = np.asarray(ids, np.int64)
        if self.kind == "flat":
            return self.index.reconstruct_batch(ids).astype(np.float32, copy=False)
        if self.vectors is None:
            raise VectorIndexError("this IVF-PQ index keeps no exact copies of its vectors (StoredVectors)")
        return self.vectors.get(ids)

    def _gpu_flat(self) -> faiss.Index | None:
        """The flat index's vectors on GPU 0 (ids mapped back on the host), or None to search on CPU."""
        asked = self.params.use_gpu
        if asked is False or self._gpu_failed:
            return None
        if not gpu_available():
            if asked:
                warnings.warn("GPU faiss requested but unavailable; searching on CPU", stacklevel=3)
                self._gpu_failed = True
            return None
        with self._gpu_lock:  # concurrent searches (the server) build one GPU copy, not several
            return self._gpu if self._gpu is not None else self._copy_to_gpu()

    def _copy_to_gpu(self) -> faiss.Index | None:
        try:
            self._gpu_res = faiss.StandardGpuResources()
            # The inner flat index goes to the GPU (IndexIDMap2 has no GPU version); ids map back here.
            self._gpu_ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
            self._gpu = faiss.index_cpu_to_gpu(self._gpu_res, 0, self.index.index)
        except (RuntimeError, AttributeError, MemoryError) as exc:
            warnings.warn(f"could not move the faiss index to GPU ({exc}); searching on CPU", stacklevel=4)
            self._gpu, self._gpu_failed = None, True
        return self._gpu

    def search(self, q: Any, k: int, allowed: np.ndarray | None = None, nprobe: int | None = None,
               refine: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (Q, k), best first; -1 ids pad. `allowed`: sorted ids a result may have (None: all).

        Filters go into faiss as an IDSelectorBitmap, so an exact (flat) search returns k results
        whenever k allowed vectors exist. IVF-PQ additionally widens nprobe (doubling up to nlist, i.e. an
        exhaustive scan) until k allowed results come back or none are left, so it also never returns
        fewer than k when k exist; its shortlist of ``refine * k`` is re-ranked exactly from the float16
        copies when the index has them.
        """
        q = self._as_f32(q)
        n_valid = self.ntotal if allowed is None else len(allowed)
        k_eff = min(k, n_valid)
        scores = np.full((len(q), k), np.inf if self.metric == "l2" else -np.inf, np.float32)
        ids = np.full((len(q), k), -1, np.int64)
        if k_eff <= 0 or not len(q):
            return scores, ids
        sel = bitmap = None
        if allowed is not None:
            nbits = int(allowed.max()) + 1 if len(allowed) else 1
            bits = np.zeros(((nbits + 7) // 8) * 8, dtype=bool)
            bits[allowed] = True
            bitmap = np.packbits(bits, bitorder="little")  # faiss: bit (id & 7) of byte id >> 3
            sel = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
        if self.kind == "flat":
            gpu = self._gpu_flat() if sel is None else None  # selectors: CPU (GPU support varies)
            if gpu is not None:
                s, rows = gpu.search(q, k_eff)
                i = np.where(rows >= 0, self._gpu_ids[np.maximum(rows, 0)], -1)
            elif sel is None:
                s, i = self.index.search(q, k_eff)
            else:
                s, i = self.index.search(q, k_eff, params=faiss.SearchParameters(sel=sel))
            scores[:, :k_eff], ids[:, :k_eff] = s, i
            del bitmap
            return scores, ids
        ivf = self._ivf()
        probe = int(nprobe or self.params.nprobe or ivf.nprobe)
        refine = self.params.refine if refine is None else refine
        shortlist = min(max(k_eff, k_eff * refine), n_valid) if refine else k_eff
        todo = np.arange(len(q))
        while len(todo):
            params = faiss.SearchParametersIVF(sel=sel, nprobe=min(probe, ivf.nlist))
            s, i = ivf.search(q[todo], shortlist, params=params)
            if refine and self.vectors is not None:
                s, i = self._rerank(q[todo], i, k_eff)
            s, i = s[:, :k_eff], i[:, :k_eff]
            scores[todo, :k_eff], ids[todo, :k_eff] = s, i
            short = (i < 0).any(axis=1)
            if not short.any() or probe >= ivf.nlist:
                break
            todo, probe = todo[short], probe * 2
        del bitmap
        return scores, ids

    def _rerank(self, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner products of each query with its shortlist (float16 copies), top k."""
        valid = cand >= 0
        flat = np.unique(cand[valid])
        vecs = self.vectors.get(flat)
        pos = np.searchsorted(flat, np.where(valid, cand, flat[0] if len(flat) else 0))
        s = np.einsum("qd,qkd->qk", q, vecs[pos]) if len(flat) else np.zeros(cand.shape, np.float32)
        s = np.where(valid, s, -np.inf).astype(np.float32)
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(s, order, 1), np.where(np.take_along_axis(valid, order, 1),
                                                         np.take_along_axis(cand, order, 1), -1)
