"""The gallery's model as the pipeline's embedder: a `reid_lite.engine.FeatureExtractor` (token
merging as its config says) wrapped into a callable `RGB crops -> (n, D) L2-normalised float32`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["extractor_embedder"]


def extractor_embedder(extractor: Any, camera: int | None = None,
                       post: Callable[[np.ndarray], np.ndarray] | None = None
                       ) -> Callable[[Sequence[np.ndarray]], np.ndarray]:
    """An embedder for `reid_lite.video.ingest_video` from a FeatureExtractor (or anything called as
    `extractor(images, camids=...)` returning (n, D) features). `camera`: the 0-based camera id given to
    a model with a camera SIE (None: the model must have none). `post`: what the gallery does to
    extracted features before storing them (e.g. `Gallery.normalize_features`, which keeps the global
    part for a 'global' gallery); by default rows are L2-normalised."""

    def embed(images: Sequence[np.ndarray]) -> np.ndarray:
        if not len(images):
            return np.zeros((0, 0), dtype=np.float32)
        feats = extractor(list(images), camids=None if camera is None else [int(camera)] * len(images))
        x = feats.numpy() if hasattr(feats, "numpy") else np.asarray(feats)
        if post is not None:
            return np.asarray(post(x), dtype=np.float32)
        x = x.astype(np.float32, copy=False)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    return embed
