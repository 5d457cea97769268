"""Tracklets: one person's pass through one camera, embedded once from its best crops.

The tracklet's feature is the **mean of its crops' L2-normalised features, L2-normalised again**. It is
the usual set feature of video ReID (temporal average pooling): order-free, every kept crop counts the
same (they already passed the best-crop rule, so weighting them again by the same quality score would
count it twice), an outlier crop (a pose change, a partly hidden person) is averaged down rather than
chosen, and its cosine similarity to a query is the query's mean similarity to the crops, scaled by
one factor per tracklet: the gallery's inner-product search applies unchanged.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .crops import TrackCrops

__all__ = ["Embedder", "Tracklet", "TrackletRule", "aggregate_features", "build_tracklets", "jpeg_bytes"]

#: RGB uint8 HWC crops -> (n, D) float32 L2-normalised features, one row per crop, in order.
Embedder = Callable[[Sequence[np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class TrackletRule:
    """Which tracks become tracklets: at least `min_hits` sampled frames with a box and spanning at least
    `min_seconds` from the first box to the last (drops one-frame false boxes and flickers)."""

    min_hits: int = 3
    min_seconds: float = 0.4


@dataclass
class Tracklet:
    """One track of one video: its span, its best crops' aggregate feature and its thumbnail.

    `feature` is None when the pipeline ran without an embedder. `thumbnail` is the best crop (RGB
    uint8 HWC); `crops` (RGB) are kept only when asked for. Times are seconds (`start + index / fps`).
    """

    track_id: int
    camera: int | None
    video: str
    start: float
    end: float
    first_frame: int
    last_frame: int
    hits: int
    crop_count: int
    crop_frames: list[int]
    thumbnail: np.ndarray
    feature: np.ndarray | None = None
    crops: list[np.ndarray] | None = None
    crop_features: np.ndarray | None = field(default=None, repr=False)

    @property
    def duration(self) -> float:
        """Seconds from the first box to the last."""
        return self.end - self.start

    def thumbnail_jpeg(self, quality: int = 90) -> bytes:
        """The thumbnail as JPEG bytes."""
        return jpeg_bytes(self.thumbnail, quality)


def jpeg_bytes(rgb: np.ndarray, quality: int = 90) -> bytes:
    """An RGB uint8 HWC image as JPEG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def aggregate_features(feats: np.ndarray) -> np.ndarray:
    """The mean of the rows of `feats` (n, D) after L2-normalising each, L2-normalised again (float32)."""
    x = np.asarray(feats, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"expected (n >= 1, D) features, got shape {x.shape}")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    m = x.mean(axis=0)
    return (m / max(float(np.linalg.norm(m)), 1e-12)).astype(np.float32)


def build_tracklets(tracks: Sequence[TrackCrops], embed: Embedder | None, camera: int | None, video: str,
                    rule: TrackletRule = TrackletRule(), batch_size: int = 64, keep_crops: bool = False
                    ) -> list[Tracklet]:
    """Tracklets of the `tracks` that pass `rule`, in order of their first frame; their best crops are
    embedded with `embed` in batches of `batch_size` crops across tracks (no embedding when None)."""
    # Times are absolute (start + index / fps): at an epoch start (1.8e9 s) the difference of two float64 times
    # is off by up to 1e-6 s, so a track of exactly `min_seconds` must not depend on the start (1 ms slack).
    kept = [t for t in tracks if t.hits >= rule.min_hits and t.last_time - t.first_time >= rule.min_seconds - 1e-3
            and t.heap]
    kept.sort(key=lambda t: (t.first_frame, t.track_id))
    bests = [t.best() for t in kept]
    rgb = [[np.ascontiguousarray(crop[:, :, ::-1]) for _, crop, _, _ in b] for b in bests]
    feats: np.ndarray | None = None
    if embed is not None:
        flat = [c for cs in rgb for c in cs]
        parts = [np.asarray(embed(flat[s:s + batch_size]), dtype=np.float32) for s in range(0, len(flat), batch_size)]
        feats = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
        if len(feats) != len(flat):
            raise ValueError(f"the embedder returned {len(feats)} features for {len(flat)} crops")
    out, pos = [], 0
    for t, b, cs in zip(kept, bests, rgb):
        f = None if feats is None else feats[pos:pos + len(cs)]
        pos += len(cs)
        out.append(Tracklet(
            track_id=t.track_id, camera=camera, video=video, start=t.first_time, end=t.last_time,
            first_frame=t.first_frame, last_frame=t.last_frame, hits=t.hits, crop_count=len(cs),
            crop_frames=[fi for fi, _, _, _ in b], thumbnail=cs[0],
            feature=None if f is None else aggregate_features(f),
            crops=cs if keep_crops else None, crop_features=f))
    return out
