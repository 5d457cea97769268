"""A gallery in PostgreSQL with pgvector: one schema per gallery, one row per crop, many writers at once.

    reid-gallery build "postgresql://reid@db:5432/city?gallery=cams" crops/ --config cfg.yml
    reid-gallery add   "postgresql://reid@/city?host=/run/postgresql&gallery=cams" more/   # a Unix socket

Any libpq connection URI names the database; its `gallery` parameter (default `default`; lower-case letters,
digits, `_`) names the gallery, stored in the schema `reid_<gallery>`:

    crops  (id bigint PRIMARY KEY, path, sha256 UNIQUE, camid, timestamp, timestamp_raw, identity, track,
            generation, embedding vector(D))       + btree indexes on camid, timestamp, path
           + crops_embedding_hnsw: HNSW (vector_cosine_ops), unless the gallery was built with --index flat
             (exact search: a sequential scan) or D > 2000 (pgvector's HNSW limit)
    meta   (key PRIMARY KEY, value jsonb)          fingerprint, config, calibration, ... (as a folder's meta table)
    state  (one row: generation, commits, dim, index parameters)
    crop_ids, generations                          sequences: ids and generation numbers, never reused

Writers take no lock: each write (`add`, `remove`, a calibration) is one transaction, committed at the gallery's
"published" stage; a writer killed before that leaves nothing (the server rolls its transaction back), and
readers see only committed rows. A crop whose content hash a concurrent writer stored first is skipped by the
UNIQUE constraint (`INSERT ... ON CONFLICT DO NOTHING`; `insert` returns -1 for it). The one serialised step is
the update of the `state` row at commit, which is what a long-running reader (`LiveGallery`) polls. A build
creates `reid_<gallery>__staging` in one transaction and renames it into place at publish (dropping the gallery
it overwrites in the same transaction), so a failed build leaves nothing and readers of an overwritten gallery
are blocked only for the rename.

psycopg 3 and the server's pgvector extension are the `postgres` extra (`pip install 'reid_lite[postgres]'`);
psycopg is imported only when a PostgreSQL gallery is used.
"""

from __future__ import annotations

import contextlib
import json
import re
import struct
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

from .storage import GalleryCorrupt, GalleryError, StageCallback, StagedGeneration
from .store import CropRecord
from .vector_index import IndexParams, VectorIndexError

__all__ = ["DEFAULT_GALLERY", "FORMAT", "HNSW_MAX_DIM", "PgMetadata", "PgSelection", "PgStagedGeneration",
           "PgVectorIndex", "PostgresStorage", "parse_gallery_uri", "redact_uri"]

FORMAT = "reid-gallery-postgres/1"
DEFAULT_GALLERY = "default"
#: pgvector 0.6 indexes vectors of at most this many dimensions (a 3840-d 'full' feature is searched exactly).
HNSW_MAX_DIM = 2000
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
_COLUMNS = "id, path, sha256, camid, timestamp, timestamp_raw, identity, track, generation"
_CHUNK = 50_000  # rows per INSERT / COPY statement
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_COPY_TRAILER = struct.pack(">h", -1)


def _psycopg() -> Any:
    """The psycopg module, or a one-line GalleryError naming the extra to install."""
    try:
        import psycopg
    except ImportError:
        raise GalleryError("a PostgreSQL gallery needs psycopg 3: pip install 'reid_lite[postgres]'") from None
    return psycopg


def parse_gallery_uri(uri: str) -> tuple[str, str]:
    """(libpq connection URI without the `gallery` parameter, gallery name) of a gallery URI; ValueError for a
    name that is not lower-case letters, digits and `_` (at most 40, starting with a letter)."""
    parts = urlsplit(uri)
    query = parse_qsl(parts.query, keep_blank_values=True)
    names = [v for k, v in query if k == "gallery"]
    name = names[-1] if names else DEFAULT_GALLERY
    if not _NAME.match(name):
        raise ValueError(f"gallery name {name!r} in {redact_uri(uri)}: use lower-case letters, digits and _ (at most "
                         "40, starting with a letter)")
    rest = urlencode([(k, v) for k, v in query if k != "gallery"], safe="/")
    return urlunsplit((parts.scheme, parts.netloc, parts.path, rest, parts.fragment)), name


def redact_uri(uri: str) -> str:
    """`uri` with its password, if any, replaced by ***: what messages and `info()` show."""
    parts = urlsplit(uri)
    if not parts.password:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def vectors_to_copy(ids: np.ndarray, vectors: np.ndarray) -> bytes:
    """A binary COPY stream of (id bigint, embedding vector) rows: pgvector's binary form is int16 dim, int16 0,
    then the float4 values, big-endian like the rest of the format."""
    dim = vectors.shape[1]
    row = np.dtype([("fields", ">i2"), ("id_len", ">i4"), ("id", ">i8"), ("vec_len", ">i4"), ("dim", ">i2"),
                    ("unused", ">i2"), ("v", ">f4", (dim,))])
    rows = np.empty(len(ids), row)
    rows["fields"], rows["id_len"], rows["vec_len"], rows["dim"], rows["unused"] = 2, 8, 4 + 4 * dim, dim, 0
    rows["id"] = ids
    rows["v"] = vectors
    return _COPY_HEADER + rows.tobytes() + _COPY_TRAILER


def vectors_from_copy(data: bytes, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64, float32 (N, dim) vectors) of a binary COPY of (id, embedding) rows (`vectors_to_copy`'s form)."""
    row = np.dtype([("fields", ">i2"), ("id_len", ">i4"), ("id", ">i8"), ("vec_len", ">i4"), ("dim", ">i2"),
                    ("unused", ">i2"), ("v", ">f4", (dim,))])
    body = data[len(_COPY_HEADER):len(data) - len(_COPY_TRAILER)]
    if not data.startswith(_COPY_HEADER) or len(body) % row.itemsize:
        raise GalleryCorrupt(f"unexpected binary COPY of {dim}-d vectors ({len(data)} bytes)")
    rows = np.frombuffer(body, row)
    if len(rows) and (rows["dim"] != dim).any():
        raise GalleryCorrupt(f"a stored vector is not {dim}-d")
    return rows["id"].astype(np.int64), rows["v"].astype(np.float32)


def _vector_text(v: np.ndarray) -> str:
    """A vector literal ('[x,y,...]') with float32 round-trip precision."""
    return "[" + ",".join(map(repr, np.asarray(v, np.float32).tolist())) + "]"


@dataclass
class PgStagedGeneration(StagedGeneration):
    """A write in progress: its own connection with an open transaction, the schema it writes into (the live one,
    or `<schema>__staging` for a build), and whether it was committed."""

    conn: Any = None
    schema: str = ""
    building: bool = False
    published: bool = False
    index: dict[str, Any] = field(default_factory=dict)


class PgSelection:
    """The crops passing a search's filters, as SQL (a `WHERE` condition and its parameters): what
    `PgMetadata.matching` returns and `PgVectorIndex.search` takes as `allowed`; `len()` counts them."""

    def __init__(self, store: PgMetadata, where: str, params: dict[str, Any]) -> None:
        self.store = store
        self.where = where
        self.params = params

    def __len__(self) -> int:
        row = self.store.conn.execute(f"SELECT count(*) FROM {self.store.table} WHERE {self.where}",
                                      self.params).fetchone()
        return int(row[0])


def _where(cameras: Sequence[int] | None = None, exclude_cameras: Sequence[int] | None = None,
           time_from: float | None = None, time_to: float | None = None, paths: Sequence[str] | None = None
           ) -> tuple[str, dict[str, Any]]:
    """A WHERE condition with named parameters for these filters (those of `MetadataStore.ids_where`)."""
    where, params = ["TRUE"], {}
    if cameras is not None:
        where.append("camid = ANY(%(cameras)s)")
        params["cameras"] = [int(c) for c in cameras]
    if exclude_cameras:
        where.append("(camid IS NULL OR NOT camid = ANY(%(exclude)s))")  # an unknown camera is not the query's
        params["exclude"] = [int(c) for c in exclude_cameras]
    if time_from is not None:
        where.append("timestamp >= %(time_from)s")
        params["time_from"] = float(time_from)
    if time_to is not None:
        where.append("timestamp <= %(time_to)s")
        params["time_to"] = float(time_to)
    if paths is not None:
        where.append("path = ANY(%(paths)s)")
        params["paths"] = list(paths)
    return " AND ".join(where), params


class PgMetadata:
    """The crops table and meta table of a PostgreSQL gallery (the `CropMetadata` of `PostgresStorage`).

    A reader's store queries through its thread's connection (autocommit: each query sees every committed
    write); a writer's store through its staged transaction. `commit` and `close` do nothing: the transaction
    is committed by `PostgresStorage.publish`, the connections are closed by the storage."""

    def __init__(self, storage: PostgresStorage, stage: PgStagedGeneration | None = None) -> None:
        self.storage = storage
        self.stage = stage
        schema = stage.schema if stage is not None else storage.schema
        self.table = f'"{schema}".crops'
        self.meta_table = f'"{schema}".meta'
        self.ids_sequence = f"{schema}.crop_ids"

    @property
    def conn(self) -> Any:
        """The connection queries go through (the write's transaction, or this thread's reader)."""
        return self.stage.conn if self.stage is not None else self.storage.connection()

    def get_meta(self, key: str, default: Any = None) -> Any:
        """The value stored under `key`, or `default`."""
        row = self.conn.execute(f"SELECT value FROM {self.meta_table} WHERE key = %s", (key,)).fetchone()
        return default if row is None else row[0]

    def set_meta(self, key: str, value: Any) -> None:
        """Store `value` (JSON-encodable) under `key`."""
        self.conn.execute(f"INSERT INTO {self.meta_table} (key, value) VALUES (%s, %s::jsonb) "
                          "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value", (key, json.dumps(value)))

    def count(self) -> int:
        """Number of stored crops."""
        return int(self.conn.execute(f"SELECT count(*) FROM {self.table}").fetchone()[0])

    def known_hashes(self, hashes: Iterable[str]) -> set[str]:
        """The subset of `hashes` already stored."""
        return set(self.ids_of_hashes(list(hashes)))

    def ids_of_hashes(self, hashes: Sequence[str]) -> dict[str, int]:
        """Content hash -> id of the stored crops among `hashes`."""
        out: dict[str, int] = {}
        for s in range(0, len(hashes), _CHUNK):
            rows = self.conn.execute(f"SELECT sha256, id FROM {self.table} WHERE sha256 = ANY(%s)",
                                     (list(hashes[s:s + _CHUNK]),))
            out.update((r[0], int(r[1])) for r in rows)
        return out

    def insert(self, records: Sequence[CropRecord], generation: int) -> np.ndarray:
        """Insert `records` under fresh ids (increasing); returns them, -1 for a record whose content hash is
        stored already (by a concurrent writer: the UNIQUE constraint skips it)."""
        out = np.full(len(records), -1, np.int64)
        for s in range(0, len(records), _CHUNK):
            chunk = records[s:s + _CHUNK]
            ids = [r[0] for r in self.conn.execute("SELECT nextval(%s) FROM generate_series(1, %s)",
                                                   (self.ids_sequence, len(chunk)))]
            columns = [ids, [r.path for r in chunk], [r.sha256 for r in chunk], [r.camid for r in chunk],
                       [r.timestamp for r in chunk], [r.timestamp_raw for r in chunk], [r.identity for r in chunk],
                       [r.track for r in chunk]]
            stored = {int(r[0]) for r in self.conn.execute(
                f"INSERT INTO {self.table} ({_COLUMNS}) SELECT u.*, %s FROM unnest(%s::bigint[], %s::text[], "
                "%s::text[], %s::integer[], %s::float8[], %s::text[], %s::bigint[], %s::text[]) AS u "
                "ON CONFLICT (sha256) DO NOTHING RETURNING id", (int(generation), *columns))}
            out[s:s + len(chunk)] = [i if i in stored else -1 for i in ids]
        return out

    def delete(self, ids: Sequence[int]) -> None:
        """Delete the rows of `ids`."""
        self.conn.execute(f"DELETE FROM {self.table} WHERE id = ANY(%s)", ([int(i) for i in ids],))

    def get(self, ids: Sequence[int]) -> dict[int, CropRecord]:
        """Records by id (missing ids are absent from the result)."""
        out: dict[int, CropRecord] = {}
        ids = [int(i) for i in ids]
        for s in range(0, len(ids), _CHUNK):
            for r in self.conn.execute(f"SELECT {_COLUMNS} FROM {self.table} WHERE id = ANY(%s)",
                                       (ids[s:s + _CHUNK],)):
                out[r[0]] = CropRecord(id=r[0], path=r[1], sha256=r[2], camid=r[3], timestamp=r[4],
                                       timestamp_raw=r[5], identity=r[6], track=r[7], generation=r[8])
        return out

    def ids_where(self, cameras: Sequence[int] | None = None, exclude_cameras: Sequence[int] | None = None,
                  time_from: float | None = None, time_to: float | None = None,
                  paths: Sequence[str] | None = None) -> np.ndarray:
        """Sorted int64 ids of the crops matching every given condition (as `MetadataStore.ids_where`)."""
        where, params = _where(cameras, exclude_cameras, time_from, time_to, paths)
        rows = self.conn.execute(f"SELECT id FROM {self.table} WHERE {where} ORDER BY id", params)
        return np.fromiter((r[0] for r in rows), dtype=np.int64)

    def matching(self, cameras: Sequence[int] | None, exclude_camera: int | None, time_from: float | None,
                 time_to: float | None) -> PgSelection:
        """The crops passing a search's filters, as SQL evaluated inside the vector search."""
        where, params = _where(cameras, None if exclude_camera is None else [exclude_camera], time_from, time_to)
        return PgSelection(self, where, params)

    def has_cameras(self, cameras: Sequence[int]) -> bool:
        """Whether any crop is from one of `cameras`."""
        return bool(self.conn.execute(f"SELECT EXISTS (SELECT 1 FROM {self.table} WHERE camid = ANY(%s))",
                                      ([int(c) for c in cameras],)).fetchone()[0])

    def time_span(self) -> tuple[float, float] | None:
        """(earliest, latest) timestamp of the crops, None when none has one."""
        lo, hi = self.conn.execute(f"SELECT min(timestamp), max(timestamp) FROM {self.table}").fetchone()
        return None if lo is None else (float(lo), float(hi))

    def has_identity(self) -> bool:
        """Whether any crop has a known identity."""
        return bool(self.conn.execute(
            f"SELECT EXISTS (SELECT 1 FROM {self.table} WHERE identity IS NOT NULL)").fetchone()[0])

    def all_ids(self) -> np.ndarray:
        """Every stored id, sorted."""
        return self.ids_where()

    def cameras(self) -> dict[int | None, int]:
        """Crops per camera id."""
        rows = self.conn.execute(f"SELECT camid, count(*) FROM {self.table} GROUP BY camid ORDER BY camid")
        return {r[0]: int(r[1]) for r in rows}

    def commit(self) -> None:
        """Nothing: a write's transaction is committed when it is published."""

    def close(self) -> None:
        """Nothing: the storage owns the connections."""


class PgVectorIndex:
    """The `embedding` column of a gallery's crops table and its HNSW index, with the methods of `VectorIndex`
    that a gallery uses. Scores are cosine similarities (1 - pgvector's cosine distance), best first."""

    vectors = None  # no float16 re-ranking copies: the table keeps every vector exactly

    def __init__(self, storage: PostgresStorage, stage: PgStagedGeneration | None, dim: int,
                 params: IndexParams) -> None:
        self.storage = storage
        self.stage = stage
        self.dim = int(dim)
        self.params = params
        schema = stage.schema if stage is not None else storage.schema
        self.table = f'"{schema}".crops'

    @property
    def conn(self) -> Any:
        """The connection queries go through (the write's transaction, or this thread's reader)."""
        return self.stage.conn if self.stage is not None else self.storage.connection()

    @property
    def kind(self) -> str:
        """'hnsw' (approximate, pgvector's HNSW index) or 'flat' (exact: a sequential scan)."""
        return self.params.kind

    @property
    def metric(self) -> str:
        """'ip': cosine similarity of L2-normalised vectors, higher is closer."""
        return "ip"

    @property
    def ntotal(self) -> int:
        """Number of stored vectors."""
        return int(self.conn.execute(f"SELECT count(*) FROM {self.table}").fetchone()[0])

    def prepare(self, new_vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nothing to convert (the HNSW index grows with the table): no vectors moved."""
        return np.empty(0, np.int64), np.empty((0, self.dim), np.float32)

    def add(self, x: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Store the vectors of the rows `ids` (inserted by the same write): one binary COPY into a temporary
        table, one UPDATE."""
        x = np.ascontiguousarray(x, np.float32)
        ids = np.asarray(ids, np.int64)
        conn = self.conn
        conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS reid_new_vectors (id bigint, embedding vector({self.dim})) "
                     "ON COMMIT DROP")
        conn.execute("TRUNCATE reid_new_vectors")
        with conn.cursor() as cur:
            for s in range(0, len(ids), _CHUNK):
                with cur.copy("COPY reid_new_vectors (id, embedding) FROM STDIN (FORMAT BINARY)") as copy:
                    copy.write(vectors_to_copy(ids[s:s + _CHUNK], x[s:s + _CHUNK]))
        done = conn.execute(f"UPDATE {self.table} c SET embedding = n.embedding FROM reid_new_vectors n "
                            "WHERE c.id = n.id").rowcount
        if done != len(ids):
            raise GalleryCorrupt(f"stored {done} of {len(ids)} vectors: their rows are missing")
        return ids

    def remove(self, ids: np.ndarray) -> int:
        """Lock the rows of `ids` for the write that deletes them; returns how many exist (their vectors go with
        the rows)."""
        rows = self.conn.execute(f"SELECT id FROM {self.table} WHERE id = ANY(%s) FOR UPDATE",
                                 ([int(i) for i in ids],)).fetchall()
        return len(rows)

    def stored_vectors(self, ids: np.ndarray) -> np.ndarray:
        """float32 (len(ids), D) vectors of `ids`, exactly as stored (every id must be stored)."""
        ids = np.asarray(ids, np.int64)
        got_ids, got = self.read_vectors(ids)
        order = np.argsort(got_ids)
        pos = np.searchsorted(got_ids[order], ids)
        if len(ids) and (pos.max() >= len(got_ids) or np.any(got_ids[order][pos] != ids)):
            raise VectorIndexError("a requested id has no stored vector")
        return got[order][pos]

    def read_vectors(self, ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of `ids` (None: every crop), in id order, through a binary COPY."""
        where = "embedding IS NOT NULL" + ("" if ids is None else " AND id = ANY(%s)")
        params = None if ids is None else ([int(i) for i in ids],)
        data = bytearray()
        with self.conn.cursor() as cur:
            with cur.copy(f"COPY (SELECT id, embedding FROM {self.table} WHERE {where} ORDER BY id) TO STDOUT "
                          "(FORMAT BINARY)", params) as copy:
                for chunk in copy:
                    data += chunk
        return vectors_from_copy(bytes(data), self.dim)

    def search(self, q: Any, k: int, allowed: PgSelection | None = None, nprobe: int | None = None,
               refine: int | None = None, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (Q, k), best first; -1 ids pad. `allowed`: the filters (`PgMetadata.matching`),
        evaluated in the same SQL query. `nprobe`: HNSW candidates (ef_search; default the gallery's, at least
        k). A filtered HNSW search that finds fewer than k (pgvector 0.6 filters the candidates HNSW returns)
        is answered again exactly, so it never returns fewer than k when k match; `exact` always is."""
        q = np.asarray(q, np.float32)
        scores = np.full((len(q), k), -np.inf, np.float32)
        ids = np.full((len(q), k), -1, np.int64)
        where, params = ("TRUE", {}) if allowed is None else (allowed.where, allowed.params)
        sql = (f"SELECT id, embedding <=> %(q)s::vector FROM {self.table} WHERE {where} "
               "ORDER BY embedding <=> %(q)s::vector LIMIT %(k)s")
        conn = self.conn
        hnsw = self.kind == "hnsw" and not exact
        if hnsw:
            ef = min(1000, max(int(nprobe or self.params.ef_search or 40), k))  # pgvector's bounds
            if allowed is not None:  # HNSW's candidates are filtered afterwards (pgvector 0.6): visit more
                ef = min(1000, 10 * ef)
            self.storage.set_ef_search(conn, ef)
        for r in range(len(q)):
            args = {"q": _vector_text(q[r]), "k": int(k), **params}
            rows = conn.execute(sql, args).fetchall() if hnsw else []
            if len(rows) < k:  # exact: a sequential scan (also when HNSW's candidates left fewer than k)
                with conn.transaction():
                    conn.execute("SET LOCAL enable_indexscan = off")
                    rows = conn.execute(sql, args).fetchall()
            for j, (i, d) in enumerate(rows):
                ids[r, j], scores[r, j] = i, 1.0 - d
        return scores, ids


class PostgresStorage:
    """A gallery in a PostgreSQL database (see the module docstring): the `GalleryStorage` of a `postgresql://`
    URI. Readers query through one autocommit connection per thread; each write has its own connection and
    transaction (`begin` ... `publish`)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.conninfo, self.name = parse_gallery_uri(uri)
        self.schema = f"reid_{self.name}"
        self.staging_schema = f"{self.schema}__staging"
        self._local = threading.local()
        self._opened: list[Any] = []
        self._opened_lock = threading.Lock()

    # ------------------------------------------------------------------ connections
    @property
    def location(self) -> str:
        """The URI (password hidden), for messages and `info()`."""
        return redact_uri(self.uri)

    def connect(self, autocommit: bool = True) -> Any:
        """A new connection to the database (GalleryError, one line, when it cannot be made)."""
        psycopg = _psycopg()
        try:
            return psycopg.connect(self.conninfo, autocommit=autocommit)
        except psycopg.OperationalError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GalleryError(f"cannot connect to {self.location}: {first}") from None

    def connection(self) -> Any:
        """This thread's reading connection (autocommit), opened on first use."""
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = self.connect(autocommit=True)
            self._local.conn = conn
            self._local.ef_search = None
            with self._opened_lock:
                self._opened.append(conn)
        return conn

    def set_ef_search(self, conn: Any, ef: int) -> None:
        """Set `hnsw.ef_search` on this thread's reading connection (only when it changes)."""
        if conn is getattr(self._local, "conn", None) and getattr(self._local, "ef_search", None) == ef:
            return
        conn.execute(f"SET hnsw.ef_search = {int(ef)}")
        if conn is getattr(self._local, "conn", None):
            self._local.ef_search = ef

    def close(self) -> None:
        """Close every reading connection this storage opened."""
        with self._opened_lock:
            for conn in self._opened:
                with contextlib.suppress(Exception):
                    conn.close()
            self._opened.clear()

    def exists(self, conn: Any | None = None) -> bool:
        """Whether the gallery's schema holds a gallery."""
        conn = conn or self.connection()
        return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{self.schema}.state",)).fetchone()[0]

    # ------------------------------------------------------------------ building
    def check_target(self, overwrite: bool) -> None:
        """Refuse to build over an existing gallery unless `overwrite` (FileExistsError)."""
        if self.exists() and not overwrite:
            raise FileExistsError(f"gallery {self.name!r} already exists in {self.location}; pass --overwrite "
                                  "(overwrite=True) to replace it")

    def _create_extension(self) -> None:
        conn = self.connection()
        if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone():
            return
        psycopg = _psycopg()
        try:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except psycopg.errors.UniqueViolation:  # a concurrent build created it first
            pass
        except psycopg.Error as exc:
            raise GalleryError(f"the pgvector extension is not available in {self.location} ({exc}); install it "
                               "(https://github.com/pgvector/pgvector) or ask the database's owner to") from None

    @contextlib.contextmanager
    def building(self, overwrite: bool, lock_timeout: float | None = None
                 ) -> Iterator[tuple[PgStagedGeneration, PgMetadata]]:
        """Stage a new gallery in `<schema>__staging`, in one transaction (see the module docstring); the caller
        creates its table (`new_index`), adds, and publishes. An exception before that rolls everything back."""
        self._create_extension()
        psycopg = _psycopg()
        conn = self.connect(autocommit=False)
        stage = PgStagedGeneration(None, 0, None, conn=conn, schema=self.staging_schema, building=True)
        try:
            if self.exists(conn) and not overwrite:
                raise FileExistsError(f"gallery {self.name!r} already exists in {self.location}; pass --overwrite "
                                      "(overwrite=True) to replace it")
            if lock_timeout is not None:
                conn.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout * 1000)}ms'")
            try:
                conn.execute(f'CREATE SCHEMA "{self.staging_schema}"')
            except (psycopg.errors.DuplicateSchema, psycopg.errors.UniqueViolation,
                    psycopg.errors.LockNotAvailable):
                raise GalleryError(f"another build of gallery {self.name!r} is under way in {self.location}") from None
            s = f'"{self.staging_schema}"'
            conn.execute(f"CREATE TABLE {s}.meta (key text PRIMARY KEY, value jsonb NOT NULL)")
            conn.execute(f"CREATE TABLE {s}.state (one boolean PRIMARY KEY DEFAULT true CHECK (one), "
                         "format text NOT NULL, generation bigint NOT NULL, commits bigint NOT NULL, "
                         "dim integer NOT NULL, index jsonb NOT NULL)")
            conn.execute(f"CREATE SEQUENCE {s}.crop_ids MINVALUE 0 START 0")
            conn.execute(f"CREATE SEQUENCE {s}.generations MINVALUE 0 START 0")
            stage.gen = int(conn.execute(f"SELECT nextval('{self.staging_schema}.generations')").fetchone()[0])
            yield stage, PgMetadata(self, stage)
        except BaseException:
            self.discard(stage)
            raise

    def new_index(self, stage: PgStagedGeneration, dim: int, params: IndexParams) -> PgVectorIndex:
        """Create the crops table of a new gallery for `dim`-d vectors; `params.kind`: 'auto' or 'hnsw' (an HNSW
        index, built when the build is published; m and ef_construction: pgvector's, 0 for its defaults 16
        and 64) or 'flat' (no index: exact search)."""
        if params.kind not in ("auto", "hnsw", "flat"):
            raise ValueError(f"index kind must be auto, hnsw or flat for a PostgreSQL gallery, got {params.kind!r}")
        kind = "flat" if params.kind == "flat" or dim > HNSW_MAX_DIM else "hnsw"
        params = IndexParams(**{**params.to_dict(), "kind": kind})
        s = f'"{stage.schema}"'
        stage.conn.execute(
            f"CREATE TABLE {s}.crops (id bigint PRIMARY KEY, path text NOT NULL, sha256 text NOT NULL UNIQUE, "
            "camid integer, timestamp double precision, timestamp_raw text, identity bigint, track text, "
            f"generation bigint NOT NULL, embedding vector({int(dim)}))")
        for column in ("camid", "timestamp", "path"):
            stage.conn.execute(f"CREATE INDEX crops_{column} ON {s}.crops ({column})")
        stage.index = params.to_dict()
        stage.conn.execute(f"INSERT INTO {s}.state (format, generation, commits, dim, index) "
                           "VALUES (%s, %s, 0, %s, %s::jsonb)", (FORMAT, stage.gen, int(dim), json.dumps(stage.index)))
        return PgVectorIndex(self, stage, dim, params)

    # ------------------------------------------------------------------ reading
    def current(self) -> tuple[int, dict[str, Any]]:
        """(generation, manifest-like description) of the gallery; GalleryError when there is none."""
        conn = self.connection()
        if not self.exists(conn):
            raise GalleryError(f"no gallery {self.name!r} in {self.location}; create one with `reid-gallery build`")
        fmt, gen, commits, dim, index = conn.execute(
            f'SELECT format, generation, commits, dim, index FROM "{self.schema}".state').fetchone()
        if fmt != FORMAT:
            raise GalleryError(f"gallery {self.name!r} in {self.location}: unsupported format {fmt!r} (expected "
                               f"{FORMAT})")
        size = conn.execute("SELECT pg_total_relation_size(%s)", (f"{self.schema}.crops",)).fetchone()[0]
        return int(gen), {"format": FORMAT, "generation": int(gen), "commits": int(commits),
                          "index": {"kind": index["kind"], "dim": int(dim), "params": index},
                          "files": [{"name": "crops table and its indexes", "bytes": int(size)}],
                          "segments": [], "segment_files": []}

    def current_number(self) -> int | None:
        """The published generation, None without a gallery (or a reachable database)."""
        try:
            return self.current()[0]
        except GalleryError:
            return None

    def published_token(self) -> str:
        """'<generation> <commits>': changes whenever a write commits ("" when unreadable)."""
        try:
            row = self.connection().execute(f'SELECT generation, commits FROM "{self.schema}".state').fetchone()
        except Exception:  # a dropped connection or gallery: the reader keeps what it has
            with contextlib.suppress(Exception):
                self.connection().close()
            return ""
        return f"{row[0]} {row[1]}"

    def open(self, gen: int, manifest: dict[str, Any], verify: bool = True) -> tuple[PgMetadata, PgVectorIndex]:
        """The gallery's metadata and index (live views of the tables); with `verify`, every row must hold a
        vector of the gallery's dimension (GalleryCorrupt otherwise)."""
        dim = int(manifest["index"]["dim"])
        store = PgMetadata(self)
        idx = PgVectorIndex(self, None, dim, IndexParams(**manifest["index"]["params"]))
        if verify:
            bad = self.connection().execute(
                f'SELECT count(*) FROM "{self.schema}".crops WHERE embedding IS NULL').fetchone()[0]
            if bad:
                raise GalleryCorrupt(f"gallery {self.name!r} in {self.location}: {bad} crop(s) without a vector")
        return store, idx

    def manifest_location(self, gen: int) -> str:
        """Where the gallery's description is: its state table."""
        return f"{self.location} (table {self.schema}.state)"

    def local_dir(self) -> Path | None:
        """None: a database gallery has no folder of its own."""
        return None

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def locked(self, timeout: float | None = None) -> Iterator[bool]:
        """No lock: writers run concurrently, each in its own transaction."""
        yield True

    def begin(self, base: int | None = None, after: int = -1) -> tuple[PgStagedGeneration, PgMetadata]:
        """Open a write's transaction on the live gallery, numbered by the generations sequence."""
        conn = self.connect(autocommit=False)
        try:
            gen = int(conn.execute(f"SELECT nextval('{self.schema}.generations')").fetchone()[0])
        except BaseException:
            conn.close()
            raise
        stage = PgStagedGeneration(None, gen, base, conn=conn, schema=self.schema)
        return stage, PgMetadata(self, stage)

    def stage_index(self, stage: PgStagedGeneration, index: PgVectorIndex) -> PgVectorIndex:
        """The gallery's index seen through the write's transaction."""
        return PgVectorIndex(self, stage, index.dim, index.params)

    def publish(self, staged: PgStagedGeneration, index: PgVectorIndex, segments: list[str],
                segment_files: list[dict[str, Any]], on_stage: StageCallback | None = None) -> None:
        """Commit a write (a build: create its HNSW index, then replace the gallery by the staged schema)."""
        notify = on_stage or (lambda stage: None)
        conn = staged.conn
        if staged.building:
            s = f'"{staged.schema}"'
            if index.kind == "hnsw":
                # pgvector builds the graph fast only while it fits in maintenance_work_mem: raise it for this
                # transaction to the graph's size (vectors + neighbour lists, about 2x the vectors), at most 8 GB.
                rows = int(conn.execute(f"SELECT count(*) FROM {s}.crops").fetchone()[0])
                need_mb = min(8192, rows * (index.dim * 4 + 32 * max(index.params.m, 16)) * 2 // 2**20 + 64)
                have_kb = int(conn.execute("SELECT setting FROM pg_settings WHERE name = 'maintenance_work_mem'"
                                           ).fetchone()[0])
                if need_mb * 1024 > have_kb:
                    conn.execute(f"SET LOCAL maintenance_work_mem = '{need_mb}MB'")
                with_ = {"m": index.params.m, "ef_construction": index.params.ef_construction}
                options = ", ".join(f"{k} = {int(v)}" for k, v in with_.items() if v)
                conn.execute(f"CREATE INDEX crops_embedding_hnsw ON {s}.crops USING hnsw (embedding vector_cosine_ops)"
                             + (f" WITH ({options})" if options else ""))
            notify("index written")
            conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
            conn.execute(f'ALTER SCHEMA {s} RENAME TO "{self.schema}"')
            notify("renamed")
        else:
            notify("index written")
            notify("renamed")
            # The one serialised step of a write: this row stays locked only until the commit below.
            conn.execute(f'UPDATE "{self.schema}".state SET generation = GREATEST(generation, %s), '
                         "commits = commits + 1", (staged.gen,))
        conn.commit()
        staged.published = True
        conn.close()
        notify("published")

    def discard(self, staged: PgStagedGeneration) -> None:
        """Roll back a write that was not committed (everything it wrote goes)."""
        if staged.published or staged.conn is None:
            return
        with contextlib.suppress(Exception):
            staged.conn.rollback()
        with contextlib.suppress(Exception):
            staged.conn.close()

    def write_segment(self, name: str, ids: np.ndarray, vectors: np.ndarray) -> list[dict[str, Any]]:
        """Never needed: the table keeps every vector exactly (no IVF-PQ re-ranking copies)."""
        raise GalleryError("a PostgreSQL gallery keeps no vector segments")

    def collect_garbage(self, keep: set[int]) -> list[str]:
        """Nothing to delete: removed rows are gone once their write commits (VACUUM reclaims the space)."""
        return []

    def recover(self, lock_timeout: float | None = None) -> int | None:
        """Nothing to recover: every write is one transaction."""
        raise GalleryError(f"gallery {self.name!r} in {self.location} needs no recovery: every write to a "
                           "PostgreSQL gallery is one transaction")
