"""Asymmetric retrieval: a gallery embedded once without merging, queried by the same weights with merging.

    methods = asymmetric_methods(cfg, ["tome", "stm"])               # ['none', 'tome', 'stm']
    results = evaluate(cfg, model, dataset, methods=methods, keep_features=True)
    rows = evaluate_pairings(results["features"])
    print(format_pairings(rows))

Each pairing ranks one method's query features against another's gallery features of the same split
(the features as evaluated: TEST.NECK_FEAT, TEST.FEAT_NORM, the full JPM concatenation, as in the main
table): none/none, then for each merging method none/method (the asymmetric gallery) and method/method.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..utils.table import markdown_table
from .evaluator import evaluate_features
from .extractor import Features

__all__ = ["asymmetric_methods", "evaluate_pairings", "format_pairings"]

_METRICS = ("rank1", "rank5", "rank10", "mAP", "mINP")


def asymmetric_methods(cfg: Any, methods: Sequence[str] | None = None) -> list[str]:
    """'none' followed by the merging methods to pair with it: `methods` (--compare) or MERGE.METHOD.
    Raises ValueError when there is no merging method to pair."""
    chosen = [str(m).lower() for m in (methods or [str(cfg.MERGE.METHOD)])]
    merged = [m for m in dict.fromkeys(chosen) if m != "none"]
    if not merged:
        raise ValueError("--asymmetric pairs an unmerged gallery with merged queries: name merging methods "
                         "(--compare none,tome,stm) or set MERGE.METHOD to one")
    return ["none", *merged]


def evaluate_pairings(features: dict[str, tuple[Features, Features]], re_rank: bool = False,
                      query_chunk: int = 1024) -> list[dict[str, Any]]:
    """Rank-1/5/10, mAP and mINP of every gallery/query pairing: none/none, then none/m and m/m for
    each other method m of `features` ({method: (query, gallery)}, as `evaluate(keep_features=True)`
    returns them). Each row: gallery, query, the metrics, num_query, num_gallery."""
    if "none" not in features:
        raise ValueError("asymmetric pairings need the unmerged model's features (method 'none')")
    pairs = [("none", "none")]
    for m in features:
        if m != "none":
            pairs += [("none", m), (m, m)]
    rows = []
    for gal, qry in pairs:
        query, gallery = features[qry][0], features[gal][1]
        res = evaluate_features(query, gallery, re_rank=re_rank, query_chunk=query_chunk)
        rows.append({"gallery": gal, "query": qry, **{k: float(res[k]) for k in _METRICS},
                     "num_query": len(query), "num_gallery": len(gallery)})
    return rows


def format_pairings(rows: Sequence[dict[str, Any]]) -> str:
    """The pairings as a Markdown table (percentages), with each row's Rank-1/mAP change from none/none."""
    base = next((r for r in rows if r["gallery"] == r["query"] == "none"), None)
    head = ["gallery", "query", "Rank-1", "Rank-5", "mAP", "mINP", "dRank-1", "dmAP"]
    body = []
    for r in rows:
        d1 = "-" if base is None or r is base else f"{(r['rank1'] - base['rank1']) * 100:+.1f}"
        dm = "-" if base is None or r is base else f"{(r['mAP'] - base['mAP']) * 100:+.1f}"
        body.append([r["gallery"], r["query"], *(f"{r[k]:.1%}" for k in ("rank1", "rank5", "mAP", "mINP")), d1, dm])
    return markdown_table(head, body, left=(0, 1))
