"""A gallery's "no match" threshold: calibrated on a labelled split, stored in the gallery, bound to models.

The threshold rule is reid_lite.metrics.calibration's. A gallery keeps one calibration per query model
in its metadata (key `calibration`, written as a new generation like any write), each recorded with the
digests of the gallery's model and of the query model it was calibrated for (`model_digest`): a search
flags its hits `likely` (score >= threshold) only with the entry of its own query model; a threshold
calibrated for another model or merging is ignored with a warning, and a search without one leaves
`likely` None. A record that does not validate when read is ignored with a warning too (never used).

    g = Gallery.open("/data/gal")
    entry = calibrate_gallery(g, q_feats, q_pids, q_cams, g_feats, g_pids, g_cams, query_fingerprint=fp)
    g.calibration_for(None)   # the entry for queries of the gallery's own model, or None
"""

from __future__ import annotations

import math
import re
import time
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from ..metrics.calibration import ThresholdChoice, choose_threshold, held_out, top1_scores
from ..utils.text import count
from .fingerprint import check_query_fingerprint, gallery_space, model_digest, model_fingerprint

if TYPE_CHECKING:
    from .interfaces import CropMetadata

__all__ = ["CALIBRATION_FORMAT", "MIN_CALIBRATION_IDENTITIES", "GalleryCalibration", "calibrate_gallery",
           "calibration_entry",
           "query_fingerprint", "validate_calibration"]

CALIBRATION_FORMAT = "reid-calibration/1"
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_UNIT_FIELDS = ("precision", "recall", "f1")
_COUNT_FIELDS = ("num_queries", "num_true_top1", "num_flagged")


def calibration_entry(choice: ThresholdChoice, gallery_fp: dict[str, Any], query_fp: dict[str, Any] | None = None,
                      source: str = "", held_out: dict[str, Any] | None = None) -> dict[str, Any]:
    """The stored form of a threshold: the choice, the two model digests, the query model's merging,
    where the labelled split came from (`source`), the held-out estimate (`reid_lite.metrics.calibration
    .held_out`) and when. `query_fp` None: the gallery's own model."""
    query_fp = gallery_fp if query_fp is None else query_fp
    return {**choice.to_dict(), "gallery_model": model_digest(gallery_fp), "query_model": model_digest(query_fp),
            "query_merging": query_fp.get("merging"), "source": source, "held_out": held_out,
            "created": time.time()}


def validate_calibration(record: Any) -> list[dict[str, Any]]:
    """The entries of a stored calibration record; ValueError naming the first thing that is wrong."""
    if not isinstance(record, dict) or record.get("format") != CALIBRATION_FORMAT:
        raise ValueError(f"not a {CALIBRATION_FORMAT} record")
    entries = record.get("entries")
    if not isinstance(entries, list):
        raise ValueError("its entries are not a list")
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise ValueError(f"entry {i} is not an object")
        t = e.get("threshold")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not -1.0 <= t <= 1.0:
            raise ValueError(f"entry {i}: threshold {t!r} is not a cosine score in [-1, 1]")
        for key in ("gallery_model", "query_model"):
            if not isinstance(e.get(key), str) or not _DIGEST.match(e[key]):
                raise ValueError(f"entry {i}: {key} is not a sha256 digest")
        for key in _UNIT_FIELDS:
            if not _unit_or_none(e.get(key), allow_none=False):
                raise ValueError(f"entry {i}: {key} {e.get(key)!r} is not in [0, 1]")
        for key in _COUNT_FIELDS:
            if isinstance(e.get(key), bool) or not isinstance(e.get(key), int) or e[key] < 0:
                raise ValueError(f"entry {i}: {key} is not a count")
        if e.get("rule") not in ("f1", "precision"):
            raise ValueError(f"entry {i}: unknown rule {e.get('rule')!r}")
        held = e.get("held_out")
        if held is not None and not (isinstance(held, dict) and _unit_or_none(held.get("precision"))
                                     and _unit_or_none(held.get("recall"), allow_none=False)):
            raise ValueError(f"entry {i}: held_out is not a precision/recall estimate")
    return entries


def _unit_or_none(v: Any, allow_none: bool = True) -> bool:
    """Whether `v` is a number in [0, 1] (or None, when `allow_none`)."""
    if v is None:
        return allow_none
    return not isinstance(v, bool) and isinstance(v, (int, float)) and 0.0 <= v <= 1.0


class GalleryCalibration:
    """Calibration methods of a gallery (mixed into `reid_lite.index.Gallery`)."""

    store: CropMetadata
    fingerprint: dict[str, Any]

    def calibrations(self) -> list[dict[str, Any]]:
        """The valid stored entries for this gallery's model (empty when uncalibrated). A malformed
        record, or an entry for another gallery model, is ignored with a warning."""
        record = self.store.get_meta("calibration")
        if record is None:
            return []
        try:
            entries = validate_calibration(record)
        except ValueError as exc:
            warnings.warn(f"this gallery's calibration record is ignored ({exc}); run tools/test.py --calibrate "
                          "again", stacklevel=2)
            return []
        own = model_digest(self.fingerprint)
        foreign = [e for e in entries if e["gallery_model"] != own]
        if foreign:
            warnings.warn(f"{len(foreign)} calibration(s) of this gallery were made for another gallery model "
                          f"({foreign[0]['gallery_model'][:12]}, not {own[:12]}) and are ignored", stacklevel=2)
        return [e for e in entries if e["gallery_model"] == own]

    def calibration_for(self, query_fp: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The calibration entry for queries of the model `query_fp` (None: the gallery's own model), or
        None. When the gallery holds thresholds only for other query models it warns that they are not used."""
        entries = self.calibrations()
        want = model_digest(self.fingerprint if query_fp is None else query_fp)
        entry = next((e for e in entries if e["query_model"] == want), None)
        if entry is None and entries:
            others = ", ".join(sorted({str((e.get("query_merging") or {}).get("method", "?")) for e in entries}))
            warnings.warn(f"this gallery's threshold was calibrated for another query model (merging {others}), "
                          "not this one, so it is not used and hits are not flagged; run tools/test.py --calibrate "
                          "with this query model", stacklevel=2)
        return entry

    def set_calibration(self, entry: dict[str, Any], lock_timeout: float | None = None) -> int:
        """Store `entry` (from `calibration_entry`), replacing the entry of the same query model, as a
        new generation; returns the generation published."""
        if entry.get("gallery_model") != model_digest(self.fingerprint):
            raise ValueError("this calibration was made for another gallery model; calibrate this gallery")
        with self.writing(lock_timeout):  # type: ignore[attr-defined]
            kept = [e for e in self.calibrations() if e["query_model"] != entry["query_model"]]
            record = {"format": CALIBRATION_FORMAT, "entries": [*kept, entry]}
            validate_calibration(record)

            def mutate(store: CropMetadata, idx: Any, gen: int) -> tuple[list[str], list[dict]]:
                store.set_meta("calibration", record)
                return [], []

            return self.write_generation(mutate)  # type: ignore[attr-defined]


#: Fewest distinct query identities `calibrate_gallery` accepts.
MIN_CALIBRATION_IDENTITIES = 2


def calibrate_gallery(gallery: Any, query_feats: np.ndarray, query_pids: np.ndarray, query_camids: np.ndarray,
                      gallery_feats: np.ndarray, gallery_pids: np.ndarray, gallery_camids: np.ndarray, *,
                      query_fingerprint: dict[str, Any] | None = None, target_precision: float | None = None,
                      source: str = "", lock_timeout: float | None = None) -> dict[str, Any]:
    """Calibrate `gallery`'s threshold on a labelled split and store it; returns the stored entry (with the
    in-sample precision and recall, and a 2-fold held-out estimate by identity under `held_out`).

    query_feats: the split's query features from the query model (`query_fingerprint`; None: the
    gallery's own model); gallery_feats: its gallery features from the gallery's model. Both as
    extracted (any normalisation, the full eval feature or its global part): they are brought into the
    gallery's space (`gallery_space`) here. A query model the gallery does not accept raises
    FingerprintMismatch before anything is computed. `target_precision`: the precision rule, else F1.
    """
    qfp = gallery.fingerprint if query_fingerprint is None else query_fingerprint
    check_query_fingerprint(gallery.fingerprint, qfp)
    identities = len(np.unique(np.asarray(query_pids)))
    if identities < MIN_CALIBRATION_IDENTITIES:
        # With one identity every right top hit is the same person: nothing tells a true match from a
        # look-alike of someone else, and the held-out estimate (folds by identity) cannot be made.
        queries = count(len(query_pids), "labelled query", "labelled queries")
        raise ValueError(f"too few identities to calibrate on: {queries} of "
                         f"{count(identities, 'identity', 'identities')}; at least {MIN_CALIBRATION_IDENTITIES} "
                         "query identities are needed (more for a useful threshold)")
    scores, correct, kept = top1_scores(gallery_space(query_feats, gallery.fingerprint),
                                        gallery_space(gallery_feats, gallery.fingerprint), np.asarray(query_pids),
                                        np.asarray(gallery_pids), np.asarray(query_camids),
                                        np.asarray(gallery_camids))
    choice = choose_threshold(scores, correct, target_precision)
    estimate = held_out(scores, correct, np.asarray(query_pids)[kept], target_precision)
    entry = calibration_entry(choice, gallery.fingerprint, qfp, source, estimate)
    gallery.set_calibration(entry, lock_timeout=lock_timeout)
    return entry


def query_fingerprint(gallery: Any, cfg: Any, model: Any) -> tuple[dict[str, Any], bool]:
    """(fingerprint of `model` built from `cfg` as a query model of `gallery`, whether it is an accepted
    asymmetric one: same model, other merging). Raises FingerprintMismatch when the gallery refuses it,
    so that a calibration fails before any feature is extracted."""
    camera_num = int(getattr(getattr(model, "base", model), "cam_num", 0) or 0)
    fp = model_fingerprint(cfg, model, gallery.fingerprint["feature"]["kind"], camera_num)
    return fp, check_query_fingerprint(gallery.fingerprint, fp)
