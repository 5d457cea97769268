"""Video decoding with frame times: OpenCV reads the file (any container or raw H.264 its FFmpeg backend
knows); every frame is decoded (inter-frame codecs need them all), only every K-th is converted and
handed on. A frame's time is `start + index / fps`, in seconds.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Frame", "FrameReader", "VideoInfo", "frame_batches", "iter_frames", "probe_video"]


@dataclass(frozen=True)
class VideoInfo:
    """What the container says of a video: frame rate, size and (when the container knows it) frame count."""

    path: str
    fps: float
    width: int
    height: int
    frame_count: int | None  # None where the container does not tell (raw H.264 streams)


@dataclass
class Frame:
    """One decoded frame: its index in the video, its time in seconds (`start + index / fps`) and the
    image (H, W, 3) uint8 BGR, as OpenCV decodes it."""

    index: int
    time: float
    image: np.ndarray


def _open(path: str | os.PathLike):
    import cv2

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"video not found: {p}")
    if not p.is_file():
        raise ValueError(f"video is not a file: {p}")
    cap = cv2.VideoCapture(str(p))
    if not cap.isOpened():
        cap.release()
        raise ValueError(f"cannot open video {p}: OpenCV found no decoder for it (not a video, or damaged)")
    return cap


def probe_video(path: str | os.PathLike, fps: float | None = None) -> VideoInfo:
    """Frame rate, size and frame count of the video at `path` (FileNotFoundError when missing,
    ValueError when OpenCV cannot open it or it tells no frame rate and `fps` is not given)."""

    cap = _open(path)
    try:
        return _info(cap, path, fps)
    finally:
        cap.release()


def _info(cap, path: str | os.PathLike, fps: float | None):
    import cv2

    rate = float(fps) if fps else float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    if not np.isfinite(rate) or rate <= 0:
        raise ValueError(f"video {path} does not tell its frame rate: give it (fps=..., --fps)")
    count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
    # Raw streams report nonsense (negative, huge): only a plausible positive count is kept.
    frames = int(count) if np.isfinite(count) and 0 < count < 1e8 else None
    return VideoInfo(str(path), rate, int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
                     int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)), frames)


class FrameReader:
    """Frames 0, K, 2K, ... (K = `every`) of the video at `path`, with their times; `decoded` counts every
    frame decoded so far (sampled or not). `fps` overrides the container's rate; `max_frames` stops after
    that many decoded frames. A video that opens but yields no frame at all raises ValueError."""

    def __init__(self, path: str | os.PathLike, every: int = 1, start: float = 0.0, fps: float | None = None,
                 max_frames: int | None = None) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.path, self.every, self.start, self.fps, self.max_frames = path, int(every), float(start), fps, max_frames
        self.decoded = 0

    def __iter__(self) -> Iterator[Frame]:
        import cv2

        cap = _open(self.path)
        try:
            info = _info(cap, self.path, self.fps)
            self.decoded = 0
            while self.max_frames is None or self.decoded < self.max_frames:
                if not cap.grab():  # decodes; the colour conversion (retrieve) only for the frames we keep
                    break
                index = self.decoded
                self.decoded += 1
                if index % self.every == 0:
                    ok, image = cap.retrieve()
                    if not ok or image is None:
                        break
                    if image.ndim == 2:
                        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
                    yield Frame(index, self.start + index / info.fps, image)
            if self.decoded == 0:
                raise ValueError(f"cannot decode video {self.path}: no frame could be read")
        finally:
            cap.release()


def iter_frames(path: str | os.PathLike, every: int = 1, start: float = 0.0, fps: float | None = None,
                max_frames: int | None = None) -> Iterator[Frame]:
    """Frames 0, K, 2K, ... (K = `every`) of the video at `path`, with their times (see `FrameReader`)."""
    return iter(FrameReader(path, every, start, fps, max_frames))


def frame_batches(frames: Iterator[Frame], size: int) -> Iterator[list[Frame]]:
    """`frames` in lists of `size` (the last one shorter), for batched detection."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    batch: list[Frame] = []
    for f in frames:
        batch.append(f)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
