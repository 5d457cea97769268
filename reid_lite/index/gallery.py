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
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backends import storage_for
from .calibration import GalleryCalibration
from .crops import collect_crops
from .embedding import GalleryEncoder, build_extractor
from .fingerprint import (
    accepts_merged_queries,
    allow_merged_queries,
    model_digest,
    model_fingerprint,
    resolve_camera_num,
)
from .interfaces import CropMetadata, GalleryStorage
from .querying import GallerySearch, SearchHit, SearchResults
from .storage import (
    STAGES,
    FingerprintMismatch,
    GalleryCorrupt,
    GalleryError,
    GalleryLocked,
    StageCallback,
    StagedGeneration,
    sha256_file,
)
from .store import CropRecord, MetadataStore
from .vector_index import IndexParams, VectorIndex
from .writes import AddReport, GalleryWrites

logger = logging.getLogger(__name__)

__all__ = [
    "STAGES",
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


class Gallery(GallerySearch, GalleryWrites, GalleryCalibration):
    """A gallery directory (see the module docstring). Use `build`, `create` or `open`.

    Built from parts, each behind a small interface (`reid_lite.index.interfaces`): `storage` (generations and
    the write lock, a `DirectoryStorage`), `store` (the generation's crop metadata), `index` (its `VectorIndex`)
    and `encoder` (the gallery's model, a `GalleryEncoder`); search, writes and calibration go through them.

    `on_stage`: a callable called with the name of each stage a write of this gallery reaches (see
    `STAGES`); an exception it raises aborts the write there, which leaves the published generation
    as it was (before "published") or the new one published whole. Tests pause and fail writers with it.
    Without one, the class attribute applies (None: no callback).
    """

    on_stage: StageCallback | None = None

    def __init__(self, storage: GalleryStorage | None, generation: int, manifest: dict[str, Any],
                 store: CropMetadata, index: VectorIndex, staged: StagedGeneration | None = None,
                 on_stage: StageCallback | None = None) -> None:
        self.storage = storage  # None: a detached gallery (directory None) that embeds but is never written
        self.generation = generation
        self.manifest = manifest
        self.store = store
        self.index = index
        self.staged = staged
        if on_stage is not None:
            self.on_stage = on_stage
        self.encoder = GalleryEncoder.from_metadata(store)
        self.fingerprint: dict[str, Any] = self.encoder.fingerprint

    # ------------------------------------------------------------------ the encoder's face
    def notify(self, stage: str) -> None:
        """Call the gallery's `on_stage` callback, if any, at `stage` of a write (see storage.STAGES)."""
        if self.on_stage is not None:
            self.on_stage(stage)

    @property
    def cfg(self) -> Any:
        """The configuration the gallery was built with (frozen)."""
        return self.encoder.cfg

    @property
    def pattern(self) -> str:
        """Default file-name pattern (camid, optional pid and timestamp groups) of this gallery."""
        return self.encoder.pattern

    @property
    def dim(self) -> int:
        """Stored feature dimension."""
        return self.encoder.dim

    @property
    def camera_num(self) -> int:
        """Cameras of the gallery model's SIE (fixed when the gallery was built)."""
        return self.encoder.camera_num

    @property
    def device(self) -> str | None:
        """The device the gallery's model runs on (None: MODEL.DEVICE of its config)."""
        return self.encoder.device

    @device.setter
    def device(self, device: str | None) -> None:
        self.encoder.device = device

    def extractor(self, cfg: Any | None = None, device: str | None = None) -> Any:
        """The gallery's FeatureExtractor, or one for the query model `cfg` (`GalleryEncoder.extractor`)."""
        return self.encoder.extractor(cfg, device)

    def query_model(self, cfg: Any, device: str | None = None) -> tuple[Any, dict[str, Any]]:
        """(FeatureExtractor, fingerprint) of a query model the gallery accepts (`GalleryEncoder.query_model`)."""
        return self.encoder.query_model(cfg, device)

    def use_extractor(self, extractor: Any) -> None:
        """Embed with `extractor`, a FeatureExtractor of this gallery's model."""
        self.encoder.use_extractor(extractor)

    def share_model(self, other: Gallery) -> None:
        """Use `other`'s already built model (same fingerprint), so that reopening does not build it again."""
        self.encoder.share_model(other.encoder)

    def normalize_features(self, feats: torch.Tensor | np.ndarray) -> np.ndarray:
        """Features as the gallery stores them (`GalleryEncoder.normalize_features`)."""
        return self.encoder.normalize_features(feats)

    def check_cameras(self, records: Sequence[CropRecord], what: str = "crop") -> None:
        """ValueError when a record's camera is outside the model's SIE table (`GalleryEncoder.check_cameras`)."""
        self.encoder.check_cameras(records, what)

    def embed_records(self, records: Sequence[CropRecord], batch_size: int | None = None, workers: int = 0,
                      progress: bool = False, *, extractor: Any | None = None, what: str = "crop"
                      ) -> tuple[np.ndarray, list[int], list[str], float]:
        """Embed crops with the gallery's model (`GalleryEncoder.embed_records`); a write's stage callback sees
        every batch ("batch embedded")."""
        on_batch = self.notify if self.on_stage is not None and what == "crop" else None
        return self.encoder.embed_records(records, batch_size, workers, progress, extractor=extractor, what=what,
                                          on_batch=on_batch)

    # ------------------------------------------------------------------ build / create / open
    @classmethod
    def build(cls, directory: str | os.PathLike | GalleryStorage, cfg: Any,
              inputs: Sequence[str | os.PathLike] | Sequence[CropRecord],
              *, pattern: str | None = None, sidecar: str | os.PathLike | None = None, recursive: bool = True,
              feature: str = "global", index: str | IndexParams = "auto", camera_num: int = 0,
              overwrite: bool = False, device: str | None = None, model: torch.nn.Module | None = None,
              batch_size: int | None = None, workers: int = 0, progress: bool = False,
              lock_timeout: float | None = None, accept_merged_queries: bool = False,
              on_stage: StageCallback | None = None) -> tuple[Gallery, AddReport]:
        """Embed crops (folders, image files or `CropRecord`s) into a new gallery, published at once.

        All or nothing: on any error (an unreadable checkpoint, cameras the model lacks, every crop
        unreadable, Ctrl-C) nothing is left at `directory`, and with `overwrite` the gallery that was
        there stays current and complete. See `staging` for the model and index arguments.
        """
        t0 = time.perf_counter()
        pattern = pattern or cfg.DATASETS.FOLDER_PATTERN
        if inputs and isinstance(inputs[0], CropRecord):
            records = list(inputs)  # type: ignore[arg-type]
        else:
            records = collect_crops(inputs, pattern=pattern, sidecar=sidecar, recursive=recursive)  # type: ignore[arg-type]
        with cls.staging(directory, cfg, feature=feature, index=index, camera_num=camera_num,
                         camids=[r.camid for r in records], overwrite=overwrite, device=device, model=model,
                         pattern=pattern, lock_timeout=lock_timeout,
                         accept_merged_queries=accept_merged_queries, on_stage=on_stage) as g:
            report = g.add(records, batch_size=batch_size, workers=workers, progress=progress)
        report.seconds = time.perf_counter() - t0
        return g, report

    @classmethod
    def create(cls, directory: str | os.PathLike | GalleryStorage, cfg: Any, *, feature: str = "global",
               index: str | IndexParams = "auto", camera_num: int = 0, overwrite: bool = False,
               device: str | None = None, model: torch.nn.Module | None = None,
               pattern: str | None = None, lock_timeout: float | None = None,
               accept_merged_queries: bool = False, on_stage: StageCallback | None = None) -> Gallery:
        """Create an empty gallery bound to the model `cfg` describes and publish it (see `staging`)."""
        with cls.staging(directory, cfg, feature=feature, index=index, camera_num=camera_num, overwrite=overwrite,
                         device=device, model=model, pattern=pattern, lock_timeout=lock_timeout,
                         accept_merged_queries=accept_merged_queries, on_stage=on_stage) as g:
            pass
        return g

    @classmethod
    @contextlib.contextmanager
    def staging(cls, directory: str | os.PathLike | GalleryStorage | None, cfg: Any, *, feature: str = "global",
                index: str | IndexParams = "auto", camera_num: int = 0, camids: Iterable[int | None] = (),
                overwrite: bool = False, device: str | None = None, model: torch.nn.Module | None = None,
                pattern: str | None = None, lock_timeout: float | None = None,
                accept_merged_queries: bool = False, on_stage: StageCallback | None = None) -> Iterator[Gallery]:
        """A new, unpublished gallery to `add` to; published atomically when the block ends without error.

        Weights: TEST.WEIGHT, else MODEL.PRETRAIN_*, else random init seeded with SOLVER.SEED.
        feature: 'global' stores the 768-d global (b1) feature, L2-normalised; 'full' the whole eval
        feature (3840-d with JPM). camera_num: cameras of the SIE when no checkpoint's SIE table says
        (see `resolve_camera_num`; `camids` are the crops' cameras, checked against it). index: 'auto' |
        'flat' | 'ivfpq' or an `IndexParams`. A `model` may be passed to avoid building it again
        (it must be the model `cfg` describes). `pattern`: the default file-name pattern of later adds
        and of query names (else DATASETS.FOLDER_PATTERN). `accept_merged_queries`: also accept queries
        from the same model with token merging (only for a gallery embedded without merging; recorded in
        the fingerprint, see `reid_lite.index.fingerprint.allow_merged_queries`). `directory`: a folder, a
        `postgresql://` URI or a storage object (`reid_lite.index.backends.storage_for`).

        The lock is held throughout (a database backend needs none: the build is one transaction). An existing
        gallery (`overwrite`) stays current until the new one is published; an exception discards everything the
        block wrote. `directory` None yields a detached in-memory gallery that can embed but is never written
        (distributed workers).
        `on_stage`: the write-stage callback (see the class docstring).
        """
        if feature not in ("global", "full"):
            raise ValueError(f"feature must be 'global' or 'full', got {feature!r}")
        params = index if isinstance(index, IndexParams) else IndexParams(kind=index)
        if params.kind not in ("auto", "flat", "ivfpq", "hnsw"):
            raise ValueError(f"index kind must be auto, flat, ivfpq or hnsw, got {params.kind!r}")
        if accept_merged_queries and str(cfg.MERGE.METHOD).lower() != "none":
            raise ValueError(f"--accept-merged-queries needs a gallery embedded without token merging "
                             f"(MERGE.METHOD none), not {cfg.MERGE.METHOD!r}: the gallery holds the model's own "
                             "features and merged queries approximate them")
        camera_num = resolve_camera_num(cfg, camera_num, camids)
        storage = None if directory is None else storage_for(directory)
        if storage is not None:
            storage.check_target(overwrite)  # before the model is built: fail fast
        extractor = build_extractor(cfg, camera_num, device, model)  # a bad checkpoint fails before any write
        fp = model_fingerprint(cfg, extractor.model, feature, camera_num)
        if accept_merged_queries:
            fp = allow_merged_queries(fp)
        meta = {"fingerprint": fp, "config": cfg.dump(), "feature": feature, "camera_num": camera_num,
                "pattern": pattern or cfg.DATASETS.FOLDER_PATTERN, "created": time.time()}
        with cls.staging_from_metadata(storage, meta, index=params, overwrite=overwrite, lock_timeout=lock_timeout,
                                       on_stage=on_stage, extractor=extractor) as g:
            yield g

    @classmethod
    @contextlib.contextmanager
    def staging_from_metadata(cls, storage: GalleryStorage | str | os.PathLike | None, meta: dict[str, Any], *,
                              index: IndexParams | None = None, overwrite: bool = False,
                              lock_timeout: float | None = None, on_stage: StageCallback | None = None,
                              extractor: Any | None = None) -> Iterator[Gallery]:
        """A new, unpublished gallery whose metadata is `meta` (fingerprint, config, feature, camera_num, pattern,
        created; optionally calibration), published atomically when the block ends without error: what
        `staging` does once it has the model, and what `migrate` does with another gallery's metadata
        (`extractor` None: the model is built only if the gallery embeds). `storage`: a storage object, a folder
        or a database URI (`storage_for`); None: a detached gallery (see `staging`)."""
        params = index if index is not None else IndexParams()
        dim = int(meta["fingerprint"]["feature"]["dim"])

        def staged(storage: GalleryStorage | None, store: CropMetadata, stage: StagedGeneration,
                   idx: VectorIndex) -> Gallery:
            for key, value in meta.items():
                store.set_meta(key, value)
            store.commit()
            g = cls(storage, -1, {"segments": [], "segment_files": []}, store, idx, stage, on_stage)
            if extractor is not None:
                g.use_extractor(extractor)
            return g

        if storage is None:
            stage = StagedGeneration(None, -1, None, detached=True)
            g = staged(None, MetadataStore(":memory:", readonly=False), stage, VectorIndex(dim, params))
            try:
                yield g
            finally:
                g.store.close()
            return
        storage = storage_for(storage)
        g: Gallery | None = None
        try:
            with storage.building(overwrite, lock_timeout) as (stage, store):
                try:
                    g = staged(storage, store, stage, storage.new_index(stage, dim, params))
                except BaseException:
                    with contextlib.suppress(Exception):
                        store.close()
                    raise
                g.notify("locked")
                yield g
                if stage.broken:
                    raise GalleryError("a write to this build failed earlier; nothing was published")
                g.store.commit()
                g.store.close()
                g.notify("staged")
                storage.publish(stage, g.index, g.manifest["segments"], g.manifest["segment_files"],
                                on_stage=g.on_stage)
                g.staged = None
                g.reload()
        except BaseException:
            if g is not None and g.staged is not None:
                with contextlib.suppress(Exception):
                    g.store.close()
            raise

    @classmethod
    def open(cls, gallery: str | os.PathLike | GalleryStorage, verify: bool = True,
             on_stage: StageCallback | None = None) -> Gallery:
        """Open the published generation of `gallery` (a folder, a database URI or a storage object: `storage_for`);
        with `verify` every file's sha256 is checked against the manifest (a truncated or bit-flipped file raises
        `GalleryCorrupt`, it is never used).
        `on_stage`: the write-stage callback of this gallery's writes (see the class docstring)."""
        return cls.from_storage(storage_for(gallery), verify, on_stage)

    @classmethod
    def from_storage(cls, storage: GalleryStorage, verify: bool = True, on_stage: StageCallback | None = None
                     ) -> Gallery:
        """The gallery published in `storage` (see `open`)."""
        gen, manifest = storage.current()
        store, idx = storage.open(gen, manifest, verify)
        return cls(storage, gen, manifest, store, idx, on_stage=on_stage)

    @classmethod
    def recover(cls, gallery: str | os.PathLike | GalleryStorage, lock_timeout: float | None = None
                ) -> tuple[Gallery, int | None]:
        """Make a gallery whose CURRENT file is missing or damaged usable again: point CURRENT at the
        newest generation whose files all verify. Returns (the gallery, the generation recovered, or
        None when CURRENT already named a complete one). Deletes nothing."""
        storage = storage_for(gallery)
        gen = storage.recover(lock_timeout)
        return cls.from_storage(storage), gen

    @property
    def root(self) -> Path | None:
        """The gallery's own folder (None for a detached gallery or a backend without one)."""
        return None if self.storage is None else self.storage.local_dir()

    def close(self) -> None:
        """Close the metadata connection (and the storage's, for a database)."""
        self.store.close()
        if self.storage is not None:
            self.storage.close()

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reload(self) -> None:
        """Follow CURRENT to the newest published generation (checksums not verified: a writer calls it
        after its own publish, or with the lock held)."""
        gen, manifest = self.storage.current()
        store, index = self.storage.open(gen, manifest, verify=False)
        self.store.close()
        self.generation, self.manifest, self.store, self.index = gen, manifest, store, index

    # ------------------------------------------------------------------ info
    def info(self) -> dict[str, Any]:
        """Size, model fingerprint, index type and parameters, generation, bytes on disk, cameras, and the
        calibrated thresholds (one entry per query model; empty when uncalibrated)."""
        disk = sum(f["bytes"] for f in self.manifest["files"]) + sum(f["bytes"] for f in self.manifest["segment_files"])
        return {
            "path": self.storage.location,
            "generation": self.generation,
            "size": self.store.count(),
            "index": {"kind": self.index.kind, "ntotal": self.index.ntotal, "params": self.index.params.to_dict()},
            "model": self.fingerprint,
            "model_digest": model_digest(self.fingerprint),
            "accepts_merged_queries": accepts_merged_queries(self.fingerprint),
            "calibration": self.calibrations(),
            "cameras": {str(k): v for k, v in self.store.cameras().items()},
            "bytes": disk,
            "bytes_per_crop": disk / max(1, self.store.count()),
            "manifest": self.storage.manifest_location(self.generation),
            "created": self.store.get_meta("created"),
        }
