"""On-disk generations of a gallery: CURRENT, the write lock, publishing, garbage collection, recovery.

    <gallery>/CURRENT                 "gen-000012 <sha256 of its manifest.json>"  (swapped with os.replace)
    <gallery>/LOCK                    fcntl.flock target serialising writers (holds the writer's pid)
    <gallery>/gen-000012/             index.faiss, meta.sqlite, manifest.json of one generation
    <gallery>/segments/seg-*.npy      immutable float16 vectors shared between generations

A generation is built in a hidden `.tmp-gen-N/`, fsynced, renamed to `gen-N/`, and published by
atomically replacing CURRENT: the single commit point (see reid_lite/index/gallery.py).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..utils.files import sha256_file
from .store import MetadataStore
from .vector_index import IndexParams, VectorIndex, VectorIndexError

logger = logging.getLogger(__name__)

__all__ = [
    "CURRENT", "FORMAT", "KEEP_GENERATIONS", "LOCK", "SEGMENTS", "STAGES",
    "FingerprintMismatch", "GalleryCorrupt", "GalleryError", "GalleryLocked", "WriteLock",
    "LOCK_MESSAGE_SECONDS", "all_generations", "collect_garbage", "current_generation", "discard_unpublished",
    "generation_name", "publish_generation", "read_current", "recover_current",
    "DirectoryStorage", "StageCallback", "StagedGeneration", "VectorSegments", "read_index", "verify_generation",
    "check_build_target", "is_gallery_dir", "write_segment",
]

FORMAT = "reid-gallery/1"
CURRENT = "CURRENT"
LOCK = "LOCK"
SEGMENTS = "segments"
KEEP_GENERATIONS = 2  # the current one and its predecessor (a reader that just followed CURRENT keeps working)
#: The stages of a write, in order, at which a gallery's `on_stage` callback is called with the stage's
#: name: the lock is held; after each embedded batch; all new crops embedded (nothing written yet); the
#: next generation's metadata, index and segments staged in `.tmp-gen-N/`; its index, checksums and
#: manifest written and fsynced; renamed to `gen-N/` (CURRENT still names the previous one); CURRENT
#: swapped (garbage not yet collected). An exception raised by the callback aborts the write there.
STAGES = ("locked", "batch embedded", "embedded", "staged", "index written", "renamed", "published")
StageCallback = Callable[[str], None]
#: While a writer waits for the lock, its warning repeats this often (seconds).
LOCK_MESSAGE_SECONDS = 10.0
_GEN_RE = re.compile(r"^gen-(\d{6,})$")


# ============================================================================ errors


class GalleryError(RuntimeError):
    """Base class of gallery errors."""


class GalleryCorrupt(GalleryError):
    """A gallery file is missing, truncated or does not match its manifest checksum."""


class GalleryLocked(GalleryError):
    """Another writer holds the gallery lock (raised only when waiting is disabled or times out)."""


class FingerprintMismatch(GalleryError):
    """Features (or a model) from another model than the gallery's were offered."""


# ============================================================================ files


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    # A rename/create is durable only once its directory entry is; fsync the directory too.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_segment(root: Path, name: str, ids: np.ndarray, vecs: np.ndarray) -> list[dict[str, Any]]:
    """Write an immutable float16 segment (ids + vectors), fsynced; returns its manifest entries."""
    root.mkdir(exist_ok=True)
    entries = []
    for suffix, arr in ((".ids.npy", ids.astype(np.int64)), (".f16.npy", vecs.astype(np.float16))):
        path = root / f"{name}{suffix}"
        with open(path, "wb") as fh:
            np.save(fh, arr)
            fh.flush()
            os.fsync(fh.fileno())
        entries.append({"name": f"{name}{suffix}", "sha256": sha256_file(path), "bytes": path.stat().st_size})
    _fsync_dir(root)
    return entries



class VectorSegments:
    """float16 copies of IVF-PQ vectors in immutable segment files, for exact re-ranking (`StoredVectors`)."""

    def __init__(self, root: Path, names: Sequence[str]) -> None:
        self.root = root
        self.names = list(names)
        self._ids = [np.load(root / f"{n}.ids.npy") for n in self.names]
        self._vecs = [np.load(root / f"{n}.f16.npy", mmap_mode="r") for n in self.names]
        self.ids = np.concatenate(self._ids) if self._ids else np.empty(0, np.int64)
        self._cum = np.cumsum([0] + [len(i) for i in self._ids])
        if self.ids.size and np.any(np.diff(self.ids) <= 0):
            raise GalleryCorrupt(f"vector segments in {root} are not in increasing id order")

    def get(self, ids: np.ndarray) -> np.ndarray:
        """float32 (len(ids), D) vectors of `ids` (all must be stored)."""
        rows = np.searchsorted(self.ids, ids)
        if rows.size and (rows.max() >= self.ids.size or np.any(self.ids[rows] != ids)):
            raise GalleryCorrupt("an indexed id has no stored vector in the segments")
        seg = np.searchsorted(self._cum, rows, side="right") - 1
        out = np.empty((len(ids), self._vecs[0].shape[1] if self._vecs else 0), np.float32)
        for s in np.unique(seg):
            sel = seg == s
            local = rows[sel] - self._cum[s]
            order = np.argsort(local)  # sorted reads are kinder to the page cache of a memmap
            out[np.flatnonzero(sel)[order]] = self._vecs[s][local[order]]
        return out


def read_index(root: Path, gen: int, manifest: dict[str, Any]) -> VectorIndex:
    """The faiss index of generation `gen` with the float16 segments its manifest names; GalleryCorrupt when
    the file cannot be read or does not hold the manifest's dimension."""
    params = IndexParams(**manifest["index"]["params"])
    vectors = VectorSegments(root / SEGMENTS, manifest["segments"]) if manifest["segments"] else None
    path = root / generation_name(gen) / "index.faiss"
    try:
        return VectorIndex.read(path, int(manifest["index"]["dim"]), params, vectors)
    except VectorIndexError as exc:
        raise GalleryCorrupt(str(exc)) from None


# ============================================================================ generations


def generation_name(gen: int) -> str:
    """Directory name of generation `gen`."""
    return f"gen-{gen:06d}"


def all_generations(root: Path) -> list[int]:
    """Numbers of every generation directory, published or unpublished debris (`.tmp-gen-N`)."""
    out = []
    for p in root.iterdir():
        m = _GEN_RE.match(p.name) or re.match(r"^\.tmp-gen-(\d{6,})$", p.name)
        if m:
            out.append(int(m.group(1)))
    return out


def current_generation(root: Path) -> int | None:
    """The generation CURRENT names (unverified), None without a readable CURRENT."""
    try:
        return int((root / CURRENT).read_text().split()[0].removeprefix("gen-"))
    except (OSError, ValueError, IndexError):
        return None


def _published_generations(root: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := _GEN_RE.match(p.name)) and p.is_dir())


def _recover_hint(root: Path) -> str:
    gens = _published_generations(root) if root.is_dir() else []
    if not gens:
        return ""
    return (f"; it holds generation(s) {', '.join(generation_name(g) for g in gens[-3:])}: run "
            f"`reid-gallery recover {root}` to publish the newest complete one")


def read_current(root: Path) -> tuple[int, dict[str, Any]]:
    """(generation, manifest) that CURRENT names, after checking the manifest against its checksum."""
    cur = root / CURRENT
    if not root.is_dir():
        what = "not a directory" if root.exists() else "no such directory"
        raise GalleryError(f"no gallery at {root} ({what}); create one with `reid-gallery build`")
    if not cur.is_file():
        hint = _recover_hint(root)
        if hint:
            raise GalleryCorrupt(f"{root} has no {CURRENT} file{hint}")
        raise GalleryError(f"{root} is not a gallery (no {CURRENT} file); create one with `reid-gallery build`")
    parts = cur.read_text(errors="replace").split()
    if len(parts) != 2 or not _GEN_RE.match(parts[0]):
        raise GalleryCorrupt(f"{cur} is malformed: {cur.read_text(errors='replace')[:100]!r}{_recover_hint(root)}")
    name, digest = parts
    man_path = root / name / "manifest.json"
    if not man_path.is_file():
        raise GalleryCorrupt(f"{cur} points to {name}, whose manifest is missing{_recover_hint(root)}")
    raw = man_path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != digest:
        raise GalleryCorrupt(f"{man_path} does not match the checksum in {cur} (corrupted); refusing to use it"
                             f"{_recover_hint(root)}")
    manifest = json.loads(raw)
    if manifest.get("format") != FORMAT:
        raise GalleryError(f"{man_path}: unsupported gallery format {manifest.get('format')!r} (expected {FORMAT})")
    return int(_GEN_RE.match(name).group(1)), manifest


def verify_generation(root: Path, gen: int, manifest: dict[str, Any], hashes: bool = True) -> None:
    """Check that every file the manifest lists exists with its size and (with `hashes`) its sha256;
    raise `GalleryCorrupt` naming the first file that does not."""
    gen_dir = root / generation_name(gen)
    files = [(gen_dir / f["name"], f) for f in manifest["files"]]
    files += [(root / SEGMENTS / f["name"], f) for f in manifest["segment_files"]]
    for path, entry in files:
        if not path.is_file():
            raise GalleryCorrupt(f"gallery file missing: {path}")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise GalleryCorrupt(f"gallery file {path} has {size} bytes, the manifest says {entry['bytes']} "
                                 "(truncated or replaced); refusing to use it")
        if hashes and sha256_file(path) != entry["sha256"]:
            raise GalleryCorrupt(f"gallery file {path} does not match its sha256 in {gen_dir / 'manifest.json'} "
                                 "(corrupted); refusing to use it")


def _swap_current(root: Path, name: str, manifest_raw: bytes) -> None:
    cur_tmp = root / f".{CURRENT}.tmp"
    _write_durable(cur_tmp, f"{name} {hashlib.sha256(manifest_raw).hexdigest()}\n".encode())
    os.replace(cur_tmp, root / CURRENT)  # the commit point
    _fsync_dir(root)


def recover_current(root: Path) -> int | None:
    """Point CURRENT at the newest generation whose manifest and files all verify (lock held).

    Returns that generation, or None when CURRENT already names a complete one. Nothing is deleted:
    incomplete generations stay until the next writer's garbage collection."""
    try:
        gen, manifest = read_current(root)
        verify_generation(root, gen, manifest)
        return None
    except GalleryCorrupt:
        pass
    for gen in reversed(_published_generations(root)):
        man_path = root / generation_name(gen) / "manifest.json"
        try:
            raw = man_path.read_bytes()
            manifest = json.loads(raw)
            if manifest.get("format") != FORMAT or manifest.get("generation") != gen:
                continue
            verify_generation(root, gen, manifest)
        except (OSError, ValueError, KeyError, TypeError, GalleryCorrupt):
            continue
        _swap_current(root, generation_name(gen), raw)
        return gen
    raise GalleryCorrupt(f"{root}: no complete generation to recover (every gen-* directory is missing a file "
                         "or fails its checksums); build the gallery again")


def publish_generation(root: Path, tmp: Path, gen: int, idx: VectorIndex, segments: list[str],
                       segment_files: list[dict], previous: int | None = None,
                       on_stage: StageCallback | None = None) -> None:
    """Finish the generation in `tmp` (index + manifest, fsync), rename it into place, swap CURRENT.

    `previous` is the generation CURRENT named before: it is kept (with the new one), everything else
    (older generations, a killed writer's unpublished debris) is garbage-collected afterwards.
    `on_stage` is called at "index written", "renamed" and "published" (see STAGES)."""
    notify = on_stage or (lambda stage: None)
    idx.write(tmp / "index.faiss")
    files = []
    for name in ("index.faiss", "meta.sqlite"):
        path = tmp / name
        _fsync_file(path)
        files.append({"name": name, "sha256": sha256_file(path), "bytes": path.stat().st_size})
    manifest = {
        "format": FORMAT, "generation": gen, "created": time.time(), "ntotal": idx.ntotal,
        "index": {"kind": idx.kind, "dim": idx.dim, "params": idx.params.to_dict()},
        "files": files, "segments": segments, "segment_files": segment_files,
    }
    raw = json.dumps(manifest, indent=1, sort_keys=True).encode()
    _write_durable(tmp / "manifest.json", raw)
    _fsync_dir(tmp)
    notify("index written")
    final = root / generation_name(gen)
    if final.exists():  # debris of a writer killed between this rename and the CURRENT swap
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    notify("renamed")
    _swap_current(root, final.name, raw)
    notify("published")
    collect_garbage(root, {gen} if previous is None else {gen, previous})


def collect_garbage(root: Path, keep: set[int]) -> list[str]:
    """Drop generations not in `keep` (the published one and its predecessor: KEEP_GENERATIONS),
    unpublished debris, and segments no kept generation references. Returns the names removed."""
    removed = []
    for p in root.iterdir():
        m = _GEN_RE.match(p.name)
        # Unpublished debris of a killed writer (a generation, a distributed run's shards): writers
        # hold the lock, so no live writer owns any of it while this runs.
        if (m and int(m.group(1)) not in keep) or p.name.startswith((".tmp-gen-", ".tmp-shards-")):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    seg_root = root / SEGMENTS
    if not seg_root.is_dir():
        return removed
    referenced: set[str] = set()
    for g in keep:
        man = root / generation_name(g) / "manifest.json"
        if man.is_file():
            referenced.update(f["name"] for f in json.loads(man.read_text())["segment_files"])
    for p in seg_root.iterdir():
        if p.name not in referenced:
            p.unlink(missing_ok=True)
            removed.append(f"{SEGMENTS}/{p.name}")
    return removed


def discard_unpublished(root: Path, gen: int) -> None:
    """Remove what an unpublished generation `gen` wrote: its `.tmp-gen-N/` (or `gen-N/`, when the write
    failed between the rename and the CURRENT swap: `recover` must not publish a write that failed) and
    its segment files (named `seg-N...`; no published generation uses that number)."""
    shutil.rmtree(root / f".tmp-{generation_name(gen)}", ignore_errors=True)
    if current_generation(root) != gen:
        shutil.rmtree(root / generation_name(gen), ignore_errors=True)
    seg_root = root / SEGMENTS
    if seg_root.is_dir():
        for p in seg_root.glob(f"seg-{gen:06d}*"):
            p.unlink(missing_ok=True)


class WriteLock:
    """Exclusive fcntl.flock on <gallery>/LOCK for the whole of a write (create/add/remove).

    flock locks belong to the open file, so two writers in one process exclude each other too, and
    the kernel releases the lock when a writer dies (no stale lock after a crash). While waiting, a
    warning repeats every `LOCK_MESSAGE_SECONDS`; `timeout` (seconds, None: forever) gives up with
    `GalleryLocked`.
    """

    def __init__(self, root: Path, timeout: float | None = None) -> None:
        self.path = root / LOCK
        self.timeout = timeout
        self.fd: int | None = None

    def _holder(self) -> str:
        return os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "?"

    def __enter__(self) -> WriteLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        t0 = time.monotonic()
        next_message = t0
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(self.fd)
                    raise
            now = time.monotonic()
            if self.timeout is not None and now - t0 >= self.timeout:
                holder = self._holder()
                os.close(self.fd)
                self.fd = None
                raise GalleryLocked(f"{self.path.parent} is locked by another writer (pid {holder}); gave up after "
                                    f"{self.timeout:g}s (lock timeout)")
            if now >= next_message:
                limit = "until it finishes" if self.timeout is None else f"up to {self.timeout:g}s"
                waited = f"still waiting after {now - t0:.0f}s" if now > t0 + 0.5 else f"waiting {limit}"
                logger.warning("%s is locked by another writer (pid %s); %s (--lock-timeout SECONDS to give up)",
                               self.path.parent, self._holder(), waited)
                next_message = now + LOCK_MESSAGE_SECONDS
            time.sleep(0.05)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


@dataclass
class StagedGeneration:
    """An unpublished generation: its staging folder `tmp` (None for a detached gallery that is never
    published), its number, the generation CURRENT named when it began, and whether a write to it failed
    (then it is never published)."""

    tmp: Path | None
    gen: int
    previous: int | None
    broken: bool = False
    #: A detached gallery's stage (`Gallery.staging(None, ...)`): it embeds but is never written.
    detached: bool = False


def is_gallery_dir(root: Path) -> bool:
    """Whether the directory `root` holds a gallery (a CURRENT file or gen-* generations)."""
    return (root / CURRENT).exists() or any(p.name.startswith("gen-") for p in root.iterdir())


def check_build_target(root: Path, overwrite: bool) -> None:
    """Refuse to build over anything but an empty directory, or a gallery when `overwrite`."""
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a directory")
    if root.is_dir() and any(p.name != LOCK for p in root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{root} exists and is not empty; pass --overwrite (overwrite=True) to replace "
                                  "the gallery there")
        if not is_gallery_dir(root):
            raise FileExistsError(f"refusing to overwrite {root}: it is not a gallery (no {CURRENT} file or gen-* "
                                  "generations)")


class DirectoryStorage:
    """A gallery's generations in one directory (format reid-gallery/1, see the module docstring): the write
    lock, CURRENT, `gen-N/` folders with their manifests, the float16 segments. The `GalleryStorage` a
    `Gallery` holds; another backend is another class with these methods (`reid_lite.index.interfaces`)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self._lock_depth = 0  # `locked()` calls this object is inside: nested ones do not lock again

    @property
    def location(self) -> str:
        """Where the gallery lives, for messages and `info()` (the directory, absolute)."""
        return str(self.root.resolve())

    @contextlib.contextmanager
    def locked(self, timeout: float | None = None) -> Iterator[bool]:
        """Hold the write lock (`WriteLock`), re-entrant for this object: yields True when this call took it,
        False inside another `locked()` of the same object. `timeout`: seconds, then GalleryLocked."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield False
            finally:
                self._lock_depth -= 1
            return
        with WriteLock(self.root, timeout):
            self._lock_depth = 1
            try:
                yield True
            finally:
                self._lock_depth = 0

    def check_target(self, overwrite: bool) -> None:
        """Refuse to build here unless the directory is empty, or holds a gallery and `overwrite` (FileExistsError);
        called before the model is built, to fail fast."""
        check_build_target(self.root, overwrite)

    @contextlib.contextmanager
    def building(self, overwrite: bool, lock_timeout: float | None = None
                 ) -> Iterator[tuple[StagedGeneration, MetadataStore]]:
        """Stage a new gallery here, lock held: yields the first generation's stage and its empty metadata store;
        the caller publishes it (`publish`) before the block ends. On an exception before that, everything the
        build wrote goes (folders it created included), and a gallery it was to overwrite stays as it was."""
        root = self.root
        created = next((d for d in [root, *root.parents][::-1] if not d.exists()), None)  # topmost new folder
        root.mkdir(parents=True, exist_ok=True)
        lock_existed = (root / LOCK).exists()
        stage: StagedGeneration | None = None
        try:
            with self.locked(lock_timeout):
                check_build_target(root, overwrite)  # a concurrent build may have published meanwhile
                stage, store = self.begin()
                yield stage, store
        except BaseException:
            if not (stage is not None and self.current_number() == stage.gen):  # not published
                if stage is not None:
                    self.discard(stage)
                if created is not None:
                    shutil.rmtree(created, ignore_errors=True)
                elif not lock_existed and not is_gallery_dir(root):
                    (root / LOCK).unlink(missing_ok=True)
            raise

    def new_index(self, stage: StagedGeneration, dim: int, params: IndexParams) -> VectorIndex:
        """The empty index of a new gallery (flat, IVF-PQ or auto; see `IndexParams`)."""
        if params.kind not in ("auto", "flat", "ivfpq"):
            raise ValueError(f"index kind must be auto, flat or ivfpq for a gallery directory, got {params.kind!r}")
        return VectorIndex(dim, params)

    def stage_index(self, stage: StagedGeneration, index: VectorIndex) -> VectorIndex:
        """The index a write changes: a copy of the published one, which stays usable if the write fails."""
        return index.clone()

    def current(self) -> tuple[int, dict[str, Any]]:
        """(generation, manifest) CURRENT names, its checksum checked (GalleryError / GalleryCorrupt otherwise)."""
        return read_current(self.root)

    def published_token(self) -> str:
        """Changes whenever a writer publishes (CURRENT's text; "" without one): what a long-running reader polls."""
        try:
            return (self.root / CURRENT).read_text(errors="replace")
        except OSError:
            return ""

    def local_dir(self) -> Path | None:
        """The gallery's own folder, where files added through the server are kept."""
        return self.root

    def close(self) -> None:
        """Nothing to release: every file is opened and closed by the store and the index."""

    def current_number(self) -> int | None:
        """The generation CURRENT names, unverified; None without a readable CURRENT."""
        return current_generation(self.root)

    def open(self, gen: int, manifest: dict[str, Any], verify: bool = True) -> tuple[MetadataStore, VectorIndex]:
        """The read-only metadata and the index of generation `gen`; with `verify` every file's sha256 is
        checked against the manifest first (GalleryCorrupt, naming the way out when another generation exists)."""
        try:
            verify_generation(self.root, gen, manifest, hashes=verify)
        except GalleryCorrupt as exc:
            if any(g != gen for g in all_generations(self.root)):
                raise GalleryCorrupt(f"{exc}; `reid-gallery recover {self.root}` falls back to the newest complete "
                                     "generation (the previous one is kept until the next write)") from None
            raise
        gen_dir = self.root / generation_name(gen)
        idx = read_index(self.root, gen, manifest)
        store = MetadataStore(gen_dir / "meta.sqlite", readonly=True)
        if idx.ntotal != store.count():
            raise GalleryCorrupt(f"{gen_dir}: index holds {idx.ntotal} vectors, metadata {store.count()} rows")
        return store, idx

    def begin(self, base: int | None = None, after: int = -1) -> tuple[StagedGeneration, MetadataStore]:
        """Stage the next generation (numbered past every generation on disk and `after`), lock held: a
        writable metadata store, empty or a copy of generation `base`'s. CURRENT is left as it is."""
        gen = max([after, *all_generations(self.root)]) + 1
        staged = StagedGeneration(self.root / f".tmp-{generation_name(gen)}", gen, self.current_number())
        shutil.rmtree(staged.tmp, ignore_errors=True)
        try:
            staged.tmp.mkdir()
            if base is not None:
                shutil.copyfile(self.root / generation_name(base) / "meta.sqlite", staged.tmp / "meta.sqlite")
            return staged, MetadataStore(staged.tmp / "meta.sqlite", readonly=False)
        except BaseException:
            discard_unpublished(self.root, gen)
            raise

    def publish(self, staged: StagedGeneration, index: VectorIndex, segments: list[str],
                segment_files: list[dict[str, Any]], on_stage: StageCallback | None = None) -> None:
        """Publish a staged generation (its metadata store closed) with `index` and the segments it uses
        (`publish_generation`); the one it replaces is kept, older ones are dropped."""
        publish_generation(self.root, staged.tmp, staged.gen, index, segments, segment_files,
                           previous=staged.previous, on_stage=on_stage)

    def discard(self, staged: StagedGeneration) -> None:
        """Remove what a staged generation wrote (`discard_unpublished`), unless it was published."""
        if self.current_number() != staged.gen:
            discard_unpublished(self.root, staged.gen)

    def write_segment(self, name: str, ids: np.ndarray, vectors: np.ndarray) -> list[dict[str, Any]]:
        """Write float16 copies of `vectors` under `ids` as segment `name`; returns its manifest entries."""
        return write_segment(self.root / SEGMENTS, name, ids, vectors)

    def collect_garbage(self, keep: set[int]) -> list[str]:
        """Drop every generation not in `keep` and the segments only they use; returns the names removed."""
        return collect_garbage(self.root, keep)

    def recover(self, lock_timeout: float | None = None) -> int | None:
        """Point CURRENT at the newest complete generation (`recover_current`) under the lock; None when CURRENT
        already names a complete one."""
        if not self.root.is_dir():
            raise GalleryError(f"no gallery at {self.root} (no such directory)")
        with self.locked(lock_timeout):
            return recover_current(self.root)

    def manifest_location(self, gen: int) -> str:
        """Where generation `gen`'s manifest is, for `info()`."""
        return str(self.root / generation_name(gen) / "manifest.json")
