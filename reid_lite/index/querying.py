"""Searching a gallery: query embedding, exact metadata filters, and why a query got nothing back.

`GallerySearch` is the query half of `reid_lite.index.Gallery` (which mixes it in); it needs the
gallery's store, index, fingerprint and embedding methods.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .crops import cameras_from_names, to_seconds
from .fingerprint import check_query_fingerprint
from .storage import FingerprintMismatch, GalleryError
from .store import CropRecord
from .vector_index import VectorIndexError

if TYPE_CHECKING:
    from .interfaces import CropMetadata
    from .vector_index import VectorIndex

__all__ = ["GallerySearch", "SearchHit", "SearchResults"]


@dataclass
class SearchHit:
    """One ranked gallery crop for one query."""

    rank: int
    id: int
    score: float
    path: str
    camid: int | None
    timestamp: float | None
    timestamp_raw: str | None
    identity: int | None
    track: str | None
    #: score >= the gallery's calibrated threshold for this query model; None when it has none.
    likely: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict."""
        return dict(self.__dict__)


class SearchResults(list):
    """One list of `SearchHit` per query, in query order, plus what went wrong.

    skipped: query position -> why it was skipped (missing or unreadable image; its list is empty).
    notes: why a query's filters left no crop to return (one sentence per distinct reason).
    calibration: the gallery's calibration entry for the query model (its `threshold` decided each
    hit's `likely`), or None: not calibrated for it, and `likely` is None.
    """

    def __init__(self, hits: Sequence[list[SearchHit]] = (), skipped: dict[int, str] | None = None,
                 notes: list[str] | None = None, calibration: dict[str, Any] | None = None) -> None:
        super().__init__(hits)
        self.skipped: dict[int, str] = dict(skipped or {})
        self.notes: list[str] = list(notes or [])
        self.calibration = calibration

    @property
    def threshold(self) -> float | None:
        """The calibrated score threshold the hits were flagged with, or None."""
        return None if self.calibration is None else float(self.calibration["threshold"])

    def no_likely_match(self, query: int = 0) -> bool | None:
        """True when the gallery is calibrated for the query model and no hit of query `query` is likely
        (a "no match" answer); None when uncalibrated."""
        if self.calibration is None:
            return None
        return not any(h.likely for h in self[query])


def _fmt_time(t: float) -> str:
    return f"{t:g}"


class GallerySearch:
    """Query methods of a gallery (mixed into `reid_lite.index.Gallery`)."""

    store: CropMetadata
    index: VectorIndex
    fingerprint: dict[str, Any]
    query_model: Any
    calibration_for: Any

    def search(self, queries: Any, k: int = 10, *, camids: Sequence[int | None] | int | None = None,
               exclude_same_camera: bool = False, cameras: Sequence[int] | None = None,
               time_window: tuple[Any, Any] | None = None, fingerprint: dict[str, Any] | None = None,
               cfg: Any | None = None, nprobe: int | None = None, pattern: str | None = None,
               query_model: tuple[Any, dict[str, Any]] | None = None) -> SearchResults:
        """Top-`k` crops for each query, as a `SearchResults` (a list of hit lists).

        queries: image paths / PIL images / HWC uint8 arrays (embedded with the gallery's model, or the
        model of `cfg` after a fingerprint check), or a float (Q, D) array/tensor of features already in
        the gallery's space (pass their `fingerprint` to have it checked). The query model may differ from
        the gallery's in token merging only when the gallery accepts merged queries. `query_model`: an
        (extractor, fingerprint) pair from `query_model`, built once by a caller that searches many
        times (the server), used instead of `cfg`. A missing or unreadable query
        image is skipped with a warning (`SearchResults.skipped`); the others are still answered, and
        only when none can be read is it an error.
        camids: each query's 0-based camera (needed for a camera-SIE model and for
        `exclude_same_camera`); for paths it is parsed from the file name when not given.
        cameras: keep only these cameras. time_window: (from, to), inclusive, numbers or ISO 8601
        (either may be None). Filters are exact for every index type (see `VectorIndex.search`); a
        filter that can never match (a camera the gallery lacks, a time window on a gallery without
        timestamps) raises ValueError, one that leaves a query nothing says why in `notes`.
        Each hit's `likely` is score >= the gallery's calibrated threshold for the query model (None when
        the gallery has none for it; `SearchResults.calibration`).
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        k = int(k)
        query_fp = fingerprint  # None: the gallery's own model
        if fingerprint is not None:
            check_query_fingerprint(self.fingerprint, fingerprint)
        ext = None
        if not _is_features(queries):
            if query_model is not None:
                ext, query_fp = query_model
                check_query_fingerprint(self.fingerprint, query_fp)
            elif cfg is not None:
                ext, query_fp = self.query_model(cfg)
        calibration = self.calibration_for(query_fp)
        threshold = None if calibration is None else float(calibration["threshold"])
        t_from, t_to = (time_window or (None, None))
        t_from, t_to = to_seconds(t_from), to_seconds(t_to)
        if cameras is not None or t_from is not None or t_to is not None:  # unfiltered: no column read
            self._check_filters(cameras, t_from, t_to)
        q, qcams, rows, skipped = self._query_features(queries, camids, ext, pattern or self.pattern)
        if exclude_same_camera and any(qcams[r] is None for r in rows):
            raise ValueError("exclude_same_camera needs every query's camera (camids=, or parsable file names)")
        filtered = exclude_same_camera or cameras is not None or t_from is not None or t_to is not None
        groups: dict[Any, list[int]] = {}
        for j, r in enumerate(rows):
            groups.setdefault(qcams[r] if exclude_same_camera else None, []).append(j)
        scores = np.full((len(q), k), -np.inf, np.float32)
        ids = np.full((len(q), k), -1, np.int64)
        notes: list[str] = []
        for cam, members in groups.items():
            allowed = self.store.matching(cameras, cam, t_from, t_to) if filtered else None
            if (self.index.ntotal if allowed is None else len(allowed)) == 0:
                note = self._why_empty(cameras, cam, t_from, t_to)
                if note not in notes:
                    notes.append(note)
                continue
            s, i = self.index.search(q[members], k, allowed, nprobe=nprobe)
            scores[members], ids[members] = s, i
        meta = self.store.get(np.unique(ids[ids >= 0]).tolist())
        out: list[list[SearchHit]] = [[] for _ in range(len(qcams))]
        for j, r in enumerate(rows):
            for rank, (s, i) in enumerate(zip(scores[j], ids[j])):
                if i >= 0:
                    m = meta[int(i)]
                    out[r].append(SearchHit(rank + 1, int(i), float(s), m.path, m.camid, m.timestamp,
                                            m.timestamp_raw, m.identity, m.track,
                                            None if threshold is None else bool(s >= threshold)))
        return SearchResults(out, skipped, notes, calibration)

    def crop_features(self, ids: Sequence[int]) -> np.ndarray:
        """Stored (len(ids), D) features of gallery crops, e.g. to search from a crop already in the
        gallery without embedding it again. Unknown ids raise KeyError naming them."""
        ids = [int(i) for i in ids]
        missing = sorted(set(ids) - set(self.store.get(ids)))
        if missing:
            raise KeyError(f"no crop with id {', '.join(map(str, missing[:5]))} in this gallery")
        try:
            return self.index.stored_vectors(np.asarray(ids, np.int64))
        except VectorIndexError:
            raise GalleryError("this IVF-PQ gallery keeps no float16 copies of its vectors to search from") from None

    # ------------------------------------------------------------------ filters
    def _check_filters(self, cameras: Sequence[int] | None, t_from: float | None, t_to: float | None) -> None:
        """Refuse filters that can match no crop of this gallery whatever the query."""
        if not self.store.count():
            return
        if (t_from is not None or t_to is not None) and self.store.time_span() is None:
            raise ValueError("a time window was given, but no crop in this gallery has a timestamp, so nothing "
                             "can match; timestamps come from a (?P<timestamp>...) group of --pattern or a "
                             "'timestamp' column of --sidecar when crops are added")
        if cameras is not None and not self.store.has_cameras(cameras):
            present = sorted(int(c) for c in self.store.cameras() if c is not None and c >= 0)
            raise ValueError(f"no crop in this gallery is from camera(s) {', '.join(map(str, cameras)) or '(none)'}; "
                             f"it holds cameras {', '.join(map(str, present)) or '(none known)'} (0-based ids)")

    def _why_empty(self, cameras: Sequence[int] | None, exclude: int | None, t_from: float | None,
                   t_to: float | None) -> str:
        """One sentence on why no crop passes these filters."""
        if not self.store.count():
            return "the gallery is empty"
        parts = []
        if cameras is not None:
            parts.append(f"camera(s) {', '.join(map(str, cameras))}")
        if exclude is not None:
            parts.append(f"not camera {exclude} (the query's own, --exclude-same-camera)")
        if t_from is not None or t_to is not None:
            span = self.store.time_span()
            lo = "-inf" if t_from is None else _fmt_time(t_from)
            hi = "+inf" if t_to is None else _fmt_time(t_to)
            parts.append(f"timestamps in [{lo}, {hi}] (the crops span {_fmt_time(span[0])} .. "
                         f"{_fmt_time(span[1])})" if span else f"timestamps in [{lo}, {hi}]")
        return "no crop matches " + " and ".join(parts)

    # ------------------------------------------------------------------ query embedding
    def _query_features(self, queries: Any, camids: Any, ext: Any, pattern: str
                        ) -> tuple[np.ndarray, list[int | None], list[int], dict[int, str]]:
        """(features (n, D) of the usable queries, every query's camera, the query positions of the n
        rows, skipped query positions with the reason). `ext`: the query model's extractor (None: the
        gallery's own)."""
        is_feat = _is_features(queries)
        if is_feat:
            x = queries.detach().cpu().numpy() if isinstance(queries, torch.Tensor) else queries
            x = np.asarray(x, np.float32)
            if x.ndim != 2 or x.shape[1] != self.dim:
                raise FingerprintMismatch(f"query features have shape {x.shape}; this gallery stores "
                                          f"{self.dim}-d features of its model ({self.fingerprint['weights']})")
            n = len(x)
        else:
            if isinstance(queries, (str, os.PathLike)) or not isinstance(queries, Sequence):
                queries = [queries]
            n = len(queries)
        if camids is None or isinstance(camids, int):
            cams: list[int | None] = [camids] * n
        else:
            cams = [None if c is None else int(c) for c in camids]
        if len(cams) != n:
            raise ValueError(f"got {len(cams)} camera ids for {n} queries")
        if is_feat:
            return self.normalize_features(x), cams, list(range(n)), {}
        items = [str(x) if isinstance(x, os.PathLike) else x for x in queries]
        skipped = {i: "image not found" for i, x in enumerate(items) if isinstance(x, str) and not os.path.isfile(x)}
        paths = [x for x in items if isinstance(x, str)]
        if len(paths) == n and any(c is None for c in cams):
            parsed = cameras_from_names(paths, pattern)
            cams = [c if c is not None else p for c, p in zip(cams, parsed)]
        ext = ext or self.extractor()
        sie = bool(self.fingerprint["architecture"]["sie_camera"])
        if sie and any(cams[i] is None for i in range(n) if i not in skipped):
            raise ValueError("this gallery's model has a camera SIE: give each query's camera (camids= / "
                             "--query-camera) or use file names the folder pattern parses")
        keep = [i for i in range(n) if i not in skipped]
        if not keep:
            raise GalleryError(f"none of the {n} query image(s) could be read: " + _skip_summary(items, skipped))
        if len(paths) < n:  # in-memory images: nothing to fail reading, one call keeps their order
            feats = ext([items[i] for i in keep], camids=[cams[i] or 0 for i in keep] if sie else None)
            return self.normalize_features(feats), cams, keep, skipped
        # Paths go through the gallery's loader, which skips (and reports) an unreadable image
        # instead of failing the whole batch, so the other queries are still answered.
        records = [CropRecord(path=items[i], sha256="", camid=cams[i]) for i in keep]
        # The loader's per-image warnings are collected here and become `skipped` reasons (reported
        # once per query by the caller), so the extractor's summary line would only repeat them.
        quiet = logging.getLogger("reid_lite.engine.extractor")
        only_errors = _DropUnreadableSummary()
        quiet.addFilter(only_errors)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                feats, pos, failed, _ = self.embed_records(records, extractor=ext, what="query")
        finally:
            quiet.removeFilter(only_errors)
        messages = []
        for w in caught:  # the loader's ImageReadWarning carries the reason; other warnings pass through
            if str(w.message).startswith("cannot read image "):
                messages.append(str(w.message))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        rows = [keep[p] for p in pos]
        bad = set(failed)
        for i in keep:
            if items[i] in bad:
                prefix = f"cannot read image {items[i]} ("
                why = next((m[len(prefix):].removesuffix("); skipped") for m in messages if m.startswith(prefix)),
                           "cannot be decoded")
                skipped[i] = f"unreadable image ({why})"
        if not rows:
            raise GalleryError(f"none of the {n} query image(s) could be read: " + _skip_summary(items, skipped))
        return feats, cams, rows, skipped


def _is_features(queries: Any) -> bool:
    """Whether `queries` are features (a tensor, or a float 2-d array) rather than images."""
    return isinstance(queries, torch.Tensor) or (
        isinstance(queries, np.ndarray) and queries.dtype.kind == "f" and queries.ndim == 2)


class _DropUnreadableSummary(logging.Filter):
    """Drops the extractor's "N unreadable image(s) skipped" line, keeps everything else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "unreadable image(s) skipped" not in str(record.msg)


def _skip_summary(items: Sequence[Any], skipped: dict[int, str]) -> str:
    shown = [f"{items[i]} ({why})" for i, why in sorted(skipped.items())[:3]]
    return "; ".join(shown) + (f"; and {len(skipped) - 3} more" if len(skipped) > 3 else "")
