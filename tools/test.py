"""Evaluate a TransReID checkpoint on a query/gallery split, optionally comparing merging methods.

    python tools/test.py --config configs/msmt17_stm.yml TEST.WEIGHT path/to/transformer_120.pth
    python tools/test.py --config market1501_stm.yml --compare none,tome,evit,stm DATASETS.ROOT_DIR data
    python tools/test.py --config demo_synthetic.yml --compare all --budget 75%    # every method at equal GFLOPs
    python tools/test.py --config demo_synthetic.yml --vis-queries 0,5,9
    python tools/test.py --config demo_synthetic.yml MODEL.BACKEND onnxruntime MODEL.ONNX_PATH stm.onnx  # exported
    python tools/test.py --config demo_synthetic.yml --asymmetric --compare none,tome,stm  # unmerged gallery
    python tools/test.py --config demo_synthetic.yml --calibrate /data/gal [--target-precision 0.95]

Prints method | GFLOPs | img/s | Rank-1/5/10 | mAP | mINP (plus device and skipped images) and writes
`results.json` (with the config, device, torch version, timestamp and, per method, the token schedule
that ran) and, with --vis-queries, `ranked_results_<method>.png` to OUTPUT_DIR. --asymmetric adds the
accuracy of each gallery/query pairing (none/none, none/merged, merged/merged); --calibrate GALLERY
chooses the gallery's "no match" score threshold on this labelled split and writes it into the gallery
(reid_lite.index.calibration). With camera SIE the
model's camera count is the checkpoint's (its SIE table). Without TEST.WEIGHT the randomly initialised
model is evaluated after a loud warning (useful for smoke tests and speed, meaningless for accuracy).
Exit codes: 0 success, 2 bad input (arguments, config, dataset, checkpoint, merging settings), with one
`error:` line (reid_lite.cli, shared with tools/train.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reid_lite.build import build_model, build_model_for_checkpoint
from reid_lite.cli import USER_ERRORS, add_config_arg, add_malloc_arg, add_opts_arg, cli_error, set_malloc, tool_parser
from reid_lite.compress.budget import resolve_budget
from reid_lite.config import load_cfg, validate
from reid_lite.data import build_dataset_from_cfg, sie_counts
from reid_lite.deploy import load_runtime_model
from reid_lite.engine.asymmetric import asymmetric_methods, evaluate_pairings, format_pairings
from reid_lite.engine.evaluator import check_methods, evaluate, format_table, gallery_calibration
from reid_lite.index import Gallery, GalleryError
from reid_lite.index.calibration import calibrate_gallery, query_fingerprint
from reid_lite.index.visualize import rank_gallery, visualize_ranked_results
from reid_lite.merging import BudgetError, get_method, parse_methods
from reid_lite.models import check_checkpoint_file, check_input_size
from reid_lite.utils.device import resolve_device
from reid_lite.utils.files import check_output_dir
from reid_lite.utils.text import count

logger = logging.getLogger("reid_lite.test")

RANDOM_WEIGHTS_WARNING = """
################################################################################
##  WARNING: TEST.WEIGHT is not set: evaluating a RANDOMLY INITIALISED model   ##
##  (no trained ReID weights). Rank-1 / mAP below are MEANINGLESS (chance     ##
##  level); GFLOPs and img/s are still valid. Pass TEST.WEIGHT <checkpoint>.  ##
################################################################################
"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; trailing `KEY VALUE` pairs override the config."""
    p = tool_parser(__doc__, summary=True)
    add_config_arg(p, aliases=True)
    p.add_argument("--compare", default="",
                   help="comma-separated merging methods evaluated with the same weights, e.g. none,tome,evit,stm "
                        "(any registered method; your own through MERGE.PLUGINS)")
    p.add_argument("--budget", default="",
                   help="GFLOPs per image every method is set to (within 1%%, through its knob: r, keep rate, ATM "
                        "offset, K), e.g. 15.53 (the paper's, for ViT-B) or a share of the unmerged model, e.g. 75%%; "
                        "sets MERGE.TARGET_GFLOPS")
    p.add_argument("--vis-queries", default="",
                   help="comma-separated query indices (positions in the query list) to draw with their top-10")
    p.add_argument("--asymmetric", action="store_true",
                   help="also rank each method's queries against the unmerged model's gallery (none/none, "
                        "none/m, m/m for the methods of --compare, else MERGE.METHOD)")
    p.add_argument("--calibrate", metavar="GALLERY", default="",
                   help="choose the gallery's 'no match' score threshold on this labelled split (for queries of "
                        "this config's model) and write it into the gallery (a new generation)")
    p.add_argument("--target-precision", type=float, default=None, metavar="P",
                   help="with --calibrate: the lowest threshold whose precision reaches P (default: best F1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_malloc_arg(p)
    add_opts_arg(p, help="config overrides as KEY VALUE pairs (options may come before or after)")
    # Intermixed: `--compare` may follow the KEY VALUE pairs, as users naturally append it.
    return p.parse_intermixed_args(argv)


def _parse_indices(spec: str) -> list[int]:
    try:
        return [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--vis-queries expects comma-separated integers, got {spec!r}") from None


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def _visualize(results: dict[str, Any], query_ids: list[int], out_dir: Path) -> list[str]:
    written = []
    for method, (query, gallery) in results["features"].items():
        # Positions in the query list -> rows of the extracted features (unreadable queries are absent).
        row_of = {int(idx): i for i, idx in enumerate(query.indices)}
        rows = [row_of[q] for q in query_ids if q in row_of]
        missing = [q for q in query_ids if q not in row_of]
        if missing:
            logger.warning("queries %s could not be read and are not drawn", missing)
        ranked = [rank_gallery(query.feats[r], int(query.pids[r]), int(query.camids[r]), gallery.feats,
                               gallery.pids, gallery.camids, topk=10) for r in rows]
        path = visualize_ranked_results([query.paths[r] for r in rows], [int(query.pids[r]) for r in rows],
                                        [int(query.camids[r]) for r in rows], ranked, gallery.paths,
                                        gallery.pids, gallery.camids, out_dir / f"ranked_results_{method}.png")
        written.append(str(path))
    return written


def _plan_calibration(path: str, cfg: Any, model: Any, methods: list[str] | None) -> dict[str, Any]:
    """Which methods' features a calibration of the gallery at `path` needs (the gallery's model on the
    gallery side, this config's model on the query side), checked before any extraction."""
    gallery = Gallery.open(path)
    fp, asymmetric = query_fingerprint(gallery, cfg, model)
    query = str(cfg.MERGE.METHOD).lower()
    side = "none" if asymmetric else query
    if methods or asymmetric:
        methods = list(dict.fromkeys([*(methods or []), side, query]))
    return {"gallery": gallery, "fingerprint": fp, "query": query, "gallery_side": side, "methods": methods}


def _calibrate(args: argparse.Namespace, plan: dict[str, Any], results: dict[str, Any], dataset: str
               ) -> dict[str, Any]:
    query = results["features"][plan["query"]][0]
    gallery = results["features"][plan["gallery_side"]][1]
    entry = calibrate_gallery(plan["gallery"], query.feats, query.pids, query.camids, gallery.feats, gallery.pids,
                              gallery.camids, query_fingerprint=plan["fingerprint"],
                              target_precision=args.target_precision,
                              source=f"{dataset}: {len(query)} queries, {len(gallery)} gallery images")
    print(f"\ncalibrated {args.calibrate} for {plan['query']} queries against its {plan['gallery_side']} gallery "
          f"(written as generation {plan['gallery'].generation}): threshold {entry['threshold']:.4f} ({entry['rule']}"
          + (f" >= {entry['target_precision']:g}" if entry["target_precision"] else "")
          + f"): precision {entry['precision']:.3f}, recall {entry['recall']:.3f}, F1 {entry['f1']:.3f} of "
          f"'the top hit is a true match' on {entry['num_queries']} queries ({entry['num_true_top1']} right at "
          f"rank 1, {entry['num_flagged']} flagged likely; in-sample)")
    held = entry["held_out"]
    if held is None:
        print("held-out estimate: not available (too few identities, or a fold without a right top hit)")
    else:
        precision = "-" if held["precision"] is None else f"{held['precision']:.3f}"
        print(f"held-out estimate ({held['folds']} folds by identity, each flagged with the threshold chosen on "
              f"the others): precision {precision}, recall {held['recall']:.3f}")
    return entry


def _has_cross_camera_match(dataset: Any) -> bool:
    """Whether some query's identity is in the gallery from another camera (the protocol drops same-camera
    matches): without one, no query can be scored and the evaluation would fail after embedding everything."""
    cameras: dict[int, set[int]] = {}
    for _, pid, camid, _ in dataset.gallery:
        cameras.setdefault(pid, set()).add(camid)
    return any(cameras.get(pid, set()) - {camid} for _, pid, camid, _ in dataset.query)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the evaluation; returns the process exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_cfg(args.config or None, args.opts)
        methods = parse_methods(args.compare) if args.compare else None
        vis_ids = _parse_indices(args.vis_queries)
        validate(cfg)  # before any data is read or generated
        if args.target_precision is not None and not args.calibrate:
            raise ValueError("--target-precision applies to --calibrate GALLERY")
        if args.asymmetric:
            methods = asymmetric_methods(cfg, methods)
        if cfg.TEST.WEIGHT:
            check_checkpoint_file(cfg.TEST.WEIGHT)  # a wrong path fails now, not after the dataset is indexed
        check_output_dir(cfg.OUTPUT_DIR, "OUTPUT_DIR")  # results.json is written last: refuse before the work
        if args.budget:
            # results.json records the budget: it must have been applied to a method that has a knob for it.
            evaluated = methods or [str(cfg.MERGE.METHOD).lower()]
            if all(get_method(m).budget_knob is None for m in evaluated):
                raise ValueError(f"--budget {args.budget}: no evaluated method has a GFLOPs knob "
                                 f"({', '.join(evaluated)}; MERGE.METHOD none merges nothing): set MERGE.METHOD "
                                 "or --compare to merging methods")
    except USER_ERRORS as err:
        return cli_error(err)
    set_malloc(args.system_malloc)

    try:
        dataset = build_dataset_from_cfg(cfg)
    except USER_ERRORS as err:
        return cli_error(err)
    print(dataset.statistics_table())
    if not _has_cross_camera_match(dataset):
        return cli_error(f"{dataset.name}: no query identity appears in the gallery from another camera "
                         f"({count(len(dataset.query), 'query', 'queries')}, "
                         f"{count(len(dataset.gallery), 'gallery image')}): nothing to evaluate; check that the "
                         "query and gallery folders hold the same people")
    bad = [q for q in vis_ids if not 0 <= q < len(dataset.query)]
    if bad:
        return cli_error(f"--vis-queries {bad} out of range: the query list has {len(dataset.query)} images")

    device = resolve_device(cfg.MODEL.DEVICE, cfg.MODEL.DEVICE_ID)
    camera_num, view_num = sie_counts(dataset)
    backend = str(cfg.MODEL.BACKEND).lower()
    try:
        if backend != "torch":  # an exported file (MODEL.ONNX_PATH) with its own weights and merging
            if methods:
                return cli_error("--compare re-attaches merging to a PyTorch model; with MODEL.BACKEND "
                                 f"{backend} export one file per method and evaluate each")
            model = load_runtime_model(cfg)
            device = torch.device("cpu")  # the runtimes run on the CPU: the images stay there
        elif cfg.TEST.WEIGHT:
            # SIE camera count from the checkpoint's table: a model trained on 6 cameras evaluates data of 2.
            model = build_model_for_checkpoint(cfg, cfg.TEST.WEIGHT, max(dataset.num_train_pids, 1), camera_num,
                                               view_num)
            logger.info("loaded %s", cfg.TEST.WEIGHT)
        else:
            model = build_model(cfg, max(dataset.num_train_pids, 1), camera_num, view_num)
        check_input_size(cfg, model)
        calibration = _plan_calibration(args.calibrate, cfg, model, methods) if args.calibrate else None
        if calibration is not None:
            methods = calibration["methods"]
            if methods and backend != "torch":
                raise ValueError("calibrating merged queries of an unmerged gallery re-attaches merging to a "
                                 "PyTorch model: use MODEL.BACKEND torch")
        if methods:
            check_methods(cfg, model, methods, lambda: gallery_calibration(cfg, dataset))
        if args.budget:  # solved by evaluate() before any extraction; a budget out of reach is a BudgetError
            if backend != "torch":
                return cli_error(f"--budget sets each method's merging on a PyTorch model; MODEL.BACKEND is {backend}")
            cfg.defrost()
            cfg.MERGE.TARGET_GFLOPS = resolve_budget(args.budget, model)
            cfg.freeze()
    except (*USER_ERRORS, GalleryError) as err:  # checkpoint, model, merging, backend, gallery: user errors
        return cli_error(err)
    if backend == "torch":
        random_weights = not cfg.TEST.WEIGHT
    else:
        random_weights = str(model.meta["fingerprint"]["weights"]).startswith("random-init")
    if random_weights:
        print(RANDOM_WEIGHTS_WARNING, file=sys.stderr, flush=True)

    try:
        results = evaluate(cfg, model, dataset, device=device, methods=methods, progress=not args.no_progress,
                           keep_features=bool(vis_ids) or args.asymmetric or bool(args.calibrate))
    except BudgetError as err:  # raised while the budgets are solved, before any image is embedded
        return cli_error(err)
    table = format_table(results)
    if random_weights:
        table += "\nWARNING: random weights (no TEST.WEIGHT) -- accuracy is chance level"
    print(table)
    pairings = None
    if args.asymmetric:
        pairings = evaluate_pairings({m: results["features"][m] for m in methods}, re_rank=bool(cfg.TEST.RE_RANKING),
                                     query_chunk=int(cfg.TEST.QUERY_CHUNK))
        print("\nasymmetric retrieval (gallery embedded by one model, queries by another; same weights)")
        print(format_pairings(pairings))
    calibration_error = None
    if calibration is not None:
        try:
            calibration["entry"] = _calibrate(args, calibration, results, dataset.name)
        except (*USER_ERRORS, GalleryError) as err:  # the evaluation is still written below
            calibration_error = err
            calibration["entry"] = {"error": str(err)}

    out_dir = Path(cfg.OUTPUT_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = _visualize(results, vis_ids, out_dir) if vis_ids else []
    for f in figures:
        print(f"ranked results: {f}")
    record = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config_file": args.config,
        "overrides": list(args.opts),
        "budget": {"spec": args.budget, "target_gflops": float(cfg.MERGE.TARGET_GFLOPS),
                   "calibration": results["calibration"]} if args.budget else None,
        "weights": cfg.TEST.WEIGHT or None,
        "backend": backend,
        "onnx_path": cfg.MODEL.ONNX_PATH or None,
        "random_weights": random_weights,
        "dataset": dataset.name,
        "device": results["device"],
        "device_name": results["device_name"],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "num_query": results["num_query"],
        "num_gallery": results["num_gallery"],
        "skipped": results["skipped"],
        "skipped_paths": results["skipped_paths"],
        "results": results["rows"],
        "table": table,
        "asymmetric": pairings,
        "calibration": None if calibration is None else {"gallery": args.calibrate, **calibration["entry"]},
        "figures": figures,
        "config": _jsonable(cfg),
    }
    path = out_dir / "results.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"results written to {path}")
    if calibration_error is not None:
        return cli_error(f"the gallery was not calibrated: {calibration_error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
