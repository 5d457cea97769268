"""Camera video into a gallery: one entry per tracklet (`reid-gallery ingest`).

    g = Gallery.open("/data/gallery")
    report = ingest_to_gallery(g, "cam1.mp4", SSDDetector("det.xml", threshold=0.5), camera=1,
                               start="2026-12-04T09:00:00", every=5)
    print(report.added, len(report.tracklets), report.stats.summary())

The video runs through `reid_lite.video.ingest_video` with the gallery's own model as the embedder
(token merging as the gallery's config says; the camera SIE given `camera`), then its tracklets are
stored by `reid_lite.index.tracklets.add_tracklets` in one new generation. So a crash or Ctrl-C
before that publish leaves the gallery exactly as it was, and the next run does the video again.

A video is known by the sha256 of its file and the settings that shape its tracklets (camera, start,
frame rate, every, detector file and thresholds, tracker and crop rules): the same file ingested again
with the same settings is skipped before it is decoded; with other settings it is ingested again (and
a warning says so), since its tracklets may differ.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..index.crops import to_seconds
from ..index.gallery import Gallery
from ..index.store import CropRecord
from ..index.tracklets import TrackletRecord, VideoRecord, add_tracklets, tracklet_table
from ..utils.files import sha256_file
from ..utils.text import count
from .crops import CropRule
from .decode import Frame, probe_video
from .detect import Detector, SSDDetector
from .embed import extractor_embedder
from .pipeline import DEFAULT_CROP_RULE, DEFAULT_TRACKLET_RULE, StageStats, ingest_video
from .tracklets import Tracklet, TrackletRule, jpeg_bytes

__all__ = ["VideoIngestReport", "detector_identity", "ingest_to_gallery", "is_iso_time", "video_key"]


@dataclass
class VideoIngestReport:
    """What ingesting one video did: its key, whether it was added (False: already in the gallery), the tracklets
    stored (or found earlier), the per-stage speed (None when skipped), the generation, the video's length."""

    path: str
    key: str
    added: bool
    tracklets: list[TrackletRecord]
    generation: int
    start: float
    frames: int
    fps: float
    stats: StageStats | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def end(self) -> float:
        """Time just after the last frame: where a following video of the same camera starts."""
        return self.start + self.frames / self.fps if self.fps else self.start

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict."""
        return {"path": self.path, "key": self.key, "added": self.added, "generation": self.generation,
                "start": self.start, "end": self.end, "frames": self.frames, "fps": self.fps,
                "tracklets": [t.to_dict() for t in self.tracklets], "seconds": self.seconds, "notes": self.notes,
                "speed": None if self.stats is None else {
                    "summary": self.stats.summary(), "frames_per_second": {
                        s: self.stats.fps(s) for s in ("decode", "detect", "track", "embed")
                        if np.isfinite(self.stats.fps(s))}}}


def detector_identity(detector: Detector | str | os.PathLike) -> str:
    """What names a detector in a video's key: the sha256 of its file(s) (an IR's .xml and .bin), else the
    callable's qualified name."""
    path = getattr(detector, "path", detector)
    if isinstance(path, (str, os.PathLike)) and Path(path).is_file():
        p = Path(path)
        files = [p, p.with_suffix(".bin")] if p.suffix.lower() == ".xml" else [p]
        return "sha256:" + hashlib.sha256("".join(sha256_file(f) for f in files if f.is_file()).encode()).hexdigest()
    name = getattr(detector, "__qualname__", type(detector).__name__)
    return f"callable:{getattr(detector, '__module__', '?')}.{name}"


def video_key(sha256: str, settings: dict[str, Any]) -> str:
    """The key of a video in a gallery: sha256 of its file's sha256 and its ingest settings."""
    return hashlib.sha256(json.dumps({"sha256": sha256, **settings}, sort_keys=True).encode()).hexdigest()


def _time_text(seconds: float, iso: bool) -> str:
    if iso:
        return _dt.datetime.fromtimestamp(seconds, tz=_dt.timezone.utc).isoformat(timespec="milliseconds")
    return f"{seconds:.2f}"


def _records(tracklets: list[Tracklet], key: str, path: str, camera: int, iso: bool, keep_crops: bool
             ) -> tuple[list[TrackletRecord], list[CropRecord]]:
    """The stored form of the pipeline's tracklets: a TrackletRecord and a gallery entry each."""
    records, entries = [], []
    for t in tracklets:
        records.append(TrackletRecord(
            video=key, track=t.track_id, camid=camera, start=t.start, end=t.end, first_frame=t.first_frame,
            last_frame=t.last_frame, boxes=t.hits, crop_count=t.crop_count, thumbnail=t.thumbnail_jpeg(),
            crops=[(f, jpeg_bytes(c)) for f, c in zip(t.crop_frames, t.crops)] if keep_crops and t.crops else None))
        # The entry's path names the video and track (it is no image file: the thumbnail is in the metadata);
        # its hash is the tracklet's identity (video key and track), unique in the gallery.
        entries.append(CropRecord(path=f"{path}#track{t.track_id}",
                                  sha256=hashlib.sha256(f"{key}:{t.track_id}".encode()).hexdigest(),
                                  camid=camera, timestamp=t.start, timestamp_raw=_time_text(t.start, iso),
                                  track=str(t.track_id)))
    return records, entries


def ingest_to_gallery(gallery: Gallery, path: str | os.PathLike, detector: Detector | str | os.PathLike, *,
                      camera: int, start: float | str = 0.0, every: int = 1, threshold: float = 0.5,
                      keep_crops: bool = False, progress: bool = True, fps: float | None = None,
                      detect_batch: int = 8, embed_batch: int | None = None, activation: float = 0.6,
                      lost_seconds: float = 1.0, crop_rule: CropRule = DEFAULT_CROP_RULE,
                      tracklet_rule: TrackletRule = DEFAULT_TRACKLET_RULE, lock_timeout: float | None = None,
                      on_frame: Callable[[Frame, np.ndarray, np.ndarray], None] | None = None) -> VideoIngestReport:
    """Detect, track and embed the people of one video and store one gallery entry per tracklet.

    `camera`: the video's 0-based camera. `start`: time of its frame 0 (seconds, or ISO 8601: the entries'
    times are then shown in ISO 8601). `detector`: an SSD-style file (run with `threshold`) or a callable
    (`reid_lite.video.detect`). `keep_crops`: store each tracklet's best crops (JPEG) besides its
    thumbnail. The rest as `reid_lite.video.ingest_video`. Returns what was stored, or, when the
    gallery already holds this video with these settings, what it holds (`added` False, nothing decoded).
    """
    t0 = time.perf_counter()
    start_seconds = to_seconds(start)
    assert start_seconds is not None
    iso = is_iso_time(start)
    info = probe_video(path, fps)  # a missing or unreadable video fails before anything else
    gallery.check_cameras([CropRecord(path=str(path), sha256="", camid=camera)], what="video")
    if isinstance(detector, (str, os.PathLike)):
        detector = SSDDetector(detector, threshold=threshold, batch_size=detect_batch)
    sha = sha256_file(path)
    settings = {"camera": camera, "start": start_seconds, "fps": info.fps, "every": every, "threshold": threshold,
                "detector": detector_identity(detector), "activation": activation, "lost_seconds": lost_seconds,
                "crop_rule": dataclasses.asdict(crop_rule), "tracklet_rule": dataclasses.asdict(tracklet_rule),
                "keep_crops": keep_crops, "model": gallery.fingerprint.get("weights")}
    key = video_key(sha, settings)
    table = tracklet_table(gallery.store)
    known = table.video(key)
    name = str(Path(path).resolve())
    if known is not None:
        return _skipped(gallery, known, name, time.perf_counter() - t0)
    notes = [f"{path} was ingested before with other settings (as camera {v.camid} from {v.start:.2f} s, "
             f"{count(v.tracklets, 'tracklet')}, generation {v.generation}); its tracklets are added again"
             for v in table.videos(sha256=sha)]
    sie = bool(gallery.fingerprint["architecture"]["sie_camera"])
    embed = extractor_embedder(gallery.extractor(), camera=camera if sie else None, post=gallery.normalize_features)
    result = ingest_video(path, detector, embed, camera=camera, start=start_seconds, every=every,
                          threshold=threshold, progress=progress, fps=info.fps, detect_batch=detect_batch,
                          embed_batch=embed_batch or int(gallery.cfg.TEST.IMS_PER_BATCH), activation=activation,
                          lost_seconds=lost_seconds, crop_rule=crop_rule, tracklet_rule=tracklet_rule,
                          keep_crops=keep_crops, on_frame=on_frame)
    records, entries = _records(result.tracklets, key, name, camera, iso, keep_crops)
    feats = np.stack([t.feature for t in result.tracklets]) if result.tracklets else np.zeros((0, gallery.dim))
    video = VideoRecord(key=key, sha256=sha, path=name, camid=camera, start=start_seconds, settings=settings,
                        frames=result.stats.decoded, fps=info.fps)
    stored, added = add_tracklets(gallery, video, records, entries, feats, lock_timeout=lock_timeout)
    if not added:  # another writer stored the same video while this one was decoding it
        return _skipped(gallery, stored, name, time.perf_counter() - t0)
    if not records:
        notes.append(f"no tracklet found in {path}; nothing was written")
    return VideoIngestReport(name, key, True, records, gallery.generation, start_seconds, result.stats.decoded,
                             info.fps, result.stats, time.perf_counter() - t0, notes)


def _skipped(gallery: Gallery, known: VideoRecord, path: str, seconds: float) -> VideoIngestReport:
    found = tracklet_table(gallery.store).of_video(known.key)
    return VideoIngestReport(path, known.key, False, found, gallery.generation, known.start, known.frames,
                             known.fps, None, seconds,
                             [f"already in the gallery (generation {known.generation}, "
                              f"{count(known.tracklets, 'tracklet')}): skipped"])


def is_iso_time(value: float | str) -> bool:
    """Whether a time as given is an ISO 8601 string (not a number of seconds)."""
    try:
        float(value)
    except ValueError:
        return True
    return False
