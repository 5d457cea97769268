"""Nearest-neighbour search (one faiss wrapper, `VectorIndex`) and the persisted gallery of crops.

Retrieval evaluation (Rank-k, mAP, mINP) lives in `reid_lite.metrics` (`evaluate_retrieval`).
"""

from reid_lite.index.vector_index import IndexParams, VectorIndex, gpu_available

__all__ = ["IndexParams", "VectorIndex", "gpu_available"]

# Persisted gallery: gallery.py (build/open), writes.py, querying.py, embedding.py (the model), storage.py
# (generations, lock, write stages), vector_index.py (the faiss wrapper), store.py (SQLite), crops.py,
# fingerprint.py; live.py + server.py (`reid-gallery serve`); CLI `reid-gallery` in cli.py.
from reid_lite.index.gallery import (  # noqa: E402
    AddReport,
    FingerprintMismatch,
    Gallery,
    GalleryCorrupt,
    GalleryError,
    GalleryLocked,
    SearchHit,
    SearchResults,
)
from reid_lite.index.store import CropRecord, MetadataStore  # noqa: E402

__all__ += ["AddReport", "CropRecord", "FingerprintMismatch", "Gallery", "GalleryCorrupt", "GalleryError",
            "GalleryLocked", "MetadataStore", "SearchHit",
            "SearchResults"]
