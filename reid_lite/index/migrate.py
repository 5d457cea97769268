"""Copy a gallery between backends (a folder and PostgreSQL, either way) and prove the copy complete.

    report = migrate_gallery("/data/gallery", "postgresql://reid@db/city?gallery=cams")
    reid-gallery migrate /data/gallery "postgresql://reid@db/city?gallery=cams"

The target is built like any gallery (`Gallery.staging_from_metadata`: one all-or-nothing publish) with the
source's metadata (model fingerprint, configuration, file-name pattern, calibration) and every crop's record and
stored vector, read and written in chunks; no model is built and nothing is embedded again. Then both galleries
are read back and compared: the crop counts, and an order-free checksum over every crop (its record fields
and its vector's bytes) that does not depend on the ids each backend assigned. Vectors are compared as float32,
or as float16 when either side is an IVF-PQ gallery (whose exact copies are float16).
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import numpy as np

from .backends import storage_for
from .gallery import Gallery
from .interfaces import GalleryStorage
from .storage import GalleryCorrupt, GalleryError
from .store import CropRecord
from .vector_index import IndexParams

__all__ = ["MIGRATED_META", "gallery_checksum", "migrate_gallery"]

#: The metadata keys a migration carries over (the rest, e.g. SQLite's next_id, belong to one backend).
MIGRATED_META = ("fingerprint", "config", "feature", "camera_num", "pattern", "created", "calibration")
_CHUNK = 20_000


def _crop_digest(r: CropRecord, vector: np.ndarray) -> int:
    fields = "\x1f".join(str(v) for v in (r.sha256, r.path, r.camid, r.timestamp, r.timestamp_raw, r.identity,
                                           r.track))
    return int.from_bytes(hashlib.sha256(fields.encode() + vector.tobytes()).digest(), "big")


def gallery_checksum(g: Gallery, dtype: Any = np.float32) -> tuple[int, str]:
    """(crops, checksum): the sum modulo 2**256 of a sha256 per crop over its record's fields (not its id) and
    its stored vector as `dtype`, so that two galleries holding the same crops agree whatever their ids."""
    ids = g.store.all_ids()
    total = 0
    for s in range(0, len(ids), _CHUNK):
        chunk = ids[s:s + _CHUNK]
        records = g.store.get(chunk.tolist())
        vectors = g.index.stored_vectors(chunk).astype(dtype)
        for i, v in zip(chunk.tolist(), vectors):
            total = (total + _crop_digest(records[i], v)) % (1 << 256)
    return len(ids), f"{total:064x}"


def _target_params(source: Gallery) -> IndexParams:
    """The target's index policy: exact (`flat`) stays exact, any other (auto, IVF-PQ, HNSW) becomes the target
    backend's default (`auto`: a folder's flat-then-IVF-PQ, PostgreSQL's HNSW)."""
    return IndexParams(kind="flat" if source.index.params.kind == "flat" else "auto")


def migrate_gallery(source: str | os.PathLike | GalleryStorage, target: str | os.PathLike | GalleryStorage, *,
                    overwrite: bool = False, lock_timeout: float | None = None) -> dict[str, Any]:
    """Copy the gallery `source` to `target` (folders or database URIs) and verify it; returns a report with the
    crop count, the checksum and the seconds taken. GalleryCorrupt when the copy does not match."""
    t0 = time.perf_counter()
    src = Gallery.open(source, verify=True)
    dst_storage = storage_for(target)
    if src.storage is not None and src.storage.location == dst_storage.location:
        raise ValueError(f"source and target are the same gallery ({src.storage.location})")
    if src.index.kind == "ivfpq" and src.index.vectors is None:
        raise GalleryError(f"{src.storage.location}: this IVF-PQ gallery keeps no exact copies of its vectors, so "
                           "it cannot be copied without embedding its crops again")
    try:
        meta = {k: v for k in MIGRATED_META if (v := src.store.get_meta(k)) is not None}
        ids = src.store.all_ids()
        with Gallery.staging_from_metadata(dst_storage, meta, index=_target_params(src), overwrite=overwrite,
                                           lock_timeout=lock_timeout) as dst:
            for s in range(0, len(ids), _CHUNK):
                chunk = ids[s:s + _CHUNK]
                records = src.store.get(chunk.tolist())
                dst.add_features([records[i] for i in chunk.tolist()], src.index.stored_vectors(chunk),
                                 fingerprint=src.fingerprint)
        copied = Gallery.open(target, verify=True)
        try:
            dtype = np.float16 if "ivfpq" in (src.index.kind, copied.index.kind) else np.float32
            want, got = gallery_checksum(src, dtype), gallery_checksum(copied, dtype)
            if want != got:
                raise GalleryCorrupt(f"the copy at {copied.storage.location} does not match {src.storage.location}: "
                                     f"{got[0]} crops, checksum {got[1][:16]}, expected {want[0]} and "
                                     f"{want[1][:16]}")
            return {"source": src.storage.location, "target": copied.storage.location, "crops": want[0],
                    "checksum": want[1], "vectors_compared_as": np.dtype(dtype).name,
                    "target_generation": copied.generation, "target_index": copied.index.kind,
                    "seconds": round(time.perf_counter() - t0, 2)}
        finally:
            copied.close()
    finally:
        src.close()
