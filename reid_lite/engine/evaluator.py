"""Query/gallery evaluation of a model, and the side-by-side comparison of merging methods (Table 1).

    results = evaluate(cfg, model, dataset)                                   # the model as configured
    results = evaluate(cfg, model, dataset, methods=["none", "tome", "stm"])  # same weights, per method
    print(format_table(results))

Each method re-attaches its reducers to the same model (`apply_merging`) and extracts the same
loader's images itself (merging changes the features); the query/gallery split comes from
`Batch.indices < num_query`, so unreadable images never shift it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import build_test_loader
from ..data.datasets import ReIDDataset
from ..metrics.rank import evaluate_rank
from ..metrics.rerank import re_ranking
from ..metrics.retrieval import evaluate_retrieval
from ..models import check_input_size
from ..utils.device import autocast, resolve_device
from .extractor import Features, _prepare_model, extract_features

logger = logging.getLogger(__name__)

__all__ = ["check_methods", "evaluate", "evaluate_features", "format_table", "model_gflops", "model_schedule",
           "split_query_gallery"]

#: Rows of `format_table`: (header, row key, format); percentages are printed x100 as in the paper.
_COLUMNS = (
    ("method", "method", "{}"),
    ("GFLOPs", "gflops", "gflops"),
    ("img/s", "images_per_second", "{:.1f}"),
    ("model img/s", "model_images_per_second", "{:.1f}"),
    ("Rank-1", "rank1", "{:.1%}"),
    ("Rank-5", "rank5", "{:.1%}"),
    ("Rank-10", "rank10", "{:.1%}"),
    ("mAP", "mAP", "{:.1%}"),
    ("mINP", "mINP", "{:.1%}"),
)


def model_gflops(model: nn.Module) -> float | None:
    """Analytic GFLOPs per image of a TransReID with its current reducers (None for other models)."""
    if not hasattr(model, "reducible_blocks"):
        return getattr(model, "gflops", None)  # a deployed model records its own
    from ..utils.flops import transreid_gflops

    return float(transreid_gflops(model))


def model_schedule(model: nn.Module) -> list[dict[str, int]] | None:
    """The token-reduction schedule a TransReID runs with its current reducers (None for other models):
    what results record, so a record never shows a schedule other than the one evaluated."""
    if not hasattr(model, "reducible_blocks"):
        return None
    from ..merging import input_tokens, reduction_schedule

    return reduction_schedule(model.reducers, input_tokens(model), len(model.reducible_blocks))


def split_query_gallery(features: Features, num_query: int) -> tuple[Features, Features]:
    """Split a test loader's features into (query, gallery) by record position (`indices < num_query`)."""
    is_query = features.indices < num_query
    return features.select(is_query), features.select(~is_query)


def evaluate_features(query: Features, gallery: Features, re_rank: bool = False, query_chunk: int = 1024,
                      max_rank: int = 50, rerank_params: tuple[int, int, float] = (20, 6, 0.3)) -> dict[str, Any]:
    """Rank-1/5/10, mAP, mINP and the CMC curve (length <= max_rank) of query against gallery features.

    Distances are squared Euclidean on the features as extracted, as TransReID's evaluator computes
    them (so TEST.FEAT_NORM decides whether that is cosine-equivalent). Without re-ranking the queries
    are ranked `query_chunk` at a time, so the Q x G matrix is never formed; with `re_rank` the blocked
    k-reciprocal re-ranking (k1, k2, lambda = `rerank_params`) produces the (Q, G) matrix it needs.
    """
    if len(query) == 0 or len(gallery) == 0:
        raise ValueError(f"nothing to evaluate: {len(query)} readable query and {len(gallery)} gallery images")
    if not re_rank:
        res = evaluate_retrieval(query.feats, gallery.feats, query.pids, gallery.pids, query.camids, gallery.camids,
                                 query_chunk=query_chunk, max_rank=max_rank, metric="euclidean")
        cmc = np.asarray(res["cmc"])
        return {k: float(res[k]) for k in ("rank1", "rank5", "rank10", "mAP", "mINP")} | {"cmc": cmc}
    k1, k2, lam = rerank_params
    distmat = re_ranking(query.feats, gallery.feats, k1=k1, k2=k2, lambda_value=lam)
    cmc, mAP, mINP = evaluate_rank(distmat, query.pids, gallery.pids, query.camids, gallery.camids, max_rank=max_rank)

    def at(r: int) -> float:
        return float(cmc[min(r, len(cmc)) - 1])

    return {"rank1": at(1), "rank5": at(5), "rank10": at(10), "mAP": float(mAP), "mINP": float(mINP), "cmc": cmc}


@torch.inference_mode()
def _warmup(model: nn.Module, cfg: Any, device: torch.device) -> None:
    """One untimed forward at the test size so that the first method's timing excludes one-off costs
    (cuDNN/oneDNN kernel selection, allocator growth); per method because merging changes the shapes."""
    n = int(cfg.TEST.IMS_PER_BATCH) if device.type == "cuda" else 2
    x = torch.zeros(n, 3, *cfg.INPUT.SIZE_TEST, device=device)
    if device.type == "cuda":
        x = x.to(memory_format=torch.channels_last)
    base = getattr(model, "base", model)  # a deployed RuntimeModel carries the SIE counts itself
    kwargs = {}
    if getattr(base, "cam_num", 0):
        kwargs["cam_label"] = torch.zeros(n, dtype=torch.long, device=device)
    if getattr(base, "view_num", 0):
        kwargs["view_label"] = torch.zeros(n, dtype=torch.long, device=device)
    with autocast(device, cfg.TEST.AMP):
        model(x, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _merge_section(cfg: Any, method: str) -> Any:
    from ..merging import get_method

    node = cfg.MERGE.clone()
    node.defrost()
    node.METHOD = method
    if not get_method(method).gflops_knob:
        node.TARGET_GFLOPS = 0.0  # a GFLOPs budget only applies to methods whose schedule can be solved
    node.TRACE_SOURCE = False
    return node


def check_methods(cfg: Any, model: nn.Module, methods: Sequence[str]) -> list[str]:
    """Validate merging methods against cfg.MERGE and the model's depth before any extraction starts
    (a bad MERGE.LAYERS for the third method must not surface after minutes of work); returns the names.

    Each method's reducers are built afresh, so a learned method (DTEM) compared on trained weights
    (TEST.WEIGHT) must name its own weights file (MERGE.DTEM.WEIGHTS): ValueError otherwise.
    """
    from ..merging import build_reducers, check_learned_ready, input_tokens, parse_methods

    names = parse_methods(list(methods))
    depth = len(model.reducible_blocks) if hasattr(model, "reducible_blocks") else len(model.blocks)
    for name in names:
        reducers = build_reducers(_merge_section(cfg, name), depth, num_tokens=input_tokens(model))
        if cfg.TEST.WEIGHT:
            check_learned_ready(reducers)
    return names


def evaluate(cfg: Any, model: nn.Module, dataset: ReIDDataset, device: torch.device | str | None = None,
             methods: Sequence[str] | None = None, progress: bool = True,
             keep_features: bool = False) -> dict[str, Any]:
    """Evaluate `model` on `dataset`'s query/gallery split, once per merging method.

    Args:
        cfg: the full config (TEST.*, INPUT.SIZE_TEST, DATALOADER.*, MERGE.*).
        model: a TransReID (or any model called as `model(x, cam_label=)`); its weights are not changed.
        device: where to run; default MODEL.DEVICE (CUDA falls back to the CPU with a message).
        methods: registered merging methods to compare ('none', 'tome', 'evit', 'stm', a plugin's own),
            each attached in turn with cfg.MERGE's other settings; None evaluates the model with the
            merging it already has. After a comparison the model gets cfg.MERGE's own method back.
        keep_features: also return the query/gallery `Features` of each method (under 'features').

    Returns:
        dict with 'rows' (one dict per method: method, gflops, images_per_second (whole pass),
        model_images_per_second, seconds, model_seconds, rank1, rank5, rank10, mAP, mINP, cmc (list),
        feature_dim, num_query, num_gallery, skipped, re_ranking, merge_r (the r a GFLOPs budget chose),
        schedule: the reducing blocks with their token counts in and out, as run), 'device', 'skipped' (count),
        'skipped_paths', 'num_query', 'num_gallery', and 'features' ({method: (query, gallery)}) on request.
    """
    from ..merging import apply_merging

    check_input_size(cfg, model)
    dev = resolve_device(device if device is not None else cfg.MODEL.DEVICE, cfg.MODEL.DEVICE_ID)
    loader, num_query = build_test_loader(cfg, dataset)
    names: list[str | None] = list(check_methods(cfg, model, methods)) if methods else [None]
    flip = bool(cfg.TEST.FLIP)
    feat_norm = str(cfg.TEST.FEAT_NORM).lower() == "yes"
    rows: list[dict[str, Any]] = []
    kept: dict[str, tuple[Features, Features]] = {}
    skipped_paths: list[str] = []
    _prepare_model(model, dev)  # device, eval mode and channels-last before the warm-up
    try:
        for name in names:
            if name is not None:
                apply_merging(model, _merge_section(cfg, name))
            label = name or str(cfg.MERGE.METHOD).lower()
            _warmup(model, cfg, dev)
            feats = extract_features(model, loader, device=dev, amp=cfg.TEST.AMP, flip=flip, feat_norm=feat_norm,
                                     progress=progress, desc=f"extract [{label}]")
            query, gallery = split_query_gallery(feats, num_query)
            metrics = evaluate_features(query, gallery, re_rank=bool(cfg.TEST.RE_RANKING),
                                        query_chunk=int(cfg.TEST.QUERY_CHUNK))
            skipped_paths = list(feats.failed)  # same loader for every method, so the same files
            rows.append({
                "method": label,
                "gflops": model_gflops(model),
                "images_per_second": feats.images_per_second,
                "model_images_per_second": feats.model_images_per_second,
                "seconds": feats.seconds,
                "model_seconds": feats.model_seconds,
                **{k: metrics[k] for k in ("rank1", "rank5", "rank10", "mAP", "mINP")},
                "cmc": [float(v) for v in metrics["cmc"]],
                "feature_dim": int(feats.feats.shape[1]),
                "num_query": len(query),
                "num_gallery": len(gallery),
                "skipped": len(feats.failed),
                "re_ranking": bool(cfg.TEST.RE_RANKING),
                "merge_r": getattr(model, "merge_r", None),
                "schedule": model_schedule(model),
            })
            logger.info("%s: rank1 %.4f mAP %.4f (%.1f img/s)", label, metrics["rank1"], metrics["mAP"],
                        feats.images_per_second)
            if keep_features:
                kept[label] = (query, gallery)
    finally:
        if methods:
            apply_merging(model, _merge_section(cfg, str(cfg.MERGE.METHOD).lower()))
    out: dict[str, Any] = {
        "rows": rows,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "skipped": len(skipped_paths),
        "skipped_paths": skipped_paths,
        "num_query": num_query,
        "num_gallery": len(dataset.gallery),
    }
    if keep_features:
        out["features"] = kept
    return out


def format_table(results: dict[str, Any]) -> str:
    """The result rows as a Markdown table (the paper's Table 1 layout) plus device and skipped images.

    img/s is the whole pass (decoding, transfer, model); model img/s counts forward time only, which
    is what the paper's throughput column measures.
    """
    head = [h for h, _, _ in _COLUMNS]
    body = []
    for row in results["rows"]:
        cells = []
        for _, key, fmt in _COLUMNS:
            value = row.get(key)
            if value is None:
                cells.append("-")
            elif fmt == "gflops":  # the paper's 2 decimals; tiny test models need more to differ
                cells.append(f"{value:.2f}" if value >= 1 else f"{value:.4f}")
            else:
                cells.append(fmt.format(value))
        body.append(cells)
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    rows = results["rows"]
    dims = sorted({r["feature_dim"] for r in rows})
    footer = (f"device: {results['device']} ({results.get('device_name', '')}) | "
              f"query {rows[0]['num_query'] if rows else 0}, gallery {rows[0]['num_gallery'] if rows else 0} | "
              f"skipped images: {results['skipped']} | feature dim {','.join(map(str, dims))} | "
              f"re-ranking: {'on' if rows and rows[0]['re_ranking'] else 'off'}")
    if results["skipped"]:
        footer += "\nskipped (unreadable): " + ", ".join(results["skipped_paths"][:5])
        if results["skipped"] > 5:
            footer += f", ... ({results['skipped'] - 5} more)"
    return "\n".join([line(head), rule, *(line(r) for r in body), footer])
