"""Tracklets in a gallery: one entry per person-pass through one camera, and "where did this person appear next".

A tracklet is stored as one ordinary gallery entry (a row of `crops`, one vector of the index: its
aggregate feature) whose camera is the tracklet's and whose timestamp is its start, plus one row of
the `tracklets` table with the same id: video, track id, start and end time, frames, crop count and
the best crop as a JPEG thumbnail. Its crops (JPEG) go to `tracklet_crops` when asked for. Every
ingested video is a row of `videos`, keyed by the sha256 of the file and the ingest settings, so that
ingesting the same video again adds nothing. Search, filters, removal and the HTTP API treat a
tracklet like any entry; these tables add what a crop lacks. All are plain columns (text, numbers,
bytes), so another metadata backend stores them the same way (`tracklet_table` picks the backend's).

A video's tracklets, its `videos` row and their vectors are written in one generation
(`add_tracklets`, through `GalleryWrites.add_features`): a crash before the publish leaves the gallery
as it was, with nothing of that video.

    add_tracklets(g, video, records, feats)                       # reid_lite.video.ingest_to_gallery does this
    after = search_after(g, tracklet_id, within=parse_within("20s..10min"))
    for h in after.hits: print(h.camid, h.start, h.end, h.score)  # other cameras, in time order
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .gallery import Gallery
from .querying import SearchHit
from .storage import GalleryError
from .store import CropRecord, MetadataStore, select_where_in

__all__ = ["AfterResult", "TrackletHit", "TrackletRecord", "TrackletTable", "VideoRecord", "add_tracklets",
           "parse_duration", "parse_within", "search_after", "tracklet_table", "tracklets_of_hits"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tracklets (
    id          INTEGER PRIMARY KEY,  -- = crops.id = faiss id of the tracklet's aggregate feature
    video       TEXT    NOT NULL,     -- videos.key of the ingest that found it
    track       INTEGER NOT NULL,     -- the tracker's id within that video
    camid       INTEGER,              -- 0-based camera (as crops.camid)
    start       REAL    NOT NULL,     -- seconds: time of its first box (= crops.timestamp)
    end_time    REAL    NOT NULL,     -- seconds: time of its last box
    first_frame INTEGER NOT NULL,
    last_frame  INTEGER NOT NULL,
    boxes       INTEGER NOT NULL,     -- sampled frames in which it had a box
    crop_count  INTEGER NOT NULL,     -- crops embedded into its feature
    thumbnail   BLOB                  -- its best crop, JPEG
);
CREATE INDEX IF NOT EXISTS tracklets_video ON tracklets(video);
CREATE INDEX IF NOT EXISTS tracklets_start ON tracklets(start);
CREATE TABLE IF NOT EXISTS tracklet_crops (
    id    INTEGER NOT NULL,           -- tracklets.id
    rank  INTEGER NOT NULL,           -- 0 = the best crop
    frame INTEGER NOT NULL,
    jpeg  BLOB    NOT NULL,
    PRIMARY KEY (id, rank)
);
CREATE TABLE IF NOT EXISTS videos (
    key        TEXT PRIMARY KEY,      -- sha256 of (file sha256, settings)
    sha256     TEXT NOT NULL,         -- of the video file
    path       TEXT NOT NULL,
    camid      INTEGER,
    start      REAL NOT NULL,         -- seconds: time of its frame 0
    frames     INTEGER NOT NULL,      -- frames decoded
    fps        REAL NOT NULL,
    settings   TEXT NOT NULL,         -- JSON: every, detector, thresholds, crop rule, ...
    tracklets  INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    ingested   REAL NOT NULL          -- epoch seconds
);
"""

_TRACKLET_COLUMNS = "id, video, track, camid, start, end_time, first_frame, last_frame, boxes, crop_count"


@dataclass
class TrackletRecord:
    """One stored tracklet (`id` is its gallery entry's id; -1 before it is stored)."""

    video: str
    track: int
    camid: int | None
    start: float
    end: float
    first_frame: int
    last_frame: int
    boxes: int
    crop_count: int
    id: int = -1
    thumbnail: bytes | None = field(default=None, repr=False)
    #: (frame index, JPEG) of its best crops, best first; stored only when given
    crops: list[tuple[int, bytes]] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (no image bytes)."""
        return {"id": self.id, "video": self.video, "track": self.track, "camid": self.camid, "start": self.start,
                "end": self.end, "duration": self.end - self.start, "first_frame": self.first_frame,
                "last_frame": self.last_frame, "boxes": self.boxes, "crop_count": self.crop_count}


@dataclass
class VideoRecord:
    """One ingested video: its key (file sha256 + settings), file, camera, start time and settings."""

    key: str
    sha256: str
    path: str
    camid: int | None
    start: float
    settings: dict[str, Any]
    frames: int = 0
    fps: float = 0.0
    tracklets: int = 0
    generation: int = -1
    ingested: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict."""
        return dict(self.__dict__)


class TrackletTable:
    """The tracklet tables of one generation's SQLite metadata (read-only for a published generation: a
    gallery without tracklets simply has none of these tables)."""

    def __init__(self, conn: sqlite3.Connection, writable: bool) -> None:
        self.conn = conn
        if writable:
            conn.executescript(_SCHEMA)
        self.present = bool(conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'tracklets'").fetchone())

    def insert(self, records: Sequence[TrackletRecord]) -> None:
        """Store `records` (their ids set) with their thumbnails and crops."""
        self.conn.executemany(
            f"INSERT INTO tracklets({_TRACKLET_COLUMNS}, thumbnail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(r.id, r.video, r.track, r.camid, r.start, r.end, r.first_frame, r.last_frame, r.boxes, r.crop_count,
              r.thumbnail) for r in records])
        self.conn.executemany("INSERT INTO tracklet_crops(id, rank, frame, jpeg) VALUES (?, ?, ?, ?)",
                              [(r.id, k, f, jpeg) for r in records for k, (f, jpeg) in enumerate(r.crops or [])])

    def insert_video(self, video: VideoRecord) -> None:
        """Record an ingested video."""
        self.conn.execute("INSERT INTO videos(key, sha256, path, camid, start, frames, fps, settings, tracklets, "
                          "generation, ingested) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                          (video.key, video.sha256, video.path, video.camid, video.start, video.frames, video.fps,
                           json.dumps(video.settings, sort_keys=True), video.tracklets, video.generation,
                           video.ingested))

    def get(self, ids: Sequence[int]) -> dict[int, TrackletRecord]:
        """Tracklets by id (ids that are not tracklets are absent); no image bytes."""
        if not self.present:
            return {}
        rows = select_where_in(self.conn, f"SELECT {_TRACKLET_COLUMNS} FROM tracklets", "id", [int(i) for i in ids])
        return {r[0]: TrackletRecord(id=r[0], video=r[1], track=r[2], camid=r[3], start=r[4], end=r[5],
                                     first_frame=r[6], last_frame=r[7], boxes=r[8], crop_count=r[9]) for r in rows}

    def list(self, cameras: Sequence[int] | None = None, limit: int = 1000) -> list[TrackletRecord]:
        """Tracklets in time order (of these cameras), at most `limit`."""
        if not self.present:
            return []
        where, args = "", []
        if cameras is not None:
            where = f" WHERE camid IN ({','.join('?' * len(cameras))})" if cameras else " WHERE 0"
            args = [int(c) for c in cameras]
        ids = [r[0] for r in self.conn.execute(f"SELECT id FROM tracklets{where} ORDER BY start, id LIMIT ?",
                                               [*args, int(limit)])]
        found = self.get(ids)
        return [found[i] for i in ids]

    def of_video(self, key: str) -> list[TrackletRecord]:
        """The stored tracklets of the video of this key, in time order."""
        if not self.present:
            return []
        ids = [r[0] for r in self.conn.execute("SELECT id FROM tracklets WHERE video = ? ORDER BY start, id", (key,))]
        found = self.get(ids)
        return [found[i] for i in ids]

    def count(self) -> int:
        """Stored tracklets."""
        return int(self.conn.execute("SELECT COUNT(*) FROM tracklets").fetchone()[0]) if self.present else 0

    def thumbnail(self, tracklet_id: int) -> bytes | None:
        """The JPEG thumbnail of a tracklet (None: not a tracklet)."""
        if not self.present:
            return None
        row = self.conn.execute("SELECT thumbnail FROM tracklets WHERE id = ?", (int(tracklet_id),)).fetchone()
        return None if row is None else row[0]

    def crops(self, tracklet_id: int) -> list[tuple[int, bytes]]:
        """(frame, JPEG) of a tracklet's stored crops, best first (empty when they were not kept)."""
        if not self.present:
            return []
        return [(r[0], r[1]) for r in self.conn.execute(
            "SELECT frame, jpeg FROM tracklet_crops WHERE id = ? ORDER BY rank", (int(tracklet_id),))]

    def video(self, key: str) -> VideoRecord | None:
        """The ingested video of this key, or None."""
        found = self.videos(key=key)
        return found[0] if found else None

    def videos(self, sha256: str | None = None, key: str | None = None) -> list[VideoRecord]:
        """Ingested videos (of this file content / key), in ingest order."""
        if not self.present:
            return []
        where, args = [], []
        if sha256 is not None:
            where.append("sha256 = ?")
            args.append(sha256)
        if key is not None:
            where.append("key = ?")
            args.append(key)
        sql = ("SELECT key, sha256, path, camid, start, settings, frames, fps, tracklets, generation, ingested "
               "FROM videos" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY ingested, key")
        return [VideoRecord(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), *r[6:])
                for r in self.conn.execute(sql, args)]

    def video_count(self) -> int:
        """Ingested videos."""
        return int(self.conn.execute("SELECT COUNT(*) FROM videos").fetchone()[0]) if self.present else 0


def tracklet_table(store: Any, writable: bool = False) -> TrackletTable:
    """The tracklet tables of a generation's metadata `store`: the backend's own (`store.tracklet_table()`),
    or those of the SQLite `MetadataStore`."""
    if hasattr(store, "tracklet_table"):
        return store.tracklet_table(writable)
    if isinstance(store, MetadataStore):
        return TrackletTable(store.conn, writable and not store.readonly)
    if writable:
        raise GalleryError(f"this gallery's metadata backend ({type(store).__name__}) stores no tracklets yet")
    return TrackletTable(sqlite3.connect(":memory:", check_same_thread=False), False)  # reads as none


def add_tracklets(gallery: Gallery, video: VideoRecord, records: Sequence[TrackletRecord],
                  entries: Sequence[CropRecord], feats: np.ndarray, lock_timeout: float | None = None
                  ) -> tuple[VideoRecord, bool]:
    """Store one video's tracklets in one new generation: their gallery `entries` (one `CropRecord` each, in the
    order of `records`) with their aggregate features `feats`, their `records` and the `video` row.

    Returns (the video as stored, True), or (the video stored earlier, False) when a video of the same key
    is already in the gallery (then nothing is written). A video with no tracklet writes nothing."""
    feats = np.asarray(feats, np.float32)
    if len(records) != len(entries) or len(feats) != len(records):
        raise ValueError(f"got {len(records)} tracklets, {len(entries)} entries and {len(feats)} features")
    by_hash = {e.sha256: r for e, r in zip(entries, records)}
    with gallery.writing(lock_timeout):
        known = tracklet_table(gallery.store).video(video.key)
        if known is not None:
            return known, False
        if not records:
            return video, True

        def write_rows(store: Any, ids: np.ndarray, new: Sequence[CropRecord], generation: int) -> None:
            table = tracklet_table(store, writable=True)
            rows = []
            for i, e in zip(ids.tolist(), new):
                r = by_hash[e.sha256]
                r.id = int(i)
                rows.append(r)
            table.insert(rows)
            video.tracklets, video.ingested = len(rows), time.time()
            video.generation = generation
            table.insert_video(video)

        gallery.add_features(list(entries), feats, after_insert=write_rows)
    return video, True


# ---------------------------------------------------------------------------- where did this person go next

_UNITS = {"ms": 1e-3, "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0, "m": 60.0, "min": 60.0,
          "mins": 60.0, "minute": 60.0, "minutes": 60.0, "h": 3600.0, "hr": 3600.0, "hour": 3600.0,
          "hours": 3600.0, "d": 86400.0, "day": 86400.0, "days": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$")


def parse_duration(text: str) -> float:
    """Seconds of a duration: '20s', '10min', '1.5h', '90' (seconds); ValueError naming the text otherwise."""
    m = _DURATION.match(str(text).lower())
    if not m or m.group(2) not in {"", *_UNITS}:
        raise ValueError(f"duration {text!r} is not a number with a unit (ms, s, min, h, d), e.g. 20s or 10min")
    return float(m.group(1)) * (_UNITS[m.group(2)] if m.group(2) else 1.0)


def parse_within(text: str) -> tuple[float, float]:
    """The transition window `A..B` in seconds (e.g. '20s..10min'; '..10min' starts at 0, '20s..' has no end):
    a hit counts when it starts between A and B after the query tracklet ends. A negative A ('-1min..1min')
    also takes hits that start before it ends (overlapping camera views; every tracklet around it)."""
    if ".." not in str(text):
        raise ValueError(f"--within {text!r}: expected a window FROM..TO, e.g. 20s..10min (either side may be empty)")
    a, b = str(text).split("..", 1)
    a = a.strip()
    lo = (-parse_duration(a[1:]) if a.startswith("-") else parse_duration(a)) if a else 0.0
    hi = parse_duration(b) if b.strip() else math.inf
    if hi < lo:
        raise ValueError(f"--within {text!r}: the window ends before it starts")
    return lo, hi


@dataclass
class TrackletHit:
    """A gallery hit for a tracklet query: the search hit and, when the hit is a tracklet, its span."""

    hit: SearchHit
    tracklet: TrackletRecord | None

    @property
    def start(self) -> float | None:
        """When it begins (the tracklet's start, or a crop's timestamp)."""
        return self.tracklet.start if self.tracklet is not None else self.hit.timestamp

    @property
    def end(self) -> float | None:
        """When it ends (a crop's timestamp: a crop is an instant)."""
        return self.tracklet.end if self.tracklet is not None else self.hit.timestamp

    def to_dict(self) -> dict[str, Any]:
        """The hit's fields plus `start`, `end` and `tracklet` (None for a plain crop)."""
        return {**self.hit.to_dict(), "start": self.start, "end": self.end,
                "tracklet": None if self.tracklet is None else self.tracklet.to_dict()}


@dataclass
class AfterResult:
    """Answer of `search_after`: the query tracklet, the time window searched (absolute seconds) and the
    hits in time order (each keeps its similarity rank)."""

    query: TrackletRecord
    window: tuple[float, float]
    hits: list[TrackletHit]
    notes: list[str]
    threshold: float | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (an open window end is null)."""
        return {"query": self.query.to_dict(), "window": [w if math.isfinite(w) else None for w in self.window],
                "hits": [h.to_dict() for h in self.hits], "notes": self.notes, "threshold": self.threshold}


def tracklets_of_hits(gallery: Gallery, hits: Sequence[SearchHit]) -> list[TrackletHit]:
    """Each hit with its tracklet (None for a plain crop)."""
    found = tracklet_table(gallery.store).get([h.id for h in hits])
    return [TrackletHit(h, found.get(h.id)) for h in hits]


def search_after(gallery: Gallery, tracklet_id: int, within: tuple[float, float] = (0.0, math.inf), k: int = 10,
                 *, same_camera: bool = False, cameras: Sequence[int] | None = None,
                 nprobe: int | None = None) -> AfterResult:
    """Where did the person of tracklet `tracklet_id` appear next: the `k` most similar entries that start
    between `within[0]` and `within[1]` seconds after it ends, on other cameras (also its own with
    `same_camera`; only `cameras` when given), returned in time order. KeyError for an id that is not a
    tracklet of this gallery."""
    query = tracklet_table(gallery.store).get([tracklet_id]).get(int(tracklet_id))
    if query is None:
        what = "an entry but not a tracklet" if gallery.store.get([tracklet_id]) else "no entry"
        raise KeyError(f"{tracklet_id} is {what} of this gallery (ingest video to get tracklets)")
    lo, hi = within
    if hi < lo:
        raise ValueError(f"the window must satisfy from <= to, got {lo}..{hi}")
    window = (query.end + lo, query.end + hi)  # hi may be inf: no end
    if not same_camera and query.camid is None:
        raise ValueError(f"tracklet {tracklet_id} has no camera, so 'other cameras' means nothing: use same_camera")
    feats = gallery.crop_features([query.id])
    results = gallery.search(feats, k=k + 1, camids=[query.camid], exclude_same_camera=not same_camera,
                             cameras=cameras, time_window=(window[0] if math.isfinite(lo) else None,
                                                           window[1] if math.isfinite(hi) else None), nprobe=nprobe)
    hits = [h for h in results[0] if h.id != query.id][:k]
    for rank, h in enumerate(hits, 1):
        h.rank = rank
    found = tracklets_of_hits(gallery, hits)
    found.sort(key=lambda t: (t.start if t.start is not None else math.inf, t.hit.rank))
    return AfterResult(query, window, found, list(results.notes), results.threshold)
