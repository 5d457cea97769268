"""A persisted, incremental, crash-safe gallery of person crops: faiss index + SQLite metadata.

    g = Gallery.create("/data/gallery", cfg)                 # empty gallery bound to one model
    g.add(["/data/crops/cam1", "/data/crops/cam2"])          # embed, dedupe, publish a generation
    hits = g.search(["query.jpg"], k=10, exclude_same_camera=True)
    g.remove(cameras=[3]); g.info()
    g = Gallery.open("/data/gallery")                        # verifies checksums before use

On-disk layout (see docs/gallery.md)::

    <gallery>/CURRENT                 "gen-000012 <sha256 of its manifest.json>"  (swapped with os.replace)
    <gallery>/LOCK                    fcntl.flock target serialising writers (holds the writer's pid)
    <gallery>/gen-000012/index.faiss  faiss index (IndexIDMap2(IndexFlatIP) or IndexIVFPQ), ids = SQLite ids
    <gallery>/gen-000012/meta.sqlite  crops table + meta (fingerprint, config, next_id)
    <gallery>/gen-000012/manifest.json  sha256 + size of every file of the generation, index params
    <gallery>/segments/seg-*.npy      immutable float16 vectors (+ ids) for IVF-PQ re-ranking, shared
                                      between generations (append-only, so an add writes only new rows)

Writers (create/add/remove) hold the lock for the whole operation, build the next generation in a
hidden temporary directory, fsync it, rename it into place and only then atomically replace
CURRENT. A reader follows CURRENT once, at open, so it always sees one complete generation; a writer
killed at any point leaves CURRENT on the previous, intact generation, and the debris is removed by
the next writer.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from .search import gpu_available
from .store import CropRecord, MetadataStore

logger = logging.getLogger(__name__)

__all__ = [
    "AddReport",
    "FingerprintMismatch",
    "Gallery",
    "GalleryCorrupt",
    "GalleryError",
    "GalleryLocked",
    "IndexParams",
    "SearchHit",
    "collect_crops",
    "model_fingerprint",
    "sha256_file",
]

FORMAT = "reid-gallery/1"
CURRENT = "CURRENT"
LOCK = "LOCK"
SEGMENTS = "segments"
KEEP_GENERATIONS = 2  # the current one and its predecessor (a reader that just followed CURRENT keeps working)
#: Test-only hook: "batch=SECONDS,publish=SECONDS" sleeps after every embedded batch / right before
#: CURRENT is swapped, so that tests can kill a writer deterministically mid-run. Never set it otherwise.
TEST_SLEEP_ENV = "REID_LITE_GALLERY_TEST_SLEEP"
_GEN_RE = re.compile(r"^gen-(\d{6,})$")


# ============================================================================ errors


class GalleryError(RuntimeError):
    """Base class of gallery errors."""


class GalleryCorrupt(GalleryError):
    """A gallery file is missing, truncated or does not match its manifest checksum."""


class GalleryLocked(GalleryError):
    """Another writer holds the gallery lock (raised only when waiting is disabled or times out)."""


class FingerprintMismatch(GalleryError):
    """Features (or a model) from another model than the gallery's were offered."""


# ============================================================================ small helpers


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    # A rename/create is durable only once its directory entry is; fsync the directory too.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _test_sleep(stage: str) -> None:
    spec = os.environ.get(TEST_SLEEP_ENV, "")
    for part in spec.split(","):
        name, _, seconds = part.partition("=")
        if name.strip() == stage and seconds:
            time.sleep(float(seconds))


def _to_seconds(value: float | int | str | None) -> float | None:
    """Timestamps: numbers as given (epoch or frame clock); ISO 8601 strings -> epoch seconds (naive = UTC)."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except ValueError:
        pass
    try:
        t = _dt.datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"timestamp {value!r} is neither a number nor ISO 8601") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    return t.timestamp()


# ============================================================================ model fingerprint


def _weights_id(cfg: Any) -> str:
    """sha256 of the checkpoint the model's weights come from, or 'random-init' with the seed."""
    seed = int(cfg.SOLVER.SEED)
    if cfg.TEST.WEIGHT:
        return "sha256:" + sha256_file(cfg.TEST.WEIGHT)
    choice = str(cfg.MODEL.PRETRAIN_CHOICE).lower()
    if choice == "self" and cfg.MODEL.PRETRAIN_PATH:
        return "sha256:" + sha256_file(cfg.MODEL.PRETRAIN_PATH)
    if choice == "imagenet" and cfg.MODEL.PRETRAIN_PATH:
        # The heads (b1/b2 copies aside) stay randomly initialised: the seed is part of the identity.
        return f"imagenet-sha256:{sha256_file(cfg.MODEL.PRETRAIN_PATH)}+seed={seed}"
    return f"random-init:seed={seed}"


def model_fingerprint(cfg: Any, model: torch.nn.Module, feature: str, camera_num: int) -> dict[str, Any]:
    """Everything that changes a stored feature: architecture, weights, merging, feature and input.

    Two fingerprints are equal iff features from the two models are comparable. Compared as
    canonical JSON; :func:`fingerprint_digest` is its sha256.
    """
    deployed = getattr(model, "deployed_fingerprint", None)
    if deployed is not None:  # an exported model (reid_lite.deploy): its file's fingerprint, backend and digest
        return deployed(cfg, feature)
    base = model.base
    blocks = list(base.blocks)
    merge = cfg.MERGE
    method = str(merge.METHOD).lower()
    merging: dict[str, Any] = {"method": method}
    if method != "none":
        merging.update(r=int(merge.R), r_list=list(merge.R_LIST), layers=list(merge.LAYERS),
                       target_gflops=float(merge.TARGET_GFLOPS), prop_attn=bool(merge.PROP_ATTN),
                       r_solved=getattr(model, "merge_r", None))
        if method == "stm":
            merging["stm"] = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in merge.STM.items()}
        if method == "evit":
            merging["evit"] = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in merge.EVIT.items()}
    in_dim = int(model.in_planes)
    return {
        "architecture": {
            "transformer_type": cfg.MODEL.TRANSFORMER_TYPE, "embed_dim": in_dim, "depth": len(blocks),
            "num_heads": int(blocks[0].attn.num_heads), "stride": list(cfg.MODEL.STRIDE_SIZE),
            "jpm": bool(cfg.MODEL.JPM), "sie_camera": bool(cfg.MODEL.SIE_CAMERA), "sie_coe": float(cfg.MODEL.SIE_COE),
            "camera_num": int(camera_num) if cfg.MODEL.SIE_CAMERA else 0, "neck_feat": cfg.TEST.NECK_FEAT,
        },
        "weights": _weights_id(cfg),
        "merging": merging,
        "feature": {"kind": feature, "dim": in_dim if feature == "global" else int(model.feature_dim),
                    "normalisation": "l2", "flip": bool(cfg.TEST.FLIP)},
        "input": {"size": list(cfg.INPUT.SIZE_TEST), "pixel_mean": list(cfg.INPUT.PIXEL_MEAN),
                  "pixel_std": list(cfg.INPUT.PIXEL_STD)},
    }


def fingerprint_digest(fp: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a fingerprint."""
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()


def _fingerprint_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _fingerprint_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: gallery {va!r} != query {vb!r}")
    return out


def check_fingerprint(gallery_fp: dict[str, Any], other_fp: dict[str, Any]) -> None:
    """Raise :class:`FingerprintMismatch` listing the differing fields when the fingerprints differ."""
    diff = _fingerprint_diff(gallery_fp, other_fp)
    if diff:
        raise FingerprintMismatch(
            "refused: the query model differs from the model this gallery was built with, so its features "
            "are not comparable (" + "; ".join(diff) + "). Search with the gallery's own model "
            "(omit --config/--weights) or build a new gallery.")


# ============================================================================ crop listing


def collect_crops(inputs: Sequence[str | os.PathLike], pattern: str | None = None,
                  sidecar: str | os.PathLike | None = None, recursive: bool = True,
                  cam_base: int | None = None) -> list[CropRecord]:
    """List crops (no hashes yet) from folders and/or image files, with camera, timestamp and identity.

    Parsing is the data package's `FolderDataset` (file-name `pattern` with groups `camid`, optional
    `pid`, or a CSV/JSON `sidecar` with path, camid, pid, timestamp), so its validation and messages
    apply. A `pattern` may also carry a named group `timestamp`. Loose image files are parsed by the
    same class over a temporary folder of symlinks (it only reads folders). Sorted by path, so the
    order, and with it the ids, is deterministic.
    """
    from ..data.datasets import IMG_EXTENSIONS, FolderDataset, _parse_timestamp

    regex = re.compile(pattern or FolderDataset.DEFAULT_PATTERN)
    folders = [Path(p) for p in inputs if Path(p).is_dir()]
    files = [Path(p) for p in inputs if not Path(p).is_dir()]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"no such image file or folder: {missing[:5]}")
    if sidecar is not None and (len(folders) != 1 or files):
        raise ValueError("a sidecar file describes one folder: pass exactly one folder with --sidecar")
    raw: list[tuple[str, int, int, float | str | None]] = []

    def take(ds: FolderDataset, rename: dict[str, str] | None = None) -> None:
        for path, pid, camid, _ in ds.gallery:
            ts = ds.timestamps.get(path)
            if ts is None and "timestamp" in regex.groupindex:
                m = regex.search(Path(path).name)
                ts = _parse_timestamp(m.group("timestamp")) if m else None
            raw.append(((rename or {}).get(path, path), pid, camid, ts))

    for folder in folders:
        take(FolderDataset(folder, pattern=pattern, sidecar=sidecar, cam_base=cam_base, recursive=recursive))
    if files:
        bad = [str(f) for f in files if f.suffix.lower() not in IMG_EXTENSIONS]
        if bad:
            raise ValueError(f"not an image file ({', '.join(IMG_EXTENSIONS)}): {bad[:5]}")
        with tempfile.TemporaryDirectory(prefix="reid-gallery-list-") as tmp:
            rename = {}
            for i, f in enumerate(files):
                link = Path(tmp) / f"{i:08d}" / f.name  # one folder per file: equal names cannot clash
                link.parent.mkdir()
                link.symlink_to(f.resolve())
                rename[str(link)] = str(f.resolve())
            take(FolderDataset(tmp, pattern=pattern, cam_base=cam_base, recursive=True), rename)
    records = [CropRecord(path=os.path.abspath(p), sha256="", camid=int(c), identity=None if pid < 0 else int(pid),
                          timestamp=_to_seconds(ts), timestamp_raw=None if ts is None else str(ts))
               for p, pid, c, ts in raw]
    records.sort(key=lambda r: r.path)
    return records


# ============================================================================ index


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


class _Vectors:
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


def _write_segment(root: Path, name: str, ids: np.ndarray, vecs: np.ndarray) -> list[dict[str, Any]]:
    root.mkdir(exist_ok=True)
    entries = []
    for suffix, arr in ((".ids.npy", ids.astype(np.int64)), (".f16.npy", vecs.astype(np.float16))):
        path = root / f"{name}{suffix}"
        with open(path, "wb") as fh:
            np.save(fh, arr)
            fh.flush()
            os.fsync(fh.fileno())
        entries.append({"name": f"{name}{suffix}", "sha256": sha256_file(path), "bytes": path.stat().st_size})
    _fsync_dir(root)
    return entries


class _Index:
    """The faiss index of one generation plus what IVF-PQ needs (params, float16 vectors)."""

    def __init__(self, dim: int, params: IndexParams, index: faiss.Index | None = None,
                 vectors: _Vectors | None = None) -> None:
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

    def clone(self) -> _Index:
        return _Index(self.dim, IndexParams(**self.params.to_dict()), faiss.clone_index(self.index), self.vectors)

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
        entries = _write_segment(seg_root, name, old_ids, old)
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


# ============================================================================ results


@dataclass
class SearchHit:
    """One ranked gallery crop for one query."""

    rank: int
    id: int
    score: float
    path: str
    camid: int | None
    timestamp: float | None
    timestamp_raw: str | None
    identity: int | None
    track: str | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict."""
        return dict(self.__dict__)


@dataclass
class AddReport:
    """What an add did: crops added, duplicates skipped (content hash already stored or repeated),
    unreadable files, the generation published, and timings."""

    added: int = 0
    duplicates: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    generation: int = -1
    seconds: float = 0.0
    embed_seconds: float = 0.0
    images_per_second: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict."""
        return {**self.__dict__, "num_duplicates": len(self.duplicates), "num_failed": len(self.failed)}


class _SlowLoader:
    """Wraps a DataLoader to apply the test-only per-batch sleep (see TEST_SLEEP_ENV)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.dataset = loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            yield batch
            _test_sleep("batch")


# ============================================================================ the gallery


class Gallery:
    """A gallery directory (see the module docstring). Use :meth:`create` or :meth:`open`."""

    def __init__(self, root: Path, generation: int, manifest: dict[str, Any], store: MetadataStore,
                 index: _Index) -> None:
        self.root = root
        self.generation = generation
        self.manifest = manifest
        self.store = store
        self._index = index
        self.fingerprint: dict[str, Any] = store.get_meta("fingerprint")
        self._extractor = None
        self._columns: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.device: str | None = None

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(cls, directory: str | os.PathLike, cfg: Any, *, feature: str = "global",
               index: str | IndexParams = "auto", camera_num: int = 0, overwrite: bool = False,
               device: str | None = None, model: torch.nn.Module | None = None,
               pattern: str | None = None) -> Gallery:
        """Create an empty gallery bound to the model `cfg` describes (weights: TEST.WEIGHT, else
        MODEL.PRETRAIN_*, else random init seeded with SOLVER.SEED) and publish generation 0.

        feature: 'global' stores the 768-d global (b1) feature, L2-normalised; 'full' the whole eval
        feature (3840-d with JPM). camera_num: cameras of the SIE (ignored without MODEL.SIE_CAMERA).
        index: 'auto' | 'flat' | 'ivfpq' or an :class:`IndexParams`. A `model` may be passed to avoid
        building it again (it must be the model `cfg` describes). `pattern`: the default file-name
        pattern of later adds and of query names (else DATASETS.FOLDER_PATTERN).
        """
        if feature not in ("global", "full"):
            raise ValueError(f"feature must be 'global' or 'full', got {feature!r}")
        root = Path(directory)
        if root.exists() and any(root.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{root} exists and is not empty (pass overwrite=True / --overwrite)")
            if not (root / CURRENT).exists() and not (root / LOCK).exists():
                raise FileExistsError(f"refusing to overwrite {root}: it is not a gallery")
            shutil.rmtree(root)
        root.mkdir(parents=True, exist_ok=True)
        params = index if isinstance(index, IndexParams) else IndexParams(kind=index)
        if params.kind not in ("auto", "flat", "ivfpq"):
            raise ValueError(f"index kind must be auto, flat or ivfpq, got {params.kind!r}")
        camera_num = max(1, int(camera_num))
        extractor = _build_extractor(cfg, camera_num, device, model)
        fp = model_fingerprint(cfg, extractor.model, feature, camera_num)
        with _Lock(root):
            gen_dir = root / ".tmp-gen-000000"
            shutil.rmtree(gen_dir, ignore_errors=True)
            gen_dir.mkdir()
            store = MetadataStore(gen_dir / "meta.sqlite", readonly=False)
            store.set_meta("fingerprint", fp)
            store.set_meta("config", cfg.dump())
            store.set_meta("feature", feature)
            store.set_meta("camera_num", camera_num)
            store.set_meta("pattern", pattern or cfg.DATASETS.FOLDER_PATTERN)
            store.set_meta("created", time.time())
            store.commit()
            store.close()
            idx = _Index(fp["feature"]["dim"], params)
            _publish(root, gen_dir, 0, idx, [], [])
        g = cls.open(root, verify=False)
        g._extractor = extractor
        return g

    @classmethod
    def open(cls, directory: str | os.PathLike, verify: bool = True) -> Gallery:
        """Open the published generation; with `verify` every file's sha256 is checked against the
        manifest (a truncated or bit-flipped file raises :class:`GalleryCorrupt`, it is never used)."""
        root = Path(directory)
        gen, manifest = _read_current(root)
        gen_dir = root / _gen_name(gen)
        seg_root = root / SEGMENTS
        files = [(gen_dir / f["name"], f) for f in manifest["files"]]
        files += [(seg_root / f["name"], f) for f in manifest["segment_files"]]
        for path, entry in files:
            if not path.is_file():
                raise GalleryCorrupt(f"gallery file missing: {path}")
            size = path.stat().st_size
            if size != entry["bytes"]:
                raise GalleryCorrupt(f"gallery file {path} has {size} bytes, the manifest says {entry['bytes']} "
                                     "(truncated or replaced); refusing to use it")
            if verify and sha256_file(path) != entry["sha256"]:
                raise GalleryCorrupt(f"gallery file {path} does not match its sha256 in {gen_dir / 'manifest.json'} "
                                     "(corrupted); refusing to use it")
        try:
            faiss_index = faiss.read_index(str(gen_dir / "index.faiss"))
        except RuntimeError as exc:
            raise GalleryCorrupt(f"cannot read {gen_dir / 'index.faiss'}: {exc}") from None
        params = IndexParams(**manifest["index"]["params"])
        vectors = _Vectors(seg_root, manifest["segments"]) if manifest["segments"] else None
        store = MetadataStore(gen_dir / "meta.sqlite", readonly=True)
        if int(faiss_index.ntotal) != store.count():
            raise GalleryCorrupt(f"{gen_dir}: index holds {faiss_index.ntotal} vectors, metadata {store.count()} rows")
        idx = _Index(int(manifest["index"]["dim"]), params, faiss_index, vectors)
        return cls(root, gen, manifest, store, idx)

    def close(self) -> None:
        """Close the metadata connection."""
        self.store.close()

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _reload(self) -> None:
        fresh = Gallery.open(self.root, verify=False)
        self.store.close()
        self.generation, self.manifest, self.store, self._index = (fresh.generation, fresh.manifest,
                                                                   fresh.store, fresh._index)
        self._columns = None

    # ------------------------------------------------------------------ model
    @property
    def cfg(self) -> Any:
        """The configuration the gallery was built with (frozen)."""
        from yacs.config import CfgNode

        cfg = CfgNode.load_cfg(self.store.get_meta("config"))
        cfg.freeze()
        return cfg

    @property
    def pattern(self) -> str:
        """Default file-name pattern (camid, optional pid and timestamp groups) of this gallery."""
        return self.store.get_meta("pattern") or self.cfg.DATASETS.FOLDER_PATTERN

    @property
    def dim(self) -> int:
        """Stored feature dimension."""
        return int(self.fingerprint["feature"]["dim"])

    def extractor(self, cfg: Any | None = None, device: str | None = None) -> Any:
        """The gallery's FeatureExtractor (built from its stored config), or one for `cfg` after
        checking that `cfg` describes the same model (else :class:`FingerprintMismatch`)."""
        camera_num = int(self.store.get_meta("camera_num", 1))
        if cfg is None:
            if self._extractor is None:
                self._extractor = _build_extractor(self.cfg, camera_num, device or self.device, None)
                check_fingerprint(self.fingerprint, model_fingerprint(
                    self.cfg, self._extractor.model, self.fingerprint["feature"]["kind"], camera_num))
            return self._extractor
        ext = _build_extractor(cfg, camera_num, device or self.device, None)
        check_fingerprint(self.fingerprint, model_fingerprint(cfg, ext.model, self.fingerprint["feature"]["kind"],
                                                              camera_num))
        return ext

    def _post(self, feats: torch.Tensor | np.ndarray) -> np.ndarray:
        x = feats.numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats)
        x = x.astype(np.float32, copy=False)
        if self.fingerprint["feature"]["kind"] == "global":
            x = x[:, : self.fingerprint["architecture"]["embed_dim"]]
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        return np.ascontiguousarray(x / np.maximum(norm, 1e-12), dtype=np.float32)

    def embed_records(self, records: Sequence[CropRecord], batch_size: int | None = None, workers: int = 0,
                      progress: bool = False) -> tuple[np.ndarray, list[int], list[str], float]:
        """Embed crops: (features (n, D), positions in `records` of the n embedded crops, unreadable
        paths, seconds). Uses the data package's loader and the engine's `extract_features`."""
        from torch.utils.data import DataLoader

        from ..data import ImageDataset, ReIDCollate, build_transforms
        from ..engine.extractor import extract_features

        ext = self.extractor()
        camera_num = int(self.store.get_meta("camera_num", 1))
        sie = bool(self.fingerprint["architecture"]["sie_camera"])
        if sie:
            bad = [r.path for r in records if r.camid is None or not 0 <= r.camid < camera_num]
            if bad:
                raise ValueError(f"this gallery's model has a camera SIE over {camera_num} cameras (0-based ids); "
                                 f"{len(bad)} crop(s) have no camera or one outside it, e.g. {bad[:3]}")
        ds = ImageDataset([(r.path, r.identity if r.identity is not None else -1, r.camid or 0, 0) for r in records],
                          build_transforms(self.cfg, is_train=False))
        loader = DataLoader(ds, batch_size=int(batch_size or self.cfg.TEST.IMS_PER_BATCH), shuffle=False,
                            num_workers=workers, collate_fn=ReIDCollate(self.cfg.INPUT.SIZE_TEST))
        out = extract_features(ext.model, _SlowLoader(loader), device=ext.device, amp=self.cfg.TEST.AMP,
                               flip=bool(self.cfg.TEST.FLIP), feat_norm=True, use_camera=sie,
                               progress=progress, desc="embed")
        return self._post(out.feats), [int(i) for i in out.indices], list(out.failed), out.seconds

    # ------------------------------------------------------------------ writes
    def add(self, inputs: Sequence[str | os.PathLike] | Sequence[CropRecord], *, pattern: str | None = None,
            sidecar: str | os.PathLike | None = None, recursive: bool = True, batch_size: int | None = None,
            workers: int = 0, progress: bool = False, lock_timeout: float | None = None) -> AddReport:
        """Embed new crops (folders, image files, or :class:`CropRecord`s) and publish a new generation.

        Crops whose content hash is already stored (or repeated in `inputs`) are skipped before any
        embedding; existing crops are never re-embedded. All-or-nothing: either the whole batch is
        published or, after a crash, the previous generation stays current.
        """
        t0 = time.perf_counter()
        if inputs and isinstance(inputs[0], CropRecord):
            records = list(inputs)  # type: ignore[arg-type]
        else:
            records = collect_crops(inputs, pattern=pattern or self.pattern, sidecar=sidecar,  # type: ignore[arg-type]
                                    recursive=recursive)
        with _Lock(self.root, lock_timeout):
            self._reload()  # another writer may have published since we opened
            new, dups = self._dedupe(_hash_records(records))
            report = AddReport(duplicates=dups)
            if new:
                feats, pos, failed, secs = self.embed_records(new, batch_size, workers, progress)
                report.failed, report.embed_seconds = failed, secs
                report.images_per_second = len(pos) / secs if secs > 0 else 0.0
                new = [new[i] for i in pos]
            else:
                feats = np.empty((0, self.dim), np.float32)
            self._publish_add(new, feats, report)
        report.seconds = time.perf_counter() - t0
        return report

    def _dedupe(self, records: Sequence[CropRecord]) -> tuple[list[CropRecord], list[str]]:
        known = self.store.known_hashes(r.sha256 for r in records)
        new, dups, seen = [], [], set()
        for r in records:
            if r.sha256 in known or r.sha256 in seen:
                dups.append(r.path)
            else:
                seen.add(r.sha256)
                new.append(r)
        return new, dups

    def add_features(self, records: Sequence[CropRecord], feats: np.ndarray,
                     fingerprint: dict[str, Any] | None = None, lock_timeout: float | None = None) -> AddReport:
        """Store precomputed features (rows L2-normalised by the gallery's model) with their records
        (sha256 required). `fingerprint` (recommended) is checked against the gallery's."""
        if fingerprint is not None:
            check_fingerprint(self.fingerprint, fingerprint)
        feats = np.asarray(feats, np.float32)
        if feats.shape != (len(records), self.dim):
            raise ValueError(f"features must be ({len(records)}, {self.dim}), got {feats.shape}")
        if any(not r.sha256 for r in records):
            raise ValueError("records need their content sha256")
        with _Lock(self.root, lock_timeout):
            self._reload()
            new, dups = self._dedupe(records)
            keep = {id(r) for r in new}
            rows = [i for i, r in enumerate(records) if id(r) in keep]
            report = AddReport(duplicates=dups)
            self._publish_add(new, feats if len(rows) == len(records) else feats[rows], report)
        return report

    def _publish_add(self, new: Sequence[CropRecord], feats: np.ndarray, report: AddReport) -> None:
        def mutate(store: MetadataStore, idx: _Index, gen: int) -> tuple[list[str], list[dict]]:
            names, entries = idx.prepare(feats, self.root / SEGMENTS, f"seg-{gen:06d}")
            ids = store.insert(new, gen)
            if len(ids):
                idx.add(ids, feats)
                if idx.kind == "ivfpq":  # float16 copies for exact re-ranking of the shortlist
                    name = f"seg-{gen:06d}"
                    entries += _write_segment(self.root / SEGMENTS, name, ids, feats)
                    names.append(name)
            return names, entries

        report.added = len(new)
        report.generation = self._write(mutate)

    def remove(self, paths: Sequence[str] | None = None, cameras: Sequence[int] | None = None,
               ids: Sequence[int] | None = None, lock_timeout: float | None = None) -> int:
        """Remove crops by path, camera id or gallery id (union); publishes a generation; returns the count.

        Vectors leave the faiss index (IndexIDMap2 / IndexIVFPQ remove_ids) and rows the SQLite table;
        float16 re-ranking copies stay in their immutable segments, unreferenced (ids are never reused).
        """
        removed = 0
        with _Lock(self.root, lock_timeout):
            self._reload()
            sel: set[int] = set(int(i) for i in ids or ())
            if paths:
                absolute = [os.path.abspath(p) for p in paths]
                for s in range(0, len(absolute), 900):
                    sel.update(self.store.ids_where(paths=absolute[s:s + 900]).tolist())
            if cameras:
                sel.update(self.store.ids_where(cameras=list(cameras)).tolist())
            known = self.store.get(sorted(sel))
            target = np.array(sorted(known), dtype=np.int64)
            if not len(target):
                return 0

            def mutate(store: MetadataStore, idx: _Index, gen: int) -> tuple[list[str], list[dict]]:
                nonlocal removed
                store.delete(target.tolist())
                removed = idx.remove(target)
                if removed != len(target):
                    raise GalleryCorrupt(f"index removed {removed} of {len(target)} ids; metadata and index disagree")
                return [], []

            self._write(mutate)
        return removed

    def _write(self, mutate: Callable[[MetadataStore, _Index, int], tuple[list[str], list[dict]]]) -> int:
        """Build the next generation from the current one with `mutate` and publish it (lock held)."""
        gen = max([self.generation, *_all_generations(self.root)]) + 1
        tmp = self.root / f".tmp-{_gen_name(gen)}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        shutil.copyfile(self.root / _gen_name(self.generation) / "meta.sqlite", tmp / "meta.sqlite")
        store = MetadataStore(tmp / "meta.sqlite", readonly=False)
        idx = self._index.clone()  # the open gallery stays usable if anything below fails
        names, entries = mutate(store, idx, gen)
        store.commit()
        store.close()
        _publish(self.root, tmp, gen, idx, list(self.manifest["segments"]) + names,
                 list(self.manifest["segment_files"]) + entries, previous=self.generation)
        self._reload()
        return gen

    # ------------------------------------------------------------------ search
    def search(self, queries: Any, k: int = 10, *, camids: Sequence[int | None] | int | None = None,
               exclude_same_camera: bool = False, cameras: Sequence[int] | None = None,
               time_window: tuple[Any, Any] | None = None, fingerprint: dict[str, Any] | None = None,
               cfg: Any | None = None, nprobe: int | None = None, pattern: str | None = None
               ) -> list[list[SearchHit]]:
        """Top-`k` crops for each query.

        queries: image paths / PIL images / HWC uint8 arrays (embedded with the gallery's model, or the
        model of `cfg` after a fingerprint check), or a float (Q, D) array/tensor of features already in
        the gallery's space (pass their `fingerprint` to have it checked).
        camids: each query's 0-based camera (needed for a camera-SIE model and for
        `exclude_same_camera`); for paths it is parsed from the file name when not given.
        cameras: keep only these cameras. time_window: (from, to), inclusive, numbers or ISO 8601
        (either may be None). Filters are exact for every index type (see `_Index.search`).
        """
        if fingerprint is not None:
            check_fingerprint(self.fingerprint, fingerprint)
        q, qcams = self._query_features(queries, camids, cfg, pattern or self.pattern)
        if exclude_same_camera and any(c is None for c in qcams):
            raise ValueError("exclude_same_camera needs every query's camera (camids=, or parsable file names)")
        t_from, t_to = (time_window or (None, None))
        t_from, t_to = _to_seconds(t_from), _to_seconds(t_to)
        filtered = exclude_same_camera or cameras is not None or t_from is not None or t_to is not None
        groups: dict[Any, list[int]] = {}
        for i, c in enumerate(qcams):
            groups.setdefault(c if exclude_same_camera else None, []).append(i)
        scores = np.full((len(q), k), -np.inf, np.float32)
        ids = np.full((len(q), k), -1, np.int64)
        for cam, rows in groups.items():
            allowed = None
            if filtered:
                allowed = self._allowed(cameras, cam, t_from, t_to)
            s, i = self._index.search(q[rows], k, allowed, nprobe=nprobe)
            scores[rows], ids[rows] = s, i
        meta = self.store.get(np.unique(ids[ids >= 0]).tolist())
        out = []
        for qi in range(len(q)):
            hits = []
            for rank, (s, i) in enumerate(zip(scores[qi], ids[qi])):
                if i < 0:
                    continue
                r = meta[int(i)]
                hits.append(SearchHit(rank + 1, int(i), float(s), r.path, r.camid, r.timestamp, r.timestamp_raw,
                                      r.identity, r.track))
            out.append(hits)
        return out

    def _allowed(self, cameras: Sequence[int] | None, exclude: int | None, t_from: float | None,
                 t_to: float | None) -> np.ndarray:
        """Sorted ids passing the filters. Evaluated in numpy over columns read once per generation:
        fetching ~1M ids row by row from SQLite per query would cost a second (bench), this costs ms."""
        if self._columns is None:
            rows = self.store.conn.execute("SELECT id, camid, timestamp FROM crops ORDER BY id").fetchall()
            arr = np.array([(r[0], -1 if r[1] is None else r[1], np.nan if r[2] is None else r[2]) for r in rows],
                           dtype=np.float64).reshape(-1, 3)
            self._columns = (arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64), arr[:, 2])
        ids, cams, ts = self._columns
        mask = np.ones(len(ids), bool)
        if cameras is not None:
            mask &= np.isin(cams, np.asarray(list(cameras), np.int64))
        if exclude is not None:
            mask &= cams != exclude  # unknown cameras (-1) are kept, as in MetadataStore.ids_where
        with np.errstate(invalid="ignore"):  # NaN (no timestamp) never satisfies a time window
            if t_from is not None:
                mask &= ts >= t_from
            if t_to is not None:
                mask &= ts <= t_to
        return ids[mask]

    def _query_features(self, queries: Any, camids: Any, cfg: Any, pattern: str) -> tuple[np.ndarray, list[int | None]]:
        is_feat = isinstance(queries, torch.Tensor) or (
            isinstance(queries, np.ndarray) and queries.dtype.kind == "f" and queries.ndim == 2)
        if is_feat:
            x = queries.detach().cpu().numpy() if isinstance(queries, torch.Tensor) else queries
            x = np.asarray(x, np.float32)
            if x.ndim != 2 or x.shape[1] != self.dim:
                raise FingerprintMismatch(f"query features have shape {x.shape}; this gallery stores "
                                          f"{self.dim}-d features of its model ({self.fingerprint['weights']})")
            n = len(x)
        else:
            if isinstance(queries, (str, os.PathLike)) or not isinstance(queries, Sequence):
                queries = [queries]
            n = len(queries)
        if camids is None or isinstance(camids, int):
            cams: list[int | None] = [camids] * n
        else:
            cams = [None if c is None else int(c) for c in camids]
        if len(cams) != n:
            raise ValueError(f"got {len(cams)} camera ids for {n} queries")
        if is_feat:
            return self._post(x), cams
        paths = [str(p) for p in queries if isinstance(p, (str, os.PathLike))]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"query image(s) not found: {missing[:5]}")
        if len(paths) == n and any(c is None for c in cams):
            parsed = _cameras_from_names(paths, pattern)
            cams = [c if c is not None else p for c, p in zip(cams, parsed)]
        ext = self.extractor(cfg)
        sie = bool(self.fingerprint["architecture"]["sie_camera"])
        if sie and any(c is None for c in cams):
            raise ValueError("this gallery's model has a camera SIE: give each query's camera (camids= / "
                             "--query-camera) or use file names the folder pattern parses")
        items = [str(x) if isinstance(x, os.PathLike) else x for x in queries]
        feats = ext(items, camids=[c or 0 for c in cams] if sie else None)
        return self._post(feats), cams

    # ------------------------------------------------------------------ info
    def info(self) -> dict[str, Any]:
        """Size, model fingerprint, index type and parameters, generation, bytes on disk, cameras."""
        gen_dir = self.root / _gen_name(self.generation)
        disk = sum(f["bytes"] for f in self.manifest["files"]) + sum(f["bytes"] for f in self.manifest["segment_files"])
        return {
            "path": str(self.root.resolve()),
            "generation": self.generation,
            "size": self.store.count(),
            "index": {"kind": self._index.kind, "ntotal": self._index.ntotal, "params": self._index.params.to_dict()},
            "model": self.fingerprint,
            "model_digest": fingerprint_digest(self.fingerprint),
            "cameras": {str(k): v for k, v in self.store.cameras().items()},
            "bytes": disk,
            "bytes_per_crop": disk / max(1, self.store.count()),
            "manifest": str(gen_dir / "manifest.json"),
            "created": self.store.get_meta("created"),
        }


# ============================================================================ internals


def _gen_name(gen: int) -> str:
    return f"gen-{gen:06d}"


def _all_generations(root: Path) -> list[int]:
    out = []
    for p in root.iterdir():
        m = _GEN_RE.match(p.name) or re.match(r"^\.tmp-gen-(\d{6,})$", p.name)
        if m:
            out.append(int(m.group(1)))
    return out


def _read_current(root: Path) -> tuple[int, dict[str, Any]]:
    cur = root / CURRENT
    if not cur.is_file():
        raise GalleryError(f"{root} is not a gallery (no {CURRENT} file); create one with `reid-gallery build`")
    parts = cur.read_text().split()
    if len(parts) != 2 or not _GEN_RE.match(parts[0]):
        raise GalleryCorrupt(f"{cur} is malformed: {cur.read_text()[:100]!r}")
    name, digest = parts
    man_path = root / name / "manifest.json"
    if not man_path.is_file():
        raise GalleryCorrupt(f"{cur} points to {name}, whose manifest is missing")
    raw = man_path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != digest:
        raise GalleryCorrupt(f"{man_path} does not match the checksum in {cur} (corrupted); refusing to use it")
    manifest = json.loads(raw)
    if manifest.get("format") != FORMAT:
        raise GalleryError(f"{man_path}: unsupported gallery format {manifest.get('format')!r} (expected {FORMAT})")
    return int(_GEN_RE.match(name).group(1)), manifest


def _publish(root: Path, tmp: Path, gen: int, idx: _Index, segments: list[str], segment_files: list[dict],
             previous: int | None = None) -> None:
    """Finish the generation in `tmp` (index + manifest, fsync), rename it into place, swap CURRENT.

    `previous` is the generation CURRENT named before: it is kept (with the new one), everything else
    (older generations, a killed writer's unpublished debris) is garbage-collected afterwards."""
    faiss.write_index(idx.index, str(tmp / "index.faiss"))
    files = []
    for name in ("index.faiss", "meta.sqlite"):
        path = tmp / name
        _fsync_file(path)
        files.append({"name": name, "sha256": sha256_file(path), "bytes": path.stat().st_size})
    manifest = {
        "format": FORMAT, "generation": gen, "created": time.time(), "ntotal": idx.ntotal,
        "index": {"kind": idx.kind, "dim": idx.dim, "params": idx.params.to_dict()},
        "files": files, "segments": segments, "segment_files": segment_files,
    }
    raw = json.dumps(manifest, indent=1, sort_keys=True).encode()
    _write_durable(tmp / "manifest.json", raw)
    _fsync_dir(tmp)
    final = root / _gen_name(gen)
    if final.exists():  # debris of a writer killed between this rename and the CURRENT swap
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    _test_sleep("publish")
    cur_tmp = root / f".{CURRENT}.tmp"
    _write_durable(cur_tmp, f"{final.name} {hashlib.sha256(raw).hexdigest()}\n".encode())
    os.replace(cur_tmp, root / CURRENT)  # the commit point
    _fsync_dir(root)
    _collect_garbage(root, {gen} if previous is None else {gen, previous})


def _collect_garbage(root: Path, keep: set[int]) -> None:
    """Drop generations not in `keep` (the published one and its predecessor: KEEP_GENERATIONS),
    unpublished debris, and segments no kept generation references."""
    for p in root.iterdir():
        m = _GEN_RE.match(p.name)
        if (m and int(m.group(1)) not in keep) or p.name.startswith(".tmp-gen-"):
            shutil.rmtree(p, ignore_errors=True)
    seg_root = root / SEGMENTS
    if not seg_root.is_dir():
        return
    referenced: set[str] = set()
    for g in keep:
        man = root / _gen_name(g) / "manifest.json"
        if man.is_file():
            referenced.update(f["name"] for f in json.loads(man.read_text())["segment_files"])
    for p in seg_root.iterdir():
        if p.name not in referenced:
            p.unlink(missing_ok=True)


class _Lock:
    """Exclusive fcntl.flock on <gallery>/LOCK for the whole of a write (create/add/remove).

    flock locks belong to the open file, so two writers in one process exclude each other too, and
    the kernel releases the lock when a writer dies (no stale lock after a crash).
    """

    def __init__(self, root: Path, timeout: float | None = None) -> None:
        self.path = root / LOCK
        self.timeout = timeout
        self.fd: int | None = None

    def __enter__(self) -> _Lock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        waited = False
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if not waited:
                    holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip()
                    logger.warning("gallery %s is locked by another writer (pid %s); waiting", self.path.parent,
                                   holder or "?")
                    waited = True
                if deadline is not None and time.monotonic() > deadline:
                    os.close(self.fd)
                    raise GalleryLocked(f"{self.path.parent} is locked by another writer") from None
                time.sleep(0.1)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _hash_records(records: Sequence[CropRecord]) -> list[CropRecord]:
    from dataclasses import replace

    return [r if r.sha256 else replace(r, sha256=sha256_file(r.path)) for r in records]


def _cameras_from_names(paths: Sequence[str], pattern: str) -> list[int | None]:
    """Query cameras via `collect_crops` (the folder dataset's parser); None where a name does not parse."""
    out: list[int | None] = []
    for p in paths:
        try:
            out.append(collect_crops([p], pattern=pattern)[0].camid)
        except (ValueError, FileNotFoundError):
            out.append(None)
    return out


def _build_extractor(cfg: Any, camera_num: int, device: str | None, model: torch.nn.Module | None) -> Any:
    """FeatureExtractor for `cfg`; random initialisation is seeded (SOLVER.SEED) so that every process
    building the same gallery model gets the same weights, without touching the global RNG."""
    from ..engine.extractor import FeatureExtractor

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.SOLVER.SEED))
        return FeatureExtractor(cfg, model=model, weights=cfg.TEST.WEIGHT or None,
                                device=device or cfg.MODEL.DEVICE, camera_num=camera_num)
