"""Writing to a gallery: the lock, add (hash, dedupe, embed), precomputed features, remove, purge.

`GalleryWrites` is the write half of `reid_lite.index.Gallery` (which mixes it in). Every write
builds the next generation from the current one and publishes it atomically (storage.py); inside a
staged build (`Gallery.staging`) the writes go to the unpublished generation instead.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .crops import collect_crops, hash_records
from .fingerprint import check_fingerprint
from .interfaces import CropMetadata, GalleryStorage
from .storage import GalleryCorrupt, GalleryError, StageCallback, StagedGeneration
from .store import CropRecord
from .vector_index import VectorIndex

__all__ = ["AddReport", "AfterInsert", "GalleryWrites", "Mutation", "StagedGeneration"]


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


Mutation = Callable[[CropMetadata, VectorIndex, int], tuple[list[str], list[dict]]]
#: Called inside a write with the staged metadata, the ids just given to the new records, the records and the
#: generation being written: rows of other tables that belong to those records (tracklets) are written here, so
#: they publish with them or not at all.
AfterInsert = Callable[[CropMetadata, np.ndarray, Sequence[CropRecord], int], None]


class GalleryWrites:
    """Write methods of a gallery (mixed into `reid_lite.index.Gallery`)."""

    storage: GalleryStorage
    generation: int
    manifest: dict[str, Any]
    store: CropMetadata
    index: VectorIndex
    staged: StagedGeneration | None
    on_stage: StageCallback | None

    @contextlib.contextmanager
    def writing(self, lock_timeout: float | None = None) -> Iterator[GalleryWrites]:
        """Hold the write lock (re-entrant for this object) on the newest published generation.

        Writes inside the block (add, add_features, remove, purge) do not lock again; several writes
        then run without another writer in between. `lock_timeout`: seconds to wait for another
        writer (None: forever, with a repeating message), then `GalleryLocked`."""
        if self.staged is not None:
            yield self
            return
        with self.storage.locked(lock_timeout) as taken:
            if taken:
                self.reload()  # another writer may have published since we opened
                self.notify("locked")
            yield self

    def add(self, inputs: Sequence[str | os.PathLike] | Sequence[CropRecord], *, pattern: str | None = None,
            sidecar: str | os.PathLike | None = None, recursive: bool = True, batch_size: int | None = None,
            workers: int = 0, progress: bool = False, lock_timeout: float | None = None) -> AddReport:
        """Embed new crops (folders, image files, or `CropRecord`s) and publish a new generation.

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
        self.check_cameras(records)  # before hashing a large collection for nothing
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
        self.notify("embedded")
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
                     fingerprint: dict[str, Any] | None = None, lock_timeout: float | None = None,
                     after_insert: AfterInsert | None = None) -> AddReport:
        """Store precomputed features (rows L2-normalised by the gallery's model) with their records
        (sha256 required). `fingerprint` (recommended) is checked against the gallery's. `after_insert`
        writes rows that belong to the new records in the same generation (see `AfterInsert`)."""
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
            self._publish_add(new, feats if len(rows) == len(records) else feats[rows], report, after_insert)
        return report

    def _publish_add(self, new: Sequence[CropRecord], feats: np.ndarray, report: AddReport,
                     after_insert: AfterInsert | None = None) -> None:
        # Every write passes here: a NaN/inf row would match nothing (or everything) in every later search.
        bad = np.flatnonzero(~np.isfinite(feats).all(axis=1)) if len(feats) else []
        if len(bad):
            raise GalleryError(f"{len(bad)} of {len(feats)} feature(s) are not finite (NaN or inf), e.g. for "
                               f"{', '.join(new[i].path for i in bad[:3])}: nothing was written (a NaN/inf "
                               "pixel in a preprocessed tensor, or a diverged model)")
        def mutate(store: CropMetadata, idx: VectorIndex, gen: int) -> tuple[list[str], list[dict]]:
            # A staged build may add several times before it publishes: number its segments apart.
            name = f"seg-{gen:06d}" + (f"-{len(self.manifest['segments'])}" if self.staged is not None else "")
            moved_ids, moved = idx.prepare(feats)  # a switch to IVF-PQ: float16 copies of the vectors moved over
            names, entries = ([f"{name}-conv"], self.storage.write_segment(f"{name}-conv", moved_ids, moved)
                              ) if len(moved_ids) else ([], [])
            ids = store.insert(new, gen)
            stored = ids >= 0  # -1: a concurrent writer stored the same content first (a database backend)
            report.added = int(stored.sum())
            report.duplicates += [r.path for r, keep in zip(new, stored) if not keep]
            if after_insert is not None:
                after_insert(store, ids[stored], [r for r, keep in zip(new, stored) if keep], gen)
            if report.added:
                ids, kept = ids[stored], feats[stored]
                idx.add(kept, ids)
                if idx.kind == "ivfpq":  # float16 copies for exact re-ranking of the shortlist
                    entries += self.storage.write_segment(name, ids, kept)
                    names.append(name)
            return names, entries

        report.added = 0
        if not new and self.staged is None:  # nothing new (all duplicates): the current generation stands
            report.generation = self.generation
            return
        report.generation = self.write_generation(mutate)

    def remove(self, paths: Sequence[str] | None = None, cameras: Sequence[int] | None = None,
               ids: Sequence[int] | None = None, lock_timeout: float | None = None, purge: bool = False) -> int:
        """Remove crops by path, camera id or gallery id (union); publishes a generation; returns the count.

        Vectors leave the faiss index (IndexIDMap2 / IndexIVFPQ remove_ids) and rows the SQLite table
        (with secure_delete: their bytes are overwritten). The previous generation still holds them
        until the next write, and adding their files again stores them again (removal is not a block
        list). `purge`: also drop every older generation now (`purge`).
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
                def mutate(store: CropMetadata, idx: VectorIndex, gen: int) -> tuple[list[str], list[dict]]:
                    nonlocal removed
                    removed = idx.remove(target)  # first: a database's index counts the rows it is to delete
                    store.delete(target.tolist())
                    if removed != len(target):
                        raise GalleryCorrupt(f"index removed {removed} of {len(target)} ids; metadata and index "
                                             "disagree")
                    return [], []

                self.write_generation(mutate)
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
            if self.staged is not None:
                return []
            vectors = self.index.vectors
            if vectors is not None and len(vectors.ids) != self.index.ntotal:
                live = self.store.all_ids()
                kept = vectors.get(live)  # float16 -> float32 -> float16 is exact

                def compact(store: CropMetadata, idx: VectorIndex, gen: int) -> tuple[list[str], list[dict]]:
                    name = f"seg-{gen:06d}-compact"
                    return [name], self.storage.write_segment(name, live, kept)

                self.write_generation(compact, replace_segments=True)
            return self.storage.collect_garbage({self.generation})

    def write_generation(self, mutate: Mutation, replace_segments: bool = False) -> int:
        """Build the next generation from the current one with `mutate` and publish it; returns its number.
        Call it inside `writing` (the lock held). `mutate(store, index, generation)` changes copies
        of the metadata and the index and returns the segments it wrote (names, manifest entries), which
        are added to the current ones, or replace them. A staged build applies `mutate` to its own
        unpublished generation instead."""
        if self.staged is not None:
            if self.staged.detached:
                raise GalleryError("a detached gallery (directory None) embeds only; it cannot be written")
            try:
                names, entries = mutate(self.store, self.index, self.staged.gen)
                self.store.commit()
            except BaseException:
                self.staged.broken = True  # store and index may disagree now: never publish this build
                raise
            self.manifest["segments"] += names
            self.manifest["segment_files"] += entries
            return self.staged.gen
        staged, store = self.storage.begin(base=self.generation, after=self.generation)
        try:
            idx = self.storage.stage_index(staged, self.index)  # the open gallery stays usable if this write fails
            names, entries = mutate(store, idx, staged.gen)
            store.commit()
            store.close()
            self.notify("staged")
            keep = not replace_segments
            self.storage.publish(staged, idx, list(self.manifest["segments"]) * keep + names,
                                 list(self.manifest["segment_files"]) * keep + entries, on_stage=self.on_stage)
        except BaseException:
            with contextlib.suppress(Exception):
                store.close()
            self.storage.discard(staged)  # unless it was published: leave no debris behind
            raise
        self.reload()
        return staged.gen
