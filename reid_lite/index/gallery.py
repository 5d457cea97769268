"""A persisted, incremental, crash-safe gallery of person crops: faiss index + SQLite metadata.

    g, report = Gallery.build("/data/gallery", cfg, ["/data/crops/cam1"])  # embed, publish generation 0
    g.add(["/data/crops/cam2"])                               # embed new crops, publish a generation
    hits = g.search(["query.jpg"], k=10, exclude_same_camera=True)
    g.remove(cameras=[3], purge=True); g.info()
    g = Gallery.open("/data/gallery")                        # verifies checksums before use

On-disk layout: see reid_lite/index/storage.py and docs/gallery.md.

Writers (build/add/remove) hold the gallery's lock for the whole operation, build the next
generation in a hidden temporary directory, fsync it, rename it into place and only then atomically
replace CURRENT. A reader follows CURRENT once, at open, so it always sees one complete generation; a
writer killed or interrupted at any point leaves CURRENT on the previous, intact generation. A build
is such a write too: it stages a fresh generation (a new database and index, not a copy of the
current one) and publishes it the same way, so `overwrite` replaces a gallery atomically and a failed
build leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from .crops import collect_crops, hash_records
from .fingerprint import check_fingerprint, fingerprint_digest, model_fingerprint, resolve_camera_num
from .querying import GallerySearch, SearchHit, SearchResults
from .storage import (
    CURRENT,
    LOCK,
    SEGMENTS,
    TEST_SLEEP_ENV,
    FingerprintMismatch,
    GalleryCorrupt,
    GalleryError,
    GalleryLocked,
    WriteLock,
    all_generations,
    collect_garbage,
    discard_unpublished,
    generation_name,
    maybe_test_sleep,
    publish_generation,
    read_current,
    recover_current,
    sha256_file,
    verify_generation,
    write_segment,
)
from .store import CropRecord, MetadataStore
from .vector_index import IndexParams, VectorIndex, VectorSegments

logger = logging.getLogger(__name__)

__all__ = [
    "TEST_SLEEP_ENV",
    "AddReport",
    "FingerprintMismatch",
    "Gallery",
    "GalleryCorrupt",
    "GalleryError",
    "GalleryLocked",
    "IndexParams",
    "SearchHit",
    "SearchResults",
    "collect_crops",
    "model_fingerprint",
    "sha256_file",
]


@dataclass
class AddReport:
    """What an add did: crops added, duplicates skipped (content hash already stored or repeated),
    unreadable files, the generation published, and timings."""

    added: int = 0
    duplicates: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    generation: int = -1
    seconds: float = 0.0
    embed_seconds: float = 0.0
    images_per_second: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict."""
        return {**self.__dict__, "num_duplicates": len(self.duplicates), "num_failed": len(self.failed)}


class _SlowLoader:
    """Wraps a DataLoader to apply the test-only per-batch sleep (see TEST_SLEEP_ENV)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.dataset = loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            yield batch
            maybe_test_sleep("batch")


@dataclass
class _Stage:
    """An unpublished build: its `.tmp-gen-N` (None for a detached, never-published gallery)."""

    tmp: Path | None
    gen: int
    previous: int | None
    broken: bool = False


Mutation = Callable[[MetadataStore, VectorIndex, int], tuple[list[str], list[dict]]]


def _is_gallery(root: Path) -> bool:
    return (root / CURRENT).exists() or any(p.name.startswith("gen-") for p in root.iterdir())


def _check_target(root: Path, overwrite: bool) -> None:
    """Refuse to build over anything but an empty directory, or a gallery when `overwrite`."""
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a directory")
    if root.is_dir() and any(p.name != LOCK for p in root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{root} exists and is not empty; pass --overwrite (overwrite=True) to replace "
                                  "the gallery there")
        if not _is_gallery(root):
            raise FileExistsError(f"refusing to overwrite {root}: it is not a gallery (no {CURRENT} file or gen-* "
                                  "generations)")


def _current_generation(root: Path) -> int | None:
    """The generation CURRENT names (unverified), None without a readable CURRENT."""
    try:
        return int((root / CURRENT).read_text().split()[0].removeprefix("gen-"))
    except (OSError, ValueError, IndexError):
        return None


class Gallery(GallerySearch):
    """A gallery directory (see the module docstring). Use :meth:`build`, :meth:`create` or :meth:`open`."""

    def __init__(self, root: Path | None, generation: int, manifest: dict[str, Any], store: MetadataStore,
                 index: VectorIndex, stage: _Stage | None = None) -> None:
        self.root = root
        self.generation = generation
        self.manifest = manifest
        self.store = store
        self._index = index
        self._stage = stage
        self._writing = False
        self.fingerprint: dict[str, Any] = store.get_meta("fingerprint")
        self._extractor = None
        self._columns: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.device: str | None = None

    # ------------------------------------------------------------------ build / create / open
    @classmethod
    def build(cls, directory: str | os.PathLike, cfg: Any, inputs: Sequence[str | os.PathLike] | Sequence[CropRecord],
              *, pattern: str | None = None, sidecar: str | os.PathLike | None = None, recursive: bool = True,
              feature: str = "global", index: str | IndexParams = "auto", camera_num: int = 0,
              overwrite: bool = False, device: str | None = None, model: torch.nn.Module | None = None,
              batch_size: int | None = None, workers: int = 0, progress: bool = False,
              lock_timeout: float | None = None) -> tuple[Gallery, AddReport]:
        """Embed crops (folders, image files or :class:`CropRecord`s) into a new gallery, published at once.

        All or nothing: on any error (an unreadable checkpoint, cameras the model lacks, every crop
        unreadable, Ctrl-C) nothing is left at `directory`, and with `overwrite` the gallery that was
        there stays current and complete. See :meth:`staging` for the model and index arguments.
        """
        t0 = time.perf_counter()
        pattern = pattern or cfg.DATASETS.FOLDER_PATTERN
        if inputs and isinstance(inputs[0], CropRecord):
            records = list(inputs)  # type: ignore[arg-type]
        else:
            records = collect_crops(inputs, pattern=pattern, sidecar=sidecar, recursive=recursive)  # type: ignore[arg-type]
        with cls.staging(directory, cfg, feature=feature, index=index, camera_num=camera_num,
                         camids=[r.camid for r in records], overwrite=overwrite, device=device, model=model,
                         pattern=pattern, lock_timeout=lock_timeout) as g:
            report = g._add_records(records, batch_size, workers, progress)
        report.seconds = time.perf_counter() - t0
        return g, report

    @classmethod
    def create(cls, directory: str | os.PathLike, cfg: Any, *, feature: str = "global",
               index: str | IndexParams = "auto", camera_num: int = 0, overwrite: bool = False,
               device: str | None = None, model: torch.nn.Module | None = None,
               pattern: str | None = None, lock_timeout: float | None = None) -> Gallery:
        """Create an empty gallery bound to the model `cfg` describes and publish it (see :meth:`staging`)."""
        with cls.staging(directory, cfg, feature=feature, index=index, camera_num=camera_num, overwrite=overwrite,
                         device=device, model=model, pattern=pattern, lock_timeout=lock_timeout) as g:
            pass
        return g

    @classmethod
    @contextlib.contextmanager
    def staging(cls, directory: str | os.PathLike | None, cfg: Any, *, feature: str = "global",
                index: str | IndexParams = "auto", camera_num: int = 0, camids: Iterable[int | None] = (),
                overwrite: bool = False, device: str | None = None, model: torch.nn.Module | None = None,
                pattern: str | None = None, lock_timeout: float | None = None) -> Iterator[Gallery]:
        """A new, unpublished gallery to `add` to; published atomically when the block ends without error.

        Weights: TEST.WEIGHT, else MODEL.PRETRAIN_*, else random init seeded with SOLVER.SEED.
        feature: 'global' stores the 768-d global (b1) feature, L2-normalised; 'full' the whole eval
        feature (3840-d with JPM). camera_num: cameras of the SIE when no checkpoint's SIE table says
        (see `resolve_camera_num`; `camids` are the crops' cameras, checked against it). index: 'auto' |
        'flat' | 'ivfpq' or an :class:`IndexParams`. A `model` may be passed to avoid building it again
        (it must be the model `cfg` describes). `pattern`: the default file-name pattern of later adds
        and of query names (else DATASETS.FOLDER_PATTERN).

        The lock is held throughout. An existing gallery (`overwrite`) stays current until the new one
        is published; an exception discards everything the block wrote. `directory` None yields a
        detached in-memory gallery that can embed but is never written (distributed workers).
        """
        if feature not in ("global", "full"):
            raise ValueError(f"feature must be 'global' or 'full', got {feature!r}")
        params = index if isinstance(index, IndexParams) else IndexParams(kind=index)
        if params.kind not in ("auto", "flat", "ivfpq"):
            raise ValueError(f"index kind must be auto, flat or ivfpq, got {params.kind!r}")
        camera_num = resolve_camera_num(cfg, camera_num, camids)
        root = None if directory is None else Path(directory)
        if root is not None:
            _check_target(root, overwrite)  # before the model is built: fail fast
        extractor = _build_extractor(cfg, camera_num, device, model)  # a bad checkpoint fails before any write
        fp = model_fingerprint(cfg, extractor.model, feature, camera_num)

        def staged(store_path: str | Path, stage: _Stage) -> Gallery:
            store = MetadataStore(store_path, readonly=False)
            for key, value in (("fingerprint", fp), ("config", cfg.dump()), ("feature", feature),
                               ("camera_num", camera_num), ("pattern", pattern or cfg.DATASETS.FOLDER_PATTERN),
                               ("created", time.time())):
                store.set_meta(key, value)
            store.commit()
            g = cls(root, -1, {"segments": [], "segment_files": []}, store, VectorIndex(fp["feature"]["dim"], params),
                    stage)
            g._extractor = extractor
            return g

        if root is None:
            g = staged(":memory:", _Stage(None, -1, None))
            try:
                yield g
            finally:
                g.store.close()
            return
        created = not root.exists()
        root.mkdir(parents=True, exist_ok=True)
        lock_existed = (root / LOCK).exists()
        stage: _Stage | None = None
        g: Gallery | None = None
        published = False
        try:
            with WriteLock(root, lock_timeout):
                _check_target(root, overwrite)  # a concurrent build may have published meanwhile
                gen = max(all_generations(root), default=-1) + 1
                stage = _Stage(root / f".tmp-{generation_name(gen)}", gen, _current_generation(root))
                shutil.rmtree(stage.tmp, ignore_errors=True)
                stage.tmp.mkdir()
                g = staged(stage.tmp / "meta.sqlite", stage)
                yield g
                if stage.broken:
                    raise GalleryError("a write to this build failed earlier; nothing was published")
                g.store.commit()
                g.store.close()
                publish_generation(root, stage.tmp, gen, g._index, g.manifest["segments"],
                                   g.manifest["segment_files"], previous=stage.previous)
                published = True
                g._stage = None
                g._reload()
        except BaseException:
            if not published and not (stage is not None and _current_generation(root) == stage.gen):
                if g is not None:
                    with contextlib.suppress(Exception):
                        g.store.close()
                if stage is not None:
                    discard_unpublished(root, stage.gen)
                if created:
                    shutil.rmtree(root, ignore_errors=True)
                elif not lock_existed and not _is_gallery(root):
                    (root / LOCK).unlink(missing_ok=True)
            raise

    @classmethod
    def open(cls, directory: str | os.PathLike, verify: bool = True) -> Gallery:
        """Open the published generation; with `verify` every file's sha256 is checked against the
        manifest (a truncated or bit-flipped file raises :class:`GalleryCorrupt`, it is never used)."""
        root = Path(directory)
        gen, manifest = read_current(root)
        gen_dir = root / generation_name(gen)
        verify_generation(root, gen, manifest, hashes=verify)
        try:
            faiss_index = faiss.read_index(str(gen_dir / "index.faiss"))
        except RuntimeError as exc:
            raise GalleryCorrupt(f"cannot read {gen_dir / 'index.faiss'}: {exc}") from None
        params = IndexParams(**manifest["index"]["params"])
        vectors = VectorSegments(root / SEGMENTS, manifest["segments"]) if manifest["segments"] else None
        store = MetadataStore(gen_dir / "meta.sqlite", readonly=True)
        if int(faiss_index.ntotal) != store.count():
            raise GalleryCorrupt(f"{gen_dir}: index holds {faiss_index.ntotal} vectors, metadata {store.count()} rows")
        idx = VectorIndex(int(manifest["index"]["dim"]), params, faiss_index, vectors)
        return cls(root, gen, manifest, store, idx)

    @classmethod
    def recover(cls, directory: str | os.PathLike, lock_timeout: float | None = None) -> tuple[Gallery, int | None]:
        """Make a gallery whose CURRENT file is missing or damaged usable again: point CURRENT at the
        newest generation whose files all verify. Returns (the gallery, the generation recovered, or
        None when CURRENT already named a complete one). Deletes nothing."""
        root = Path(directory)
        if not root.is_dir():
            raise GalleryError(f"no gallery at {root} (no such directory)")
        with WriteLock(root, lock_timeout):
            gen = recover_current(root)
        return cls.open(root), gen

    def close(self) -> None:
        """Close the metadata connection."""
        self.store.close()

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _reload(self) -> None:
        fresh = Gallery.open(self.root, verify=False)
        self.store.close()
        self.generation, self.manifest, self.store, self._index = (fresh.generation, fresh.manifest,
                                                                   fresh.store, fresh._index)
        self._columns = None

    # ------------------------------------------------------------------ model
    @property
    def cfg(self) -> Any:
        """The configuration the gallery was built with (frozen)."""
        from yacs.config import CfgNode

        cfg = CfgNode.load_cfg(self.store.get_meta("config"))
        cfg.freeze()
        return cfg

    @property
    def pattern(self) -> str:
        """Default file-name pattern (camid, optional pid and timestamp groups) of this gallery."""
        return self.store.get_meta("pattern") or self.cfg.DATASETS.FOLDER_PATTERN

    @property
    def dim(self) -> int:
        """Stored feature dimension."""
        return int(self.fingerprint["feature"]["dim"])

    @property
    def camera_num(self) -> int:
        """Cameras of the gallery model's SIE (fixed when the gallery was built)."""
        return int(self.store.get_meta("camera_num", 1))

    def extractor(self, cfg: Any | None = None, device: str | None = None) -> Any:
        """The gallery's FeatureExtractor (built from its stored config), or one for `cfg` after
        checking that `cfg` describes the same model (else :class:`FingerprintMismatch`)."""
        if cfg is None:
            if self._extractor is None:
                self._extractor = _build_extractor(self.cfg, self.camera_num, device or self.device, None)
                check_fingerprint(self.fingerprint, model_fingerprint(
                    self.cfg, self._extractor.model, self.fingerprint["feature"]["kind"], self.camera_num))
            return self._extractor
        ext = _build_extractor(cfg, self.camera_num, device or self.device, None)
        check_fingerprint(self.fingerprint, model_fingerprint(cfg, ext.model, self.fingerprint["feature"]["kind"],
                                                              self.camera_num))
        return ext

    def _post(self, feats: torch.Tensor | np.ndarray) -> np.ndarray:
        x = feats.numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats)
        x = x.astype(np.float32, copy=False)
        if self.fingerprint["feature"]["kind"] == "global":
            x = x[:, : self.fingerprint["architecture"]["embed_dim"]]
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        return np.ascontiguousarray(x / np.maximum(norm, 1e-12), dtype=np.float32)

    def embed_records(self, records: Sequence[CropRecord], batch_size: int | None = None, workers: int = 0,
                      progress: bool = False, *, extractor: Any | None = None, what: str = "crop"
                      ) -> tuple[np.ndarray, list[int], list[str], float]:
        """Embed crops: (features (n, D), positions in `records` of the n embedded crops, unreadable
        paths, seconds). Uses the data package's loader (an unreadable image is skipped and reported,
        never fatal) and the engine's `extract_features`. `extractor`: another model of the same
        fingerprint (default: the gallery's)."""
        from torch.utils.data import DataLoader

        from ..data import ImageDataset, ReIDCollate, build_transforms
        from ..engine.extractor import extract_features

        ext = extractor or self.extractor()
        cfg = ext.cfg
        sie = bool(self.fingerprint["architecture"]["sie_camera"])
        if sie:
            bad = [r for r in records if r.camid is None or not 0 <= r.camid < self.camera_num]
            if bad:
                cams = sorted({r.camid for r in bad if r.camid is not None})
                raise ValueError(
                    f"this gallery's model has a camera SIE over {self.camera_num} cameras (0-based ids 0.."
                    f"{self.camera_num - 1}), fixed when it was built; {len(bad)} {what}(s) have "
                    + (f"camera(s) {', '.join(map(str, cams[:5]))}" if cams else "no camera")
                    + f", e.g. {bad[0].path}. Map them onto its cameras (--sidecar / --query-camera) or build a new "
                    "gallery for more cameras (--camera-num N, or a checkpoint trained on them)")
        ds = ImageDataset([(r.path, r.identity if r.identity is not None else -1, r.camid or 0, 0) for r in records],
                          build_transforms(cfg, is_train=False))
        loader = DataLoader(ds, batch_size=int(batch_size or cfg.TEST.IMS_PER_BATCH), shuffle=False,
                            num_workers=workers, collate_fn=ReIDCollate(cfg.INPUT.SIZE_TEST))
        out = extract_features(ext.model, _SlowLoader(loader), device=ext.device, amp=cfg.TEST.AMP,
                               flip=bool(cfg.TEST.FLIP), feat_norm=True, use_camera=sie,
                               progress=progress, desc="embed" if what == "crop" else what)
        return self._post(out.feats), [int(i) for i in out.indices], list(out.failed), out.seconds

    # ------------------------------------------------------------------ writes
    @contextlib.contextmanager
    def writing(self, lock_timeout: float | None = None) -> Iterator[Gallery]:
        """Hold the write lock (re-entrant for this object) on the newest published generation.

        Writes inside the block (add, add_features, remove, purge) do not lock again; several writes
        then run without another writer in between. `lock_timeout`: seconds to wait for another
        writer (None: forever, with a repeating message), then :class:`GalleryLocked`."""
        if self._stage is not None or self._writing:
            yield self
            return
        with WriteLock(self.root, lock_timeout):
            self._writing = True
            try:
                self._reload()  # another writer may have published since we opened
                yield self
            finally:
                self._writing = False

    def add(self, inputs: Sequence[str | os.PathLike] | Sequence[CropRecord], *, pattern: str | None = None,
            sidecar: str | os.PathLike | None = None, recursive: bool = True, batch_size: int | None = None,
            workers: int = 0, progress: bool = False, lock_timeout: float | None = None) -> AddReport:
        """Embed new crops (folders, image files, or :class:`CropRecord`s) and publish a new generation.

        Crops whose content hash is already stored (or repeated in `inputs`) are skipped before any
        embedding; existing crops are never re-embedded. All-or-nothing: either the whole batch is
        published or (error, crash, Ctrl-C) the previous generation stays current. `progress`: tqdm
        bars for hashing and embedding on stderr.
        """
        t0 = time.perf_counter()
        if inputs and isinstance(inputs[0], CropRecord):
            records = list(inputs)  # type: ignore[arg-type]
        else:
            records = collect_crops(inputs, pattern=pattern or self.pattern, sidecar=sidecar,  # type: ignore[arg-type]
                                    recursive=recursive)
        with self.writing(lock_timeout):
            report = self._add_records(records, batch_size, workers, progress)
        report.seconds = time.perf_counter() - t0
        return report

    def _add_records(self, records: Sequence[CropRecord], batch_size: int | None, workers: int,
                     progress: bool) -> AddReport:
        """Hash, dedupe, embed and publish `records` (lock held)."""
        hashed, unreadable = hash_records(records, progress)
        new, dups = self.dedupe(hashed)
        report = AddReport(duplicates=dups, failed=unreadable)
        feats = np.empty((0, self.dim), np.float32)
        if new:
            feats, pos, failed, secs = self.embed_records(new, batch_size, workers, progress)
            report.failed += failed
            report.embed_seconds = secs
            report.images_per_second = len(pos) / secs if secs > 0 else 0.0
            new = [new[i] for i in pos]
        if report.failed and not new and len(report.failed) == len(records) - len(dups):
            raise GalleryError(f"none of the {len(report.failed)} new crop(s) could be read (e.g. "
                               f"{', '.join(report.failed[:3])}); nothing was written")
        self._publish_add(new, feats, report)
        return report

    def dedupe(self, records: Sequence[CropRecord]) -> tuple[list[CropRecord], list[str]]:
        """(records to store, paths of duplicates): a content hash already stored or seen earlier in `records`."""
        known = self.store.known_hashes(r.sha256 for r in records)
        new, dups, seen = [], [], set()
        for r in records:
            if r.sha256 in known or r.sha256 in seen:
                dups.append(r.path)
            else:
                seen.add(r.sha256)
                new.append(r)
        return new, dups

    def add_features(self, records: Sequence[CropRecord], feats: np.ndarray,
                     fingerprint: dict[str, Any] | None = None, lock_timeout: float | None = None) -> AddReport:
        """Store precomputed features (rows L2-normalised by the gallery's model) with their records
        (sha256 required). `fingerprint` (recommended) is checked against the gallery's."""
        if fingerprint is not None:
            check_fingerprint(self.fingerprint, fingerprint)
        feats = np.asarray(feats, np.float32)
        if feats.shape != (len(records), self.dim):
            raise ValueError(f"features must be ({len(records)}, {self.dim}), got {feats.shape}")
        if any(not r.sha256 for r in records):
            raise ValueError("records need their content sha256")
        with self.writing(lock_timeout):
            new, dups = self.dedupe(records)
            keep = {id(r) for r in new}
            rows = [i for i, r in enumerate(records) if id(r) in keep]
            report = AddReport(duplicates=dups)
            self._publish_add(new, feats if len(rows) == len(records) else feats[rows], report)
        return report

    def _publish_add(self, new: Sequence[CropRecord], feats: np.ndarray, report: AddReport) -> None:
        def mutate(store: MetadataStore, idx: VectorIndex, gen: int) -> tuple[list[str], list[dict]]:
            # A staged build may add several times before it publishes: number its segments apart.
            name = f"seg-{gen:06d}" + (f"-{len(self.manifest['segments'])}" if self._stage is not None else "")
            names, entries = idx.prepare(feats, self.root / SEGMENTS, name)
            ids = store.insert(new, gen)
            if len(ids):
                idx.add(ids, feats)
                if idx.kind == "ivfpq":  # float16 copies for exact re-ranking of the shortlist
                    entries += write_segment(self.root / SEGMENTS, name, ids, feats)
                    names.append(name)
            return names, entries

        report.added = len(new)
        report.generation = self._write(mutate)

    def remove(self, paths: Sequence[str] | None = None, cameras: Sequence[int] | None = None,
               ids: Sequence[int] | None = None, lock_timeout: float | None = None, purge: bool = False) -> int:
        """Remove crops by path, camera id or gallery id (union); publishes a generation; returns the count.

        Vectors leave the faiss index (IndexIDMap2 / IndexIVFPQ remove_ids) and rows the SQLite table
        (with secure_delete: their bytes are overwritten). The previous generation still holds them
        until the next write, and adding their files again stores them again (removal is not a block
        list). `purge`: also drop every older generation now (:meth:`purge`).
        """
        removed = 0
        with self.writing(lock_timeout):
            sel: set[int] = set(int(i) for i in ids or ())
            if paths:
                absolute = [os.path.abspath(p) for p in paths]
                for s in range(0, len(absolute), 900):
                    sel.update(self.store.ids_where(paths=absolute[s:s + 900]).tolist())
            if cameras:
                sel.update(self.store.ids_where(cameras=list(cameras)).tolist())
            known = self.store.get(sorted(sel))
            target = np.array(sorted(known), dtype=np.int64)
            if len(target):
                def mutate(store: MetadataStore, idx: VectorIndex, gen: int) -> tuple[list[str], list[dict]]:
                    nonlocal removed
                    store.delete(target.tolist())
                    removed = idx.remove(target)
                    if removed != len(target):
                        raise GalleryCorrupt(f"index removed {removed} of {len(target)} ids; metadata and index "
                                             "disagree")
                    return [], []

                self._write(mutate)
            if purge:
                self.purge()
        return removed

    def purge(self, lock_timeout: float | None = None) -> list[str]:
        """Delete every generation but the current one now (and segments only they use); returns the
        names deleted. After a removal, this is what takes the removed crops off the disk; a reader
        that had an older generation open keeps its open files (POSIX) until it closes them.

        An IVF-PQ gallery whose float16 re-ranking segments still hold removed crops first publishes
        a generation with one compacted segment of the live crops, so that those copies go too."""
        with self.writing(lock_timeout):
            if self._stage is not None:
                return []
            vectors = self._index.vectors
            if vectors is not None and len(vectors.ids) != self._index.ntotal:
                live = self.store.all_ids()
                kept = vectors.get(live)  # float16 -> float32 -> float16 is exact

                def compact(store: MetadataStore, idx: VectorIndex, gen: int) -> tuple[list[str], list[dict]]:
                    name = f"seg-{gen:06d}-compact"
                    return [name], write_segment(self.root / SEGMENTS, name, live, kept)

                self._write(compact, replace_segments=True)
            return collect_garbage(self.root, {self.generation})

    def _write(self, mutate: Mutation, replace_segments: bool = False) -> int:
        """Build the next generation from the current one with `mutate` and publish it (lock held).
        The segments `mutate` returns are added to the current ones, or replace them. A staged build
        applies `mutate` to its own unpublished generation instead."""
        if self._stage is not None:
            if self._stage.tmp is None:
                raise GalleryError("a detached gallery (directory None) embeds only; it cannot be written")
            try:
                names, entries = mutate(self.store, self._index, self._stage.gen)
                self.store.commit()
            except BaseException:
                self._stage.broken = True  # store and index may disagree now: never publish this build
                raise
            self.manifest["segments"] += names
            self.manifest["segment_files"] += entries
            self._columns = None
            return self._stage.gen
        gen = max([self.generation, *all_generations(self.root)]) + 1
        tmp = self.root / f".tmp-{generation_name(gen)}"
        store = None
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            shutil.copyfile(self.root / generation_name(self.generation) / "meta.sqlite", tmp / "meta.sqlite")
            store = MetadataStore(tmp / "meta.sqlite", readonly=False)
            idx = self._index.clone()  # the open gallery stays usable if anything below fails
            names, entries = mutate(store, idx, gen)
            store.commit()
            store.close()
            keep = not replace_segments
            publish_generation(self.root, tmp, gen, idx, list(self.manifest["segments"]) * keep + names,
                               list(self.manifest["segment_files"]) * keep + entries, previous=self.generation)
        except BaseException:
            if _current_generation(self.root) != gen:  # not published: leave no debris behind
                if store is not None:
                    with contextlib.suppress(Exception):
                        store.close()
                discard_unpublished(self.root, gen)
            raise
        self._reload()
        return gen

    # ------------------------------------------------------------------ info
    def info(self) -> dict[str, Any]:
        """Size, model fingerprint, index type and parameters, generation, bytes on disk, cameras."""
        gen_dir = self.root / generation_name(self.generation)
        disk = sum(f["bytes"] for f in self.manifest["files"]) + sum(f["bytes"] for f in self.manifest["segment_files"])
        return {
            "path": str(self.root.resolve()),
            "generation": self.generation,
            "size": self.store.count(),
            "index": {"kind": self._index.kind, "ntotal": self._index.ntotal, "params": self._index.params.to_dict()},
            "model": self.fingerprint,
            "model_digest": fingerprint_digest(self.fingerprint),
            "cameras": {str(k): v for k, v in self.store.cameras().items()},
            "bytes": disk,
            "bytes_per_crop": disk / max(1, self.store.count()),
            "manifest": str(gen_dir / "manifest.json"),
            "created": self.store.get_meta("created"),
        }


def _build_extractor(cfg: Any, camera_num: int, device: str | None, model: torch.nn.Module | None) -> Any:
    """FeatureExtractor for `cfg`; random initialisation is seeded (SOLVER.SEED) so that every process
    building the same gallery model gets the same weights, without touching the global RNG."""
    from ..engine.extractor import FeatureExtractor

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.SOLVER.SEED))
        return FeatureExtractor(cfg, model=model, weights=cfg.TEST.WEIGHT or None,
                                device=device or cfg.MODEL.DEVICE, camera_num=camera_num)
