"""A score threshold for "no match": when is a gallery's top hit likely to be the query's person?

A gallery search always returns k crops, even when none of them is the person. Calibration turns the
cosine score into a yes/no: on a labelled query/gallery split, every query's top hit (under the
Market-1501 protocol: gallery images of the same identity from the query's own camera are left out) is
either a true match or not, and the threshold is chosen on those top-1 scores:

* rule "f1" (default): the threshold that maximises F1 of "the top hit is a true match" among the
  queries whose top score reaches it (precision: of the flagged queries, how many top hits are right;
  recall: of the right top hits, how many are flagged);
* rule "precision": the lowest threshold whose precision reaches a target (the most recall at that
  precision).

The threshold lies halfway between the lowest top-1 score kept and the highest one left out, so that a
score equal to a calibration score is classified as it was during calibration. When flagging every
query is best, the threshold is -1 (the lowest cosine: every hit is likely). Precision and recall are
those of the calibration split itself (in-sample); `held_out` estimates them on queries the threshold
was not chosen on (folds by identity). Everything is vectorised over queries (chunks of `query_chunk`
rows, so the Q x G score matrix is never formed whole).

    scores, correct, kept = top1_scores(q, g, q_pids, g_pids, q_cams, g_cams)   # L2-normalised features
    choice = choose_threshold(scores, correct)                                    # or target_precision=0.95
    choice.threshold, choice.precision, choice.recall
    held_out(scores, correct, q_pids[kept])                                       # {'precision', 'recall', ...}
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["ThresholdChoice", "choose_threshold", "held_out", "top1_scores"]


@dataclass(frozen=True)
class ThresholdChoice:
    """A calibrated threshold and what it gives on the split it was calibrated on.

    threshold: a hit is likely when its score >= threshold. rule: 'f1' or 'precision'.
    target_precision: the target of the 'precision' rule (None for 'f1'). precision/recall/f1: of
    "the top hit is a true match" among queries whose top score >= threshold. num_queries: queries
    scored; num_true_top1: those whose top hit is a true match; num_flagged: those at or above the
    threshold.
    """

    threshold: float
    rule: str
    target_precision: float | None
    precision: float
    recall: float
    f1: float
    num_queries: int
    num_true_top1: int
    num_flagged: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict."""
        return asdict(self)


def top1_scores(query: np.ndarray, gallery: np.ndarray, query_pids: np.ndarray, gallery_pids: np.ndarray,
                query_camids: np.ndarray, gallery_camids: np.ndarray, query_chunk: int = 1024
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top-1 score, whether that hit has the query's identity, kept) by inner product.

    Features are expected L2-normalised (the score is then the cosine a gallery search reports). As in
    the evaluation protocol, gallery images of the query's identity from the query's camera are not
    candidates. Queries left without any candidate are dropped: the first two arrays hold the queries
    where the boolean mask `kept` (one entry per query) is true.
    """
    q = np.ascontiguousarray(query, dtype=np.float32)
    g = np.ascontiguousarray(gallery, dtype=np.float32)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"query features {q.shape} and gallery features {g.shape} must be (N, D) of one D")
    if len(g) == 0 or len(q) == 0:
        raise ValueError(f"nothing to calibrate on: {len(q)} query and {len(g)} gallery features")
    qp, gp = np.asarray(query_pids), np.asarray(gallery_pids)
    qc, gc = np.asarray(query_camids), np.asarray(gallery_camids)
    if not len(qp) == len(qc) == len(q) or not len(gp) == len(gc) == len(g):
        raise ValueError("identity and camera labels must have one entry per feature")
    scores = np.empty(len(q), np.float32)
    correct = np.empty(len(q), bool)
    for s in range(0, len(q), query_chunk):
        sim = q[s:s + query_chunk] @ g.T
        junk = (qp[s:s + query_chunk, None] == gp[None]) & (qc[s:s + query_chunk, None] == gc[None])
        sim[junk] = -np.inf
        best = sim.argmax(axis=1)
        scores[s:s + query_chunk] = sim[np.arange(len(sim)), best]
        correct[s:s + query_chunk] = gp[best] == qp[s:s + query_chunk]
    keep = np.isfinite(scores)
    return scores[keep], correct[keep], keep


def choose_threshold(scores: np.ndarray, correct: np.ndarray, target_precision: float | None = None
                     ) -> ThresholdChoice:
    """The threshold of the module docstring's rule over top-1 `scores` and whether each is `correct`.

    target_precision None: the F1 rule; a number in (0, 1]: the lowest threshold whose precision
    reaches it. Raises ValueError when no query's top hit is right (nothing to calibrate for) or when
    no threshold reaches the target (naming the best precision there is).
    """
    s = np.asarray(scores, np.float64)
    c = np.asarray(correct, bool)
    if s.ndim != 1 or s.shape != c.shape or not len(s):
        raise ValueError(f"scores and correct must be two equal, non-empty 1-d arrays, got {s.shape} and {c.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    if target_precision is not None and not 0.0 < float(target_precision) <= 1.0:
        raise ValueError(f"the target precision must lie in (0, 1], got {target_precision}")
    positives = int(c.sum())
    if positives == 0:
        raise ValueError(f"no query's top hit is a true match ({len(s)} queries), so no threshold can tell "
                         "matches apart; calibrate a trained model on a split where it finds some")
    order = np.argsort(-s, kind="stable")
    s, c = s[order], c[order]
    flagged = np.arange(1, len(s) + 1)
    tp = np.cumsum(c)
    precision = tp / flagged
    recall = tp / positives
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(tp > 0, 2 * precision * recall / (precision + recall), 0.0)
    # A threshold can only cut between two different scores (or below the lowest): the last of a tie group.
    cut = np.append(s[1:] < s[:-1], True)
    if target_precision is None:
        candidates = np.flatnonzero(cut)
        best = int(candidates[np.argmax(f1[candidates])])  # the first maximum: the highest such threshold
        rule = "f1"
    else:
        ok = np.flatnonzero(cut & (precision >= float(target_precision) - 1e-12))
        if not len(ok):
            raise ValueError(f"no threshold reaches precision {target_precision:g}: the best is "
                             f"{precision[cut].max():.3f}; lower --target-precision or use the F1 rule")
        best = int(ok[-1])  # the lowest threshold: the most recall at the target precision
        rule = "precision"
    threshold = -1.0 if best == len(s) - 1 else float((s[best] + s[best + 1]) / 2)
    return ThresholdChoice(
        threshold=threshold, rule=rule, target_precision=None if target_precision is None else float(target_precision),
        precision=float(precision[best]), recall=float(recall[best]),
        f1=float(f1[best]) if math.isfinite(f1[best]) else 0.0, num_queries=len(s), num_true_top1=positives,
        num_flagged=int(flagged[best]))


def held_out(scores: np.ndarray, correct: np.ndarray, groups: np.ndarray, target_precision: float | None = None,
             folds: int = 2) -> dict[str, Any] | None:
    """Precision and recall of the rule on queries its threshold was not chosen on.

    The queries are split into `folds` by `groups` (their identities, so that one person's queries never
    sit on both sides); each fold is flagged with the threshold `choose_threshold` picks on the
    others, and the counts are pooled. Returns {'precision' (None when nothing was flagged), 'recall',
    'folds'}, or None when a fold's complement cannot be calibrated (no right top hit, target not reached)
    or there are fewer identities than folds.
    """
    s, c, g = np.asarray(scores, np.float64), np.asarray(correct, bool), np.asarray(groups)
    if s.shape != c.shape or s.shape != g.shape:
        raise ValueError("scores, correct and groups must have one entry per query")
    ids = np.unique(g)
    if len(ids) < folds or folds < 2:
        return None
    fold = np.searchsorted(ids, g) % folds  # identities dealt round-robin in sorted order: deterministic
    tp = fp = fn = 0
    for f in range(folds):
        test = fold == f
        try:
            t = choose_threshold(s[~test], c[~test], target_precision).threshold
        except ValueError:
            return None
        flagged = s[test] >= t
        tp += int((flagged & c[test]).sum())
        fp += int((flagged & ~c[test]).sum())
        fn += int((~flagged & c[test]).sum())
    return {"precision": tp / (tp + fp) if tp + fp else None, "recall": tp / (tp + fn) if tp + fn else 0.0,
            "folds": folds}
