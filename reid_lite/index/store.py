"""SQLite metadata of a gallery: one row per stored crop, plus key/value gallery metadata.

The row id *is* the faiss id of the crop's vector, so a search result maps to its metadata with one
primary-key lookup. Ids are allocated monotonically and never reused (``meta.next_id``), so an id
removed in one generation can never alias a different crop in a later one.

A published generation's database is immutable: readers open it with ``mode=ro&immutable=1`` (no
journal, no lock files written into a published directory); only a writer's private copy inside an
unpublished generation directory is ever opened read-write.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DEPENDENT_TABLES", "CropRecord", "MetadataStore", "SCHEMA_VERSION", "select_where_in"]

#: Values bound per query by `select_where_in`: below SQLite's bound-parameter limit (999 in old builds).
IN_CHUNK = 900

SCHEMA_VERSION = 1

def select_where_in(conn: sqlite3.Connection, select: str, column: str, values: Iterable[Any]) -> Iterator[tuple]:
    """Rows of `select` (a `SELECT ... FROM table` without WHERE) whose `column` is one of `values`, queried
    IN_CHUNK values at a time so that no query binds more parameters than SQLite allows."""
    values = list(values)
    for start in range(0, len(values), IN_CHUNK):
        chunk = values[start:start + IN_CHUNK]
        yield from conn.execute(f"{select} WHERE {column} IN ({','.join('?' * len(chunk))})", chunk)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS crops (
    id            INTEGER PRIMARY KEY,        -- = faiss id
    path          TEXT    NOT NULL,
    sha256        TEXT    NOT NULL UNIQUE,    -- content hash: the same crop bytes are stored once
    camid         INTEGER,                    -- 0-based camera id (file name c1 -> 0), NULL if unknown
    timestamp     REAL,                       -- seconds (epoch or frame clock) for time-window filters
    timestamp_raw TEXT,                       -- the value as given (e.g. an ISO 8601 string)
    identity      INTEGER,                    -- person id when known (pid), else NULL
    track         TEXT,                       -- tracker id when known, else NULL
    generation    INTEGER NOT NULL            -- generation that added the crop
);
CREATE INDEX IF NOT EXISTS crops_camid ON crops(camid);
CREATE INDEX IF NOT EXISTS crops_timestamp ON crops(timestamp);
CREATE INDEX IF NOT EXISTS crops_path ON crops(path);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class CropRecord:
    """Metadata of one crop (``id`` is its faiss id; -1 before insertion)."""

    path: str
    sha256: str
    camid: int | None = None
    timestamp: float | None = None
    timestamp_raw: str | None = None
    identity: int | None = None
    track: str | None = None
    id: int = -1
    generation: int = -1

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict of the fields."""
        return {"id": self.id, "path": self.path, "sha256": self.sha256, "camid": self.camid,
                "timestamp": self.timestamp, "timestamp_raw": self.timestamp_raw,
                "identity": self.identity, "track": self.track, "generation": self.generation}


#: Tables whose rows belong to a crop row (their `id` column is its id) and are deleted with it; created by
#: the modules that use them (reid_lite.index.tracklets), absent from galleries that never needed them.
DEPENDENT_TABLES = ("tracklets", "tracklet_crops")

_COLUMNS = "id, path, sha256, camid, timestamp, timestamp_raw, identity, track, generation"


def _row_to_record(row: Sequence[Any]) -> CropRecord:
    return CropRecord(id=row[0], path=row[1], sha256=row[2], camid=row[3], timestamp=row[4],
                      timestamp_raw=row[5], identity=row[6], track=row[7], generation=row[8])


class MetadataStore:
    """Thin typed wrapper over one SQLite file (see the module docstring for the schema)."""

    def __init__(self, path: str | Path, readonly: bool = True) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._columns: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # `columns()`, until a row changes
        if readonly:
            if not self.path.is_file():
                raise FileNotFoundError(f"gallery metadata not found: {self.path}")
            uri = f"file:{self.path.resolve()}?mode=ro&immutable=1"
            self.conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        else:
            self.conn = sqlite3.connect(str(self.path), check_same_thread=False)
            # The file is private to one writer until it is published; a rollback journal that is
            # deleted on commit leaves a single self-contained file to checksum and publish.
            self.conn.execute("PRAGMA journal_mode=DELETE")
            self.conn.execute("PRAGMA synchronous=FULL")
            # A removed crop's row is overwritten, not left in a free page: after `remove --purge`
            # (older generations dropped) its path and hash are gone from the disk.
            self.conn.execute("PRAGMA secure_delete=ON")
            self.conn.executescript(_SCHEMA)
            if self.get_meta("schema_version") is None:
                self.set_meta("schema_version", SCHEMA_VERSION)
                self.set_meta("next_id", 0)
            self.conn.commit()

    # -- key/value -------------------------------------------------------------------------------
    def get_meta(self, key: str, default: Any = None) -> Any:
        """JSON-decoded value of ``key`` in the meta table, or ``default``."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_meta(self, key: str, value: Any) -> None:
        """Store ``value`` (JSON-encodable) under ``key``."""
        self.conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, json.dumps(value)))

    # -- crops -----------------------------------------------------------------------------------
    def count(self) -> int:
        """Number of stored crops."""
        return int(self.conn.execute("SELECT COUNT(*) FROM crops").fetchone()[0])

    def known_hashes(self, hashes: Iterable[str]) -> set[str]:
        """The subset of ``hashes`` already stored."""
        return {r[0] for r in select_where_in(self.conn, "SELECT sha256 FROM crops", "sha256", hashes)}

    def insert(self, records: Sequence[CropRecord], generation: int) -> np.ndarray:
        """Insert ``records`` with fresh ids (returned, int64, contiguous and increasing)."""
        start = int(self.get_meta("next_id", 0))
        ids = np.arange(start, start + len(records), dtype=np.int64)
        self.conn.executemany(
            f"INSERT INTO crops({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(int(i), r.path, r.sha256, r.camid, r.timestamp, r.timestamp_raw, r.identity, r.track, generation)
             for i, r in zip(ids, records)])
        self.set_meta("next_id", start + len(records))
        self._columns = None
        return ids

    def delete(self, ids: Sequence[int]) -> None:
        """Delete the rows of ``ids``."""
        self.conn.executemany("DELETE FROM crops WHERE id = ?", [(int(i),) for i in ids])
        present = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for table in DEPENDENT_TABLES:
            if table in present:
                self.conn.executemany(f"DELETE FROM {table} WHERE id = ?", [(int(i),) for i in ids])
        self._columns = None

    def get(self, ids: Sequence[int]) -> dict[int, CropRecord]:
        """Records by id (missing ids are absent from the result)."""
        rows = select_where_in(self.conn, f"SELECT {_COLUMNS} FROM crops", "id", [int(i) for i in ids])
        return {row[0]: _row_to_record(row) for row in rows}

    def ids_where(self, cameras: Sequence[int] | None = None, exclude_cameras: Sequence[int] | None = None,
                  time_from: float | None = None, time_to: float | None = None,
                  paths: Sequence[str] | None = None) -> np.ndarray:
        """Sorted int64 ids of the crops matching every given condition.

        ``time_from``/``time_to`` are inclusive; crops without a timestamp never match a time window.
        """
        where: list[str] = []
        args: list[Any] = []
        if cameras is not None:
            where.append(f"camid IN ({','.join('?' * len(cameras))})" if cameras else "0")
            args += [int(c) for c in cameras]
        if exclude_cameras:
            # NULL cameras are kept: "not the query's camera" is true of an unknown camera.
            where.append(f"(camid IS NULL OR camid NOT IN ({','.join('?' * len(exclude_cameras))}))")
            args += [int(c) for c in exclude_cameras]
        if time_from is not None:
            where.append("timestamp >= ?")
            args.append(float(time_from))
        if time_to is not None:
            where.append("timestamp <= ?")
            args.append(float(time_to))
        if paths is not None:
            where.append(f"path IN ({','.join('?' * len(paths))})" if paths else "0")
            args += list(paths)
        sql = "SELECT id FROM crops" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id"
        return np.fromiter((r[0] for r in self.conn.execute(sql, args)), dtype=np.int64)

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, cameras with -1 for unknown, timestamps with NaN for none) of every row, in id order; read once
        and kept until a row is inserted or deleted: fetching ~1M ids row by row from SQLite per query would cost
        a second (bench), this costs ms. What search filters are evaluated on, in numpy."""
        if self._columns is None:
            rows = self.conn.execute("SELECT id, camid, timestamp FROM crops ORDER BY id").fetchall()
            arr = np.array([(r[0], -1 if r[1] is None else r[1], np.nan if r[2] is None else r[2]) for r in rows],
                           dtype=np.float64).reshape(-1, 3)
            self._columns = (arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64), arr[:, 2])
        return self._columns

    def matching(self, cameras: Sequence[int] | None, exclude_camera: int | None, time_from: float | None,
                 time_to: float | None) -> np.ndarray:
        """Sorted ids of the crops passing a search's filters (from `columns()`, in numpy): cameras in `cameras`,
        not `exclude_camera` (unknown cameras are kept, as in `ids_where`), timestamp within [time_from, time_to]."""
        ids, cams, ts = self.columns()
        mask = np.ones(len(ids), bool)
        if cameras is not None:
            mask &= np.isin(cams, np.asarray(list(cameras), np.int64))
        if exclude_camera is not None:
            mask &= cams != exclude_camera
        with np.errstate(invalid="ignore"):  # NaN (no timestamp) never satisfies a time window
            if time_from is not None:
                mask &= ts >= time_from
            if time_to is not None:
                mask &= ts <= time_to
        return ids[mask]

    def has_cameras(self, cameras: Sequence[int]) -> bool:
        """Whether any crop is from one of `cameras`."""
        _, cams, _ = self.columns()
        return bool(np.isin(cams, np.asarray(list(cameras), np.int64)).any())

    def time_span(self) -> tuple[float, float] | None:
        """(earliest, latest) timestamp of the crops, None when none has one."""
        row = self.conn.execute("SELECT MIN(timestamp), MAX(timestamp) FROM crops").fetchone()
        return None if row[0] is None else (float(row[0]), float(row[1]))

    def has_identity(self) -> bool:
        """Whether any crop has a known identity."""
        return self.conn.execute("SELECT 1 FROM crops WHERE identity IS NOT NULL LIMIT 1").fetchone() is not None

    def ids_of_hashes(self, hashes: Sequence[str]) -> dict[str, int]:
        """Content hash -> id of the stored crops among `hashes`."""
        return {r[0]: int(r[1]) for r in select_where_in(self.conn, "SELECT sha256, id FROM crops", "sha256", hashes)}

    def all_ids(self) -> np.ndarray:
        """Every stored id, sorted."""
        return self.ids_where()

    def cameras(self) -> dict[int | None, int]:
        """Crops per camera id."""
        rows = self.conn.execute("SELECT camid, COUNT(*) FROM crops GROUP BY camid ORDER BY camid")
        return {r[0]: r[1] for r in rows}

    def commit(self) -> None:
        """Commit pending writes."""
        self.conn.commit()

    def close(self) -> None:
        """Close the connection (commits nothing)."""
        self.conn.close()
