"""Feature search (faiss) and chunked retrieval evaluation."""

from reid_lite.index.search import FeatureIndex, evaluate_retrieval, gpu_available

__all__ = ["FeatureIndex", "evaluate_retrieval", "gpu_available"]

# Persisted gallery: gallery.py (build/open), writes.py, querying.py, storage.py (generations, lock),
# vector_index.py (faiss), store.py (SQLite), crops.py, fingerprint.py; CLI `reid-gallery` in cli.py.
from reid_lite.index.gallery import (  # noqa: E402
    AddReport,
    FingerprintMismatch,
    Gallery,
    GalleryCorrupt,
    GalleryError,
    GalleryLocked,
    IndexParams,
    SearchHit,
    SearchResults,
)
from reid_lite.index.store import CropRecord, MetadataStore  # noqa: E402

__all__ += ["AddReport", "CropRecord", "FingerprintMismatch", "Gallery", "GalleryCorrupt", "GalleryError",
            "GalleryLocked", "IndexParams", "MetadataStore", "SearchHit",
            "SearchResults"]
