"""Feature search (faiss) and chunked retrieval evaluation."""

from reid_lite.index.search import FeatureIndex, evaluate_retrieval, gpu_available

__all__ = ["FeatureIndex", "evaluate_retrieval", "gpu_available"]
