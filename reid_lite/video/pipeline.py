"""From a video file to tracklets: decode -> detect (batched) -> track (ByteTrack) -> best crops -> embed
(batched) -> one aggregate feature per tracklet. Nothing here touches a gallery: storing the tracklets
is the caller's part.

    from reid_lite.video import SSDDetector, extractor_embedder, ingest_video
    result = ingest_video("cam1.mp4", SSDDetector("det.xml", threshold=0.5), extractor_embedder(ext, camera=1),
                          camera=1, start=1_700_000_000.0, every=5)
    for t in result.tracklets: print(t.track_id, t.start, t.end, t.crop_count)
    print(result.stats.summary())
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .crops import CropRule, TrackCrops
from .decode import Frame, FrameReader, VideoInfo, frame_batches, probe_video
from .detect import Detector, SSDDetector
from .track import ByteTracker
from .tracklets import Embedder, Tracklet, TrackletRule, build_tracklets

__all__ = ["IngestResult", "StageStats", "ingest_video"]

STAGES = ("decode", "detect", "track", "embed")
DEFAULT_CROP_RULE = CropRule()
DEFAULT_TRACKLET_RULE = TrackletRule()


@dataclass
class StageStats:
    """Seconds spent in each stage and the frames it handled: decode counts every decoded frame, detect
    and track the sampled ones, embed the sampled frames too (its crops/s is given apart)."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    decoded: int = 0
    sampled: int = 0
    crops: int = 0

    def frames(self, stage: str) -> int:
        """Frames the stage handled."""
        return self.decoded if stage == "decode" else self.sampled

    def fps(self, stage: str) -> float:
        """Frames per second of `stage` alone (inf when it took no measurable time)."""
        s = self.seconds[stage]
        return self.frames(stage) / s if s > 0 else float("inf")

    def summary(self) -> str:
        """One line: frames/s per stage, crops/s of the embedder, total seconds."""
        parts = [f"{st} {self.fps(st):.1f} frames/s ({self.seconds[st]:.2f} s)" for st in STAGES]
        if self.crops and self.seconds["embed"] > 0:
            parts.append(f"embed {self.crops / self.seconds['embed']:.1f} crops/s")
        return f"{self.decoded} frames decoded, {self.sampled} processed: " + ", ".join(parts) + \
            f"; {sum(self.seconds.values()):.2f} s in all"


@dataclass
class IngestResult:
    """What `ingest_video` returns: the tracklets, the per-stage speed, the video's properties."""

    tracklets: list[Tracklet]
    stats: StageStats
    info: VideoInfo


def _timed(frames: Iterator[Frame], stats: StageStats) -> Iterator[Frame]:
    """`frames`, adding the time spent producing each one to stats' decode seconds."""
    it = iter(frames)
    while True:
        t0 = time.perf_counter()
        try:
            f = next(it)
        except StopIteration:
            stats.seconds["decode"] += time.perf_counter() - t0
            return
        stats.seconds["decode"] += time.perf_counter() - t0
        yield f


def ingest_video(path: str | os.PathLike, detector: Detector | str | os.PathLike, embed: Embedder | None = None,
                 camera: int | None = None, start: float = 0.0, every: int = 1, threshold: float = 0.5,
                 progress: bool = True, *, fps: float | None = None, detect_batch: int = 8,
                 embed_batch: int = 64, activation: float = 0.6, lost_seconds: float = 1.0,
                 crop_rule: CropRule = DEFAULT_CROP_RULE, tracklet_rule: TrackletRule = DEFAULT_TRACKLET_RULE,
                 keep_crops: bool = False, max_frames: int | None = None,
                 on_frame: Callable[[Frame, np.ndarray, np.ndarray], None] | None = None) -> IngestResult:
    """Detect, track and embed the people of the video at `path`; one `Tracklet` per track.

    `detector`: a detector file (SSD-style OpenVINO IR or ONNX, `SSDDetector`, run with `threshold`)
    or a callable `frames -> boxes`; boxes below `threshold` are dropped either way. `embed`: RGB crops ->
    L2-normalised features (e.g. `extractor_embedder`), None to skip embedding. `camera` is recorded
    on the tracklets. Frame times are `start + index / fps` seconds (`fps`: the container's unless given);
    every `every`-th frame is detected. `detect_batch` frames go to the detector at once and
    `embed_batch` crops to the embedder. ByteTrack (`ByteTracker`): `activation`, `lost_seconds`.
    Best crops per `CropRule`; tracks shorter than `TrackletRule` are dropped. `keep_crops`:
    keep every tracklet's crops (RGB). `on_frame(frame, track_ids, boxes)`: called per processed frame.
    A progress bar per video when `progress`. Returns the tracklets, the per-stage speed and the video info.
    """
    from tqdm.auto import tqdm

    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    info = probe_video(path, fps)  # FileNotFoundError / ValueError before any model work
    det: Detector = SSDDetector(detector, threshold=threshold) if isinstance(detector, (str, os.PathLike)) \
        else detector
    tracker = ByteTracker(info.fps / every, activation=activation, lost_seconds=lost_seconds)
    tracks: dict[int, TrackCrops] = {}
    stats = StageStats()
    bar = tqdm(total=info.frame_count, desc=Path(path).name, unit="frame", disable=not progress, leave=False)
    reader = FrameReader(path, every, start, info.fps, max_frames)
    try:
        for batch in frame_batches(_timed(iter(reader), stats), detect_batch):
            t0 = time.perf_counter()
            boxes = det([f.image for f in batch])
            stats.seconds["detect"] += time.perf_counter() - t0
            if len(boxes) != len(batch):
                raise ValueError(f"the detector returned {len(boxes)} results for {len(batch)} frames")
            for f, b in zip(batch, boxes):
                b = np.asarray(b, dtype=np.float32).reshape(-1, 5)
                b = b[b[:, 4] >= threshold]
                t0 = time.perf_counter()
                ids, tracked = tracker.update(b)
                for tid, box in zip(ids.tolist(), tracked):
                    tracks.setdefault(tid, TrackCrops(tid, crop_rule)).add(f.image, box, f.index, f.time)
                stats.seconds["track"] += time.perf_counter() - t0
                if on_frame is not None:
                    on_frame(f, ids, tracked)
            stats.sampled += len(batch)
            bar.update(reader.decoded - stats.decoded)
            stats.decoded = reader.decoded
    finally:
        bar.close()
    stats.decoded = reader.decoded
    t0 = time.perf_counter()
    tracklets = build_tracklets(list(tracks.values()), embed, camera, str(path), tracklet_rule, embed_batch,
                                keep_crops)
    stats.seconds["embed"] = time.perf_counter() - t0 if embed is not None else 0.0
    stats.crops = sum(t.crop_count for t in tracklets) if embed is not None else 0
    return IngestResult(tracklets, stats, info)
