"""The faiss index of one gallery generation: exact flat or IVF-PQ with float16 re-ranking, exact filters."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from .search import gpu_available
from .storage import GalleryCorrupt, write_segment

logger = logging.getLogger(__name__)

__all__ = ["IndexParams", "VectorIndex", "VectorSegments"]


@dataclass
class IndexParams:
    """Index choice and parameters, persisted in the manifest.

    kind: 'flat' (exact IndexFlatIP behind IndexIDMap2), 'ivfpq' (IndexIVFPQ, inner product, trained on
    a sample, then exact re-ranking of a shortlist from float16 copies), or 'auto': flat until the
    gallery holds more than `flat_max` crops, then converted to IVF-PQ at the next publish.
    nlist/m = 0: chosen from the data at training time (nlist ~ sqrt(N) as a power of two, m = D/8).
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



class VectorSegments:
    """float16 copies of IVF-PQ vectors in immutable segment files, for exact re-ranking."""

    def __init__(self, root: Path, names: Sequence[str]) -> None:
        self.root = root
        self.names = list(names)
        self._ids = [np.load(root / f"{n}.ids.npy") for n in self.names]
        self._vecs = [np.load(root / f"{n}.f16.npy", mmap_mode="r") for n in self.names]
        self.ids = np.concatenate(self._ids) if self._ids else np.empty(0, np.int64)
        self._cum = np.cumsum([0] + [len(i) for i in self._ids])
        if self.ids.size and np.any(np.diff(self.ids) <= 0):
            raise GalleryCorrupt(f"vector segments in {root} are not in increasing id order")

    def get(self, ids: np.ndarray) -> np.ndarray:
        """float32 (len(ids), D) vectors of `ids` (all must be stored)."""
        rows = np.searchsorted(self.ids, ids)
        if rows.size and (rows.max() >= self.ids.size or np.any(self.ids[rows] != ids)):
            raise GalleryCorrupt("an indexed id has no stored vector in the segments")
        seg = np.searchsorted(self._cum, rows, side="right") - 1
        out = np.empty((len(ids), self._vecs[0].shape[1] if self._vecs else 0), np.float32)
        for s in np.unique(seg):
            sel = seg == s
            local = rows[sel] - self._cum[s]
            order = np.argsort(local)  # sorted reads are kinder to the page cache of a memmap
            out[np.flatnonzero(sel)[order]] = self._vecs[s][local[order]]
        return out



class VectorIndex:
    """The faiss index of one generation plus what IVF-PQ needs (params, float16 vectors)."""

    def __init__(self, dim: int, params: IndexParams, index: faiss.Index | None = None,
                 vectors: VectorSegments | None = None) -> None:
        self.dim = dim
        self.params = params
        self.index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self.vectors = vectors
        self._gpu = None

    @property
    def kind(self) -> str:
        return "flat" if isinstance(self.index, faiss.IndexIDMap2) else "ivfpq"

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def clone(self) -> VectorIndex:
        return VectorIndex(self.dim, IndexParams(**self.params.to_dict()), faiss.clone_index(self.index), self.vectors)

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

    def prepare(self, new_vectors: np.ndarray, seg_root: Path, seg_name: str) -> tuple[list[str], list[dict]]:
        """Before adding `new_vectors`: switch to IVF-PQ if the params ask for it now. Returns the
        segments (names, manifest entries) that must exist after the conversion."""
        want_ivf = self.params.kind == "ivfpq" or (
            self.params.kind == "auto" and self.ntotal + len(new_vectors) > self.params.flat_max)
        if self.kind == "ivfpq" or not want_ivf or self.ntotal + len(new_vectors) == 0:
            return [], []
        old_ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        old = self.index.index.reconstruct_n(0, self.ntotal) if self.ntotal else np.empty((0, self.dim), np.float32)
        ivf = self._train_ivfpq(np.concatenate([old, new_vectors]) if len(old) else new_vectors)
        if len(old_ids):
            ivf.add_with_ids(old, old_ids)
        self.index = ivf
        if not len(old_ids):
            return [], []
        name = f"{seg_name}-conv"
        entries = write_segment(seg_root, name, old_ids, old)
        return [name], entries

    # -- data -------------------------------------------------------------------------------------
    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        self.index.add_with_ids(np.ascontiguousarray(x, dtype=np.float32), ids.astype(np.int64))

    def remove(self, ids: np.ndarray) -> int:
        if not len(ids):
            return 0
        return int(self.index.remove_ids(faiss.IDSelectorBatch(ids.astype(np.int64))))

    def _maybe_gpu(self) -> faiss.Index | None:
        if self.params.use_gpu is False or not gpu_available():
            return None
        if self._gpu is None:
            try:
                self._gpu_res = faiss.StandardGpuResources()
                self._gpu = faiss.index_cpu_to_gpu(self._gpu_res, 0, self.index)
            except (RuntimeError, AttributeError) as exc:  # e.g. an IDMap2 or PQ size the GPU lacks
                logger.warning("GPU faiss unavailable for this index (%s); searching on CPU", exc)
                self.params.use_gpu = False
                return None
        return self._gpu

    def search(self, q: np.ndarray, k: int, allowed: np.ndarray | None, nprobe: int | None = None,
               refine: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) (Q, k), -1 ids pad. `allowed`: sorted ids a result may have (None: all).

        Filters go into faiss as an IDSelectorBitmap, so an exact (flat) search returns k results
        whenever k allowed crops exist. IVF-PQ additionally widens nprobe (doubling up to nlist, i.e. an
        exhaustive scan) until k allowed results come back or none are left, so it also never returns
        fewer than k when k exist.
        """
        q = np.ascontiguousarray(q, dtype=np.float32)
        n_valid = self.ntotal if allowed is None else len(allowed)
        k_eff = min(k, n_valid)
        scores = np.full((len(q), k), -np.inf, np.float32)
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
            gpu = self._maybe_gpu() if sel is None else None  # selectors: CPU (GPU support varies)
            if gpu is not None:
                s, i = gpu.search(q, k_eff)
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
