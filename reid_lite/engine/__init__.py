"""Inference engine: feature extraction and gallery/query evaluation."""

from .extractor import FeatureExtractor, Features, extract_features

__all__ = ["FeatureExtractor", "Features", "extract_features"]
