"""Which crops of a track are worth embedding: the best-crop rule.

Per track, every tracked box is scored and the `max_crops` best are kept (a bounded heap: memory does
not grow with the track's length):

1. **Not cut by the frame edge** comes first: a box within `edge_margin` pixels of a border shows part
   of a person (or, in the real video, the wall at the right-hand edge that the detector takes for one);
   such crops are used only when a track has no uncut box at all.
2. Among those, the **score** is `sharpness * min(height, full_height) / full_height`:
   * sharpness: the variance of the Laplacian of the crop in grey, resized to 128x64 (the scale the
     ReID model sees, half its 256x128): motion blur and upscaled small boxes both lower it;
   * the height factor favours boxes up to the model's input height (`full_height`, 256): a person
     seen larger than that gains nothing, as the crop is resized down anyway.
3. Boxes smaller than `min_height` pixels are not kept (too few pixels for an appearance), unless the
   track has nothing else.

Spurious tracks (a one-frame false box) are dropped later, by the tracklet's minimum length
(`reid_lite.video.tracklets.TrackletRule`).
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

import numpy as np

__all__ = ["CropRule", "TrackCrops", "box_cut_by_edge", "crop_box", "sharpness"]

_tie = itertools.count()  # heap tie-breaker: arrays do not compare


@dataclass(frozen=True)
class CropRule:
    """Parameters of the best-crop rule (module docstring)."""

    max_crops: int = 8
    edge_margin: int = 3
    min_height: int = 48
    full_height: int = 256

    def __post_init__(self) -> None:
        if self.max_crops < 1:
            raise ValueError(f"max_crops must be >= 1, got {self.max_crops}")


def box_cut_by_edge(box: np.ndarray, height: int, width: int, margin: int) -> bool:
    """Whether box `[x1, y1, x2, y2, ...]` lies within `margin` pixels of a border of a height x width frame."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    return x1 < margin or y1 < margin or x2 > width - margin or y2 > height - margin


def crop_box(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The pixels of `box` (rounded, clipped to the image), a copy (so the frame can be freed)."""
    h, w = image.shape[:2]
    x1, y1 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
    x2, y2 = min(w, int(np.ceil(box[2]))), min(h, int(np.ceil(box[3])))
    return image[y1:y2, x1:x2].copy()


def sharpness(crop: np.ndarray) -> float:
    """Variance of the Laplacian of `crop` (BGR or grey uint8) in grey at 128x64: higher is sharper."""
    import cv2

    if crop.size == 0:
        return 0.0
    grey = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY) if crop.ndim == 3 else crop
    grey = cv2.resize(grey, (64, 128), interpolation=cv2.INTER_AREA)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


@dataclass
class TrackCrops:
    """What is kept of one track while the video plays: its span, its box count and its best crops."""

    track_id: int
    rule: CropRule
    first_frame: int = -1
    last_frame: int = -1
    first_time: float = 0.0
    last_time: float = 0.0
    hits: int = 0  # sampled frames in which the track had a box
    heap: list = field(default_factory=list)  # (rank, tie, frame index, crop BGR, box), the worst at [0]

    def add(self, image: np.ndarray, box: np.ndarray, frame_index: int, time: float) -> None:
        """Record the track's box in frame `frame_index` (at `time` s) and keep its crop if it ranks among
        the best `max_crops`."""
        if self.hits == 0:
            self.first_frame, self.first_time = frame_index, time
        self.last_frame, self.last_time = frame_index, time
        self.hits += 1
        h, w = image.shape[:2]
        height = float(box[3] - box[1])
        uncut = not box_cut_by_edge(box, h, w, self.rule.edge_margin)
        big = height >= self.rule.min_height
        if len(self.heap) == self.rule.max_crops and (uncut, big) < self.heap[0][0][:2]:
            return  # cannot enter: cheaper than cutting and scoring the crop
        crop = crop_box(image, box)
        score = sharpness(crop) * min(height, self.rule.full_height) / self.rule.full_height
        item = ((uncut, big, score), next(_tie), frame_index, crop, np.asarray(box, dtype=np.float32).copy())
        if len(self.heap) < self.rule.max_crops:
            heapq.heappush(self.heap, item)
        elif item[0] > self.heap[0][0]:
            heapq.heapreplace(self.heap, item)

    def best(self) -> list[tuple[int, np.ndarray, np.ndarray, bool]]:
        """The kept crops, best first: (frame index, crop BGR, box [x1, y1, x2, y2, conf], cut by the edge)."""
        return [(f, crop, box, not rank[0]) for rank, _, f, crop, box in sorted(self.heap, key=lambda t: t[:2],
                                                                                  reverse=True)]
