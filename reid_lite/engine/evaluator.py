"""Query/gallery evaluation of a model, and the side-by-side comparison of merging methods (Table 1).

    results = evaluate(cfg, model, dataset)                                   # the model as configured
    results = evaluate(cfg, model, dataset, methods=["none", "tome", "stm"])  # same weights, per method
    print(format_table(results))

Each method runs on its own copy of the model, with its reducers attached (`merge_with_budget`): the
caller's model is never changed. Each extracts the same loader's images itself (merging changes the
features); the query/gallery split comes from `Batch.indices < num_query`, so unreadable images never
shift it.

With MERGE.TARGET_GFLOPS every compared method is set to that budget through its declared knob before
any extraction starts (`reid_lite.compress.budget`); methods whose cost depends on the image are matched
on effective GFLOPs averaged over the first MERGE.CALIBRATION_IMAGES gallery images (`gallery_calibration`),
which also give every row's effective GFLOPs.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..compress.budget import Calibration, CalibrationSource, budget_label, merge_with_budget, solve_budget
from ..compress.flops import transreid_gflops
from ..data import build_test_loader
from ..data.datasets import ReIDDataset
from ..data.loader import ImageDataset
from ..data.transforms import build_transforms
from ..merging import (
    build_reducers,
    check_learned_ready,
    get_method,
    input_tokens,
    parse_methods,
    reducible_depth,
    reduction_schedule,
)
from ..metrics.rank import evaluate_rank
from ..metrics.rerank import re_ranking
from ..metrics.retrieval import evaluate_retrieval
from ..models import check_input_size
from ..utils.device import autocast, resolve_device
from ..utils.table import markdown_table
from .extractor import Features, extract_features, prepare_model

logger = logging.getLogger(__name__)

__all__ = ["check_methods", "evaluate", "evaluate_features", "format_table", "gallery_calibration", "model_gflops",
           "model_schedule", "split_query_gallery"]

#: Rows of `format_table`: (header, row key, format); percentages are printed x100 as in the paper.
_COLUMNS = (
    ("method", "method", "{}"),
    ("GFLOPs", "gflops", "gflops"),
    ("eff. GFLOPs", "effective_gflops", "gflops"),
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
    return float(transreid_gflops(model))


def model_schedule(model: nn.Module) -> list[dict[str, int]] | None:
    """The token-reduction schedule a TransReID runs with its current reducers (None for other models):
    what results record, so a record never shows a schedule other than the one evaluated."""
    if not hasattr(model, "reducible_blocks"):
        return None
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


def gallery_calibration(cfg: Any, dataset: ReIDDataset, count: int | None = None) -> Calibration:
    """The first `count` (default MERGE.CALIBRATION_IMAGES) readable gallery images through the test transform,
    with their cameras: what image-dependent GFLOPs are averaged over (recorded with their paths)."""
    count = int(cfg.MERGE.CALIBRATION_IMAGES if count is None else count)
    if count < 1:
        raise ValueError(f"MERGE.CALIBRATION_IMAGES must be >= 1, got {count}")
    images = ImageDataset(dataset.gallery, build_transforms(cfg, is_train=False))
    samples = []
    for i in range(len(images)):
        sample = images[i]
        if sample.image is not None:
            samples.append(sample)
        if len(samples) == count:
            break
    if not samples:
        raise ValueError("no readable gallery image to calibrate the effective GFLOPs with")
    return Calibration(torch.stack([s.image for s in samples]), torch.tensor([s.camid for s in samples]),
                       f"first {len(samples)} gallery images", [s.path for s in samples])


def _merge_section(cfg: Any, method: str, depth: int) -> Any:
    """cfg.MERGE for `method`: a budget stays set when the method declares a knob or reduces nothing (the
    unmerged reference, then run without it); a reducing method without a knob keeps it and is refused."""
    node = cfg.MERGE.clone()
    node.defrost()
    node.METHOD = method
    node.TRACE_SOURCE = False
    if node.TARGET_GFLOPS > 0 and get_method(method).budget_knob is None:
        plain = node.clone()
        plain.TARGET_GFLOPS = 0.0
        if not build_reducers(plain, depth):  # no reducer in any block: nothing a budget could change
            return plain
    return node


def _solve(cfg: Any, model: nn.Module, names: Sequence[str], calibration: CalibrationSource = None) -> dict[str, Any]:
    """{method: its budget solution (None without a budget)}, every method validated against cfg.MERGE and
    the model's depth (and its budget solved) before any extraction starts."""
    if not names:  # nothing to set up (an exported model runs the merging baked into its file)
        return {}
    depth = reducible_depth(model)
    solutions = {}
    for name in names:
        node = _merge_section(cfg, name, depth)
        solutions[name] = None
        if node.TARGET_GFLOPS > 0 and hasattr(model, "reducible_blocks"):
            solutions[name] = solve_budget(model, node, float(node.TARGET_GFLOPS), calibration)
        else:
            build_reducers(node, depth, num_tokens=input_tokens(model))
    return solutions


def check_methods(cfg: Any, model: nn.Module, methods: Sequence[str],
                  calibration: CalibrationSource = None) -> list[str]:
    """Validate merging methods against cfg.MERGE and the model's depth before any extraction starts
    (a bad MERGE.LAYERS for the third method must not surface after minutes of work), solving each one's
    budget when MERGE.TARGET_GFLOPS is set (`calibration`: for image-dependent costs); returns the names.

    Each method's reducers are built afresh, so a learned method (DTEM) compared on trained weights
    (TEST.WEIGHT) must name its own weights file (MERGE.DTEM.WEIGHTS): ValueError otherwise.
    """
    names = parse_methods(list(methods))
    _solve(cfg, model, names, calibration)
    if cfg.TEST.WEIGHT:
        depth = reducible_depth(model)
        for name in names:
            check_learned_ready(build_reducers(_merge_section(cfg, name, depth), depth))
    return names


def _effective(model: nn.Module, calibration: Callable[[], Calibration], gflops: float | None) -> float | None:
    """Mean effective GFLOPs per calibration image when a reducer may leave slots empty, else `gflops`."""
    if not hasattr(model, "reducible_blocks") or not any(r.may_empty for r in model.reducers.values()):
        return gflops
    return calibration().effective_gflops(model)


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
            feature_dim, num_query, num_gallery, skipped, re_ranking, merge_r (the constant r a GFLOPs budget chose),
            effective_gflops (valid tokens only, mean over the calibration images; = gflops for fixed counts),
            budget (the solved setting: knob, value, MERGE keys, GFLOPs, error; None without a budget),
            schedule: the reducing blocks with their token counts in and out, as run), 'device', 'skipped' (count),
            'skipped_paths', 'num_query', 'num_gallery', 'calibration' (the images effective GFLOPs were averaged
            over, when any were needed), and 'features' ({method: (query, gallery)}) on request.
    """
    check_input_size(cfg, model)
    dev = resolve_device(device if device is not None else cfg.MODEL.DEVICE, cfg.MODEL.DEVICE_ID)
    loader, num_query = build_test_loader(cfg, dataset)
    calib: list[Calibration] = []

    def calibration() -> Calibration:  # loaded once, when a method first needs it
        if not calib:
            calib.append(gallery_calibration(cfg, dataset))
        return calib[0]

    names: list[str | None] = list(parse_methods(list(methods))) if methods else [None]
    own = str(cfg.MERGE.METHOD).lower()
    # Without --compare the model runs as built; a budget is re-solved here on this dataset's gallery images.
    again = cfg.MERGE.TARGET_GFLOPS > 0 and hasattr(model, "reducible_blocks")
    solutions = _solve(cfg, model, [n or own for n in names if n or again], calibration)
    flip = bool(cfg.TEST.FLIP)
    feat_norm = str(cfg.TEST.FEAT_NORM).lower() == "yes"
    rows: list[dict[str, Any]] = []
    kept: dict[str, tuple[Features, Features]] = {}
    skipped_paths: list[str] = []
    prepare_model(model, dev)  # device, eval mode and channels-last before the warm-up
    for name in names:
        label = name or own
        run = model
        if name is not None or solutions.get(label) is not None:
            # A model per compared method (or per budget solved on this data): the caller's model is not changed.
            run = copy.deepcopy(model)
            section = _merge_section(cfg, label, reducible_depth(model))
            merge_with_budget(run, section, calibration, solutions.get(label))
        _warmup(run, cfg, dev)
        feats = extract_features(run, loader, device=dev, amp=cfg.TEST.AMP, flip=flip, feat_norm=feat_norm,
                                 progress=progress, desc=f"extract [{label}]")
        query, gallery = split_query_gallery(feats, num_query)
        metrics = evaluate_features(query, gallery, re_rank=bool(cfg.TEST.RE_RANKING),
                                    query_chunk=int(cfg.TEST.QUERY_CHUNK))
        skipped_paths = list(feats.failed)  # same loader for every method, so the same files
        gflops = model_gflops(run)
        budget = getattr(run, "merge_budget", None)
        rows.append({
            "method": label,
            "gflops": gflops,
            "effective_gflops": _effective(run, calibration, gflops),
            "budget": budget.to_dict() if budget is not None else None,
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
            "merge_r": getattr(run, "merge_r", None),
            "schedule": model_schedule(run),
        })
        logger.info("%s: rank1 %.4f mAP %.4f (%.1f img/s)", label, metrics["rank1"], metrics["mAP"],
                    feats.images_per_second)
        if keep_features:
            kept[label] = (query, gallery)
        del run
    out: dict[str, Any] = {
        "rows": rows,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "skipped": len(skipped_paths),
        "skipped_paths": skipped_paths,
        "num_query": num_query,
        "num_gallery": len(dataset.gallery),
        "calibration": calib[0].record() if calib else None,
    }
    if keep_features:
        out["features"] = kept
    return out


def format_table(results: dict[str, Any]) -> str:
    """The result rows as a Markdown table (the paper's Table 1 layout) plus device and skipped images.

    img/s is the whole pass (decoding, transfer, model); model img/s counts forward time only, which
    is what the paper's throughput column measures.
    """
    rows = results["rows"]
    budgeted = any(r.get("budget") for r in rows)
    head = [h for h, _, _ in _COLUMNS] + (["setting (error)"] if budgeted else [])
    body = []
    for row in rows:
        cells = []
        for _, key, fmt in _COLUMNS:
            value = row.get(key)
            if value is None:
                cells.append("-")
            elif fmt == "gflops":  # the paper's 2 decimals; tiny test models need more to differ
                cells.append(f"{value:.2f}" if value >= 1 else f"{value:.4f}")
            else:
                cells.append(fmt.format(value))
        if budgeted:
            b = row.get("budget")
            cells.append(budget_label(b))
        body.append(cells)
    table = markdown_table(head, body, left=(0, len(_COLUMNS)))  # the method and the setting; numbers right
    dims = sorted({r["feature_dim"] for r in rows})
    footer = (f"device: {results['device']} ({results.get('device_name', '')}) | "
              f"query {rows[0]['num_query'] if rows else 0}, gallery {rows[0]['num_gallery'] if rows else 0} | "
              f"skipped images: {results['skipped']} | feature dim {','.join(map(str, dims))} | "
              f"re-ranking: {'on' if rows and rows[0]['re_ranking'] else 'off'}")
    budgets = [r["budget"] for r in rows if r.get("budget")]
    if budgets:
        calib = results.get("calibration")
        footer += (f"\nbudget: {budgets[0]['target_gflops']:.4g} GFLOPs per image, each method's knob set to meet it "
                   f"within {budgets[0]['tolerance']:.0%}" + (f"; effective GFLOPs over the {calib['source']}"
                                                             if calib else ""))
    if results["skipped"]:
        footer += "\nskipped (unreadable): " + ", ".join(results["skipped_paths"][:5])
        if results["skipped"] > 5:
            footer += f", ... ({results['skipped'] - 5} more)"
    return table + "\n" + footer
