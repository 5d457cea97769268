"""Reference experiment: train TransReID from scratch on real crops, then compare token reduction at equal GFLOPs.

    python tools/reference_experiment.py --preset cpu --data-root DIR [--teacher reid_model.xml]   # ~2 h, 2 cores
    python tools/reference_experiment.py --preset gpu --data-root DIR                              # one GPU
    python tools/reference_experiment.py --tiny --data-root DIR        # the same pipeline in miniature (CI)
    python tools/reference_experiment.py ... --stage train             # then --stage evaluate, in two runs

DIR is a Market-1501-layout dataset (bounding_box_train, query, bounding_box_test), e.g. CUHK03 renamed into
that layout. Stages:

1. train: `validation_split` holds out 100 training identities (each one's lowest-camera images are its
   queries, the rest its gallery); the model trains on the others with `reid_lite.engine.trainer.train`, no
   ImageNet weights, validated every SOLVER.EVAL_PERIOD epochs on the held-out identities, and the best
   validation epoch's weights are kept. The test split is never looked at. `--teacher` distils a frozen
   re-identification model's similarities (MODEL.TEACHER, `engine/teacher.py`). Writes
   OUTPUT/train/train_summary.json (`train_seconds`, history, validation scores); a finished training stage
   is reused by later runs with the same training settings.
2. evaluate: on the test split, the unmerged model and every registered method (`--methods`) at each budget
   of `--ratios` (fractions of the unmerged GFLOPs, met within MERGE.BUDGET_TOLERANCE by each method's knob;
   ATM on effective GFLOPs; LoTM/DHTM at the paper's layers 4/7/11 of 11 and ATM's size split from 9 of 11,
   scaled to the depth; DTEM with an embedding trained first by its modular recipe on the training
   identities, its time recorded as `dtem_train_seconds`). Each row has Rank-1, mAP, mINP with 95% bootstrap
   intervals over queries and paired differences against ToMe and the unmerged model (the same resamples
   for every method); then STM-ReID's decisions at the first budget (STM_ABLATION), and the gallery's
   "likely match" threshold calibrated on the validation identities with its precision and recall on the
   test split; and what ToMe and STM-ReID merge block by block at the first budget on 256 test crops
   (`merge_diagnostics`: similarity, distance and attention of the merged tokens, the PR-Degree's range and
   which factor of the CC-Function decides). Writes OUTPUT/results.json, summary.md, accuracy_vs_gflops.png
   and precision_recall.png. A budget a method cannot meet is a row with its `error`, never a silent omission.

Weights go to OUTPUT/train/ and OUTPUT/dtem/: they derive from the dataset's images, keep them private.
Exit codes: 0 success, 2 bad arguments or missing dataset.

Why the 'cpu' preset is 8 blocks of width 192 (3 heads), 32 epochs in bf16, batch 32, at 256x128, stride 12,
SIE, JPM: the paper's geometry (21 x 10 patches) is kept so that merging schedules and GFLOPs ratios mean
what they mean in the paper; the rest is what two CPU cores train in well under the issue's 8,000 s.
Measured here (one training step, batch 64, forward and backward, 2 threads, Xeon with AMX): fp32 8 x 192
26-31 img/s; bf16 autocast (SOLVER.AMP bf16: AMX tiles) 8 x 192 55-59, 8 x 256 39-45, 12 x 192 34-42,
8 x 384 21-25 img/s. bf16 doubles the epochs the time buys, and more steps of the small model beat a wider
one that sees half as many (run 1 of this preset, fp32, 8 epochs of batch 64, was still underfitting: 4.6%
training accuracy); batch 32 doubles the optimiser steps per epoch for the same reason. 8 x 192 also has 7
reducible blocks with JPM, merging in 6 of them as ViT-B merges in 10 of 11. The run with and the run
without the teacher train side by side, one thread each pinned to its own core (`taskset -c 0` / `-c 1`):
two threads in one process lose most of their speed as soon as anything else runs (OpenMP barriers), one
pinned thread does not; one epoch of ~5k sampled crops then takes about 2.8 minutes on a quiet core (4.5
under load). 32 epochs, not 20: run 2 of this preset (20 epochs, distilled) was still rising on validation
(mAP 34.6, 36.0, 37.0 over its last six epochs) and stayed under the issue's 30% test Rank-1 floor (27.9%);
32 epochs of ~170 s plus validation is about 6,300 s on a core that nothing else uses.
On a CPU without AMX bf16 is slower than fp32: pass `SOLVER.AMP fp32` there. Evaluation stays fp32
(TEST.AMP auto). The ID loss trains alone (with the teacher's term when given): a first run with
TransReID's batch-hard soft-margin triplet at lr 1e-3 collapsed within two epochs (every pair of training
features at cosine 0.9999, the triplet term stuck at log 2, 0.4% training accuracy, with and without the
teacher), the known failure of batch-hard mining on an untrained network; this preset uses lr 5e-4 and no
triplet term. Drop path and random erasing are off: a short schedule underfits, and regularisers that slow
fitting cost more than they give (reasoned, not searched: the validation split picks the epoch to keep,
and no hyperparameter search fitted in the time). The teacher's weight (3) puts its two terms (pairwise
similarities, ~0.5 at the start, and per-image cosine through a projection, ~1) at about half the ID loss
(ln 643 = 6.5) at the start; weight 10 let them dominate the first epochs and slowed validation mAP (2.9
vs 4.7 after one epoch in run 1's trials). Warm-up is two epochs, ramped per step; the cosine's last epoch
runs above lr_min.

Why the 'gpu' preset is 8 blocks of width 384 (6 heads): ViT-B (86 M parameters) would see too few epochs
from scratch on ~7k crops; 8 x 384 costs 3.71 GFLOPs per image and should pass 60 epochs in minutes on one
GPU. This sizing is reasoned, not yet measured on a GPU: check `train_seconds` in results.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from yacs.config import CfgNode

from reid_lite.build import build_model_for_checkpoint
from reid_lite.cli import USER_ERRORS, add_opts_arg, add_threads_arg, cli_error, set_threads, tool_parser
from reid_lite.compress.budget import budget_label, merge_with_budget
from reid_lite.config import get_cfg, validate
from reid_lite.data import (
    ReIDDataset,
    build_dataset_from_cfg,
    build_transforms,
    read_image,
    sie_counts,
    validation_split,
)
from reid_lite.engine.evaluator import evaluate, model_gflops
from reid_lite.engine.trainer import EMBEDDING_FILE, train
from reid_lite.merging import parse_methods
from reid_lite.merging.diagnostics import record_merges
from reid_lite.merging.schedule import BudgetError
from reid_lite.metrics import bootstrap_draws, metric_intervals, paired_difference, per_query_metrics
from reid_lite.metrics.calibration import choose_threshold, top1_scores
from reid_lite.utils.table import markdown_table

REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger("reid_lite.reference")

#: Config overrides per preset (the module docstring says why each is sized as it is).
PRESETS: dict[str, list[Any]] = {
    "gpu": [
        "MODEL.EMBED_DIM", 384, "MODEL.DEPTH", 8, "MODEL.NUM_HEADS", 6, "MODEL.STRIDE_SIZE", [12, 12],
        "MODEL.DROP_PATH", 0.1, "INPUT.SIZE_TRAIN", [256, 128], "INPUT.SIZE_TEST", [256, 128],
        "DATALOADER.NUM_WORKERS", 12, "SOLVER.MAX_EPOCHS", 60, "SOLVER.IMS_PER_BATCH", 128,
        "SOLVER.BASE_LR", 1e-3, "SOLVER.WARMUP_EPOCHS", 5, "SOLVER.EVAL_PERIOD", 5, "SOLVER.CHECKPOINT_PERIOD", 60,
        "SOLVER.LOG_PERIOD", 20, "TEST.IMS_PER_BATCH", 256,
    ],
    "cpu": [
        "MODEL.EMBED_DIM", 192, "MODEL.DEPTH", 8, "MODEL.NUM_HEADS", 3, "MODEL.STRIDE_SIZE", [12, 12],
        "MODEL.DROP_PATH", 0.0, "INPUT.SIZE_TRAIN", [256, 128], "INPUT.SIZE_TEST", [256, 128], "INPUT.RE_PROB", 0.0,
        "DATALOADER.NUM_WORKERS", 0, "SOLVER.MAX_EPOCHS", 32, "SOLVER.IMS_PER_BATCH", 32, "SOLVER.AMP", "bf16",
        "SOLVER.BASE_LR", 5e-4, "SOLVER.WARMUP_EPOCHS", 2, "SOLVER.EVAL_PERIOD", 2, "SOLVER.CHECKPOINT_PERIOD", 32,
        "SOLVER.LOG_PERIOD", 20, "TEST.IMS_PER_BATCH", 128, "MODEL.TEACHER_WEIGHT", 3.0,
        "MODEL.TEACHER_LOSS", "both", "MODEL.TRIPLET_LOSS_WEIGHT", 0.0,
    ],
    # The same pipeline in miniature: 4 blocks of width 48 at 128x64, stride 16 (8 x 4 patches), one epoch
    # on at most 150 identities.
    "tiny": [
        "MERGE.BUDGET_TOLERANCE", 0.03,
        "MODEL.EMBED_DIM", 48, "MODEL.DEPTH", 4, "MODEL.NUM_HEADS", 4, "MODEL.STRIDE_SIZE", [16, 16],
        "MODEL.DROP_PATH", 0.0, "INPUT.SIZE_TRAIN", [128, 64], "INPUT.SIZE_TEST", [128, 64],
        "DATALOADER.NUM_WORKERS", 0, "SOLVER.MAX_EPOCHS", 1, "SOLVER.IMS_PER_BATCH", 32,
        "SOLVER.BASE_LR", 1e-3, "SOLVER.WARMUP_EPOCHS", 0, "SOLVER.EVAL_PERIOD", 1, "SOLVER.CHECKPOINT_PERIOD", 1,
        "SOLVER.LOG_PERIOD", 50, "TEST.IMS_PER_BATCH", 64,
    ],
}
#: Identities of the training set held out for validation (choices never look at the test split).
VALIDATION_IDS = {"gpu": 100, "cpu": 100, "tiny": 3}
#: Shared by all presets: TransReID's recipe with the choices that suit training from scratch.
COMMON: list[Any] = [
    "MODEL.PRETRAIN_CHOICE", "none", "MODEL.SIE_CAMERA", True, "MODEL.JPM", True, "MODEL.IF_LABELSMOOTH", "on",
    "MODEL.NO_MARGIN", True, "INPUT.PIXEL_MEAN", [0.5, 0.5, 0.5], "INPUT.PIXEL_STD", [0.5, 0.5, 0.5],
    "DATASETS.NAMES", "market1501", "DATALOADER.SAMPLER", "softmax_triplet", "DATALOADER.NUM_INSTANCE", 4,
    "SOLVER.OPTIMIZER_NAME", "AdamW", "SOLVER.WEIGHT_DECAY", 0.05, "SOLVER.WEIGHT_DECAY_BIAS", 0.0,
    "TEST.NECK_FEAT", "before", "TEST.FEAT_NORM", "yes", "MERGE.METHOD", "none",
]
#: What the training stage leaves beside the weights: its time, per-epoch history and validation scores.
TRAIN_SUMMARY = "train_summary.json"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; trailing `KEY VALUE` pairs override the preset."""
    p = tool_parser(__doc__, summary=True)
    p.add_argument("--data-root", required=True, help="a Market-1501-layout dataset (bounding_box_train, query, "
                                                      "bounding_box_test)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="gpu", help="model and schedule (default %(default)s)")
    p.add_argument("--tiny", action="store_true", help="the same as --preset tiny: CPU, under two minutes")
    p.add_argument("--output", default="", help="output folder (default output/reference_<preset>)")
    p.add_argument("--teacher", default="", help="distil from this re-identification model (MODEL.TEACHER: an "
                                                 "OpenVINO .xml or an .onnx)")
    p.add_argument("--stage", choices=("all", "train", "evaluate"), default="all",
                   help="train only, evaluate only (the training stage's weights must exist), or both (default)")
    p.add_argument("--seed", type=int, default=1234, help="SOLVER.SEED (default %(default)s)")
    p.add_argument("--device", default="", help="cuda or cpu (default: cuda for the gpu preset, else cpu)")
    p.add_argument("--ratios", default="",
                   help="GFLOPs budgets as fractions of the unmerged model (default 0.75,0.6; --tiny 0.76, where "
                        "the 33 tokens of the miniature model move the GFLOPs in coarse steps)")
    p.add_argument("--methods", default="all", help="methods compared at each budget (default: every registered)")
    p.add_argument("--no-ablation", action="store_true", help="skip STM-ReID's decisions table")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap resamples of the queries (default %(default)s)")
    p.add_argument("--max-train-ids", type=int, default=-1,
                   help="train on the first N identities only (default: all; --tiny: 150)")
    add_threads_arg(p)
    add_opts_arg(p)
    args = p.parse_intermixed_args(argv)
    if args.tiny:
        args.preset = "tiny"
    return args


def git_commit() -> str:
    """HEAD's hash, with '-dirty' when tracked files differ from it; 'unknown' outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def build_cfg(args: argparse.Namespace) -> Any:
    """Defaults + COMMON + the preset + schedule layers for its depth + the user's KEY VALUE pairs."""
    cfg = get_cfg()
    device = args.device or ("cuda" if args.preset == "gpu" else "cpu")
    out = Path(args.output or f"output/reference_{args.preset}")
    cfg.merge_from_list([*COMMON, *PRESETS[args.preset], "DATASETS.ROOT_DIR", str(args.data_root),
                         "SOLVER.SEED", args.seed, "MODEL.DEVICE", device, "OUTPUT_DIR", str(out / "train"),
                         "MODEL.TEACHER", args.teacher])
    if len(args.opts) % 2:
        raise ValueError(f"overrides must be KEY VALUE pairs, got an odd count: {list(args.opts)}")
    try:
        cfg.merge_from_list(list(args.opts))
    except AssertionError as err:
        raise ValueError(str(err)) from None
    # The paper's schedules scaled to the depth: ToMe/STM in every reducible block but the last (1-10 of
    # ViT-B's 11 with JPM), EViT at the paper's 4/7/10 of 11, proportionally.
    reducible = reducible_blocks(cfg)
    cfg.MERGE.LAYERS = list(range(1, max(2, reducible)))
    cfg.MERGE.EVIT.LAYERS = scaled_layers((4, 7, 10), reducible)
    cfg.freeze()
    return cfg


def limit_identities(dataset: ReIDDataset, max_ids: int) -> ReIDDataset:
    """`dataset` with its training split cut to the (relabelled, so 0-based) identities below `max_ids`;
    0 keeps everything. Query and gallery are untouched."""
    if max_ids <= 0 or dataset.num_train_pids <= max_ids:
        return dataset
    limited = ReIDDataset([r for r in dataset.train if r[1] < max_ids], dataset.query, dataset.gallery)
    limited.name = dataset.name
    return limited


def reducible_blocks(cfg: Any) -> int:
    """Blocks whose tokens may be reduced: all of MODEL.DEPTH but the last with JPM (its copies b1/b2 replace it)."""
    return int(cfg.MODEL.DEPTH or 12) - (1 if cfg.MODEL.JPM else 0)


def scaled_layers(layers: Sequence[int], reducible: int, of: int = 11) -> list[int]:
    """Paper layer indices given for `of` reducible blocks (ViT-B with JPM: 11), scaled to `reducible` blocks."""
    return sorted({min(reducible, max(1, round(x * reducible / of))) for x in layers})


def method_cfg(cfg: Any, ratio: float, base_gflops: float, **merge: Any) -> Any:
    """`cfg` at a GFLOPs budget of `ratio` x `base_gflops`, with the paper's layer choices scaled to the depth
    (LoTM and DHTM at 4/7/11, ATM's size-distinctive split from block 9 of 11) and MERGE.<NAME> overrides
    given as `STM={"ENTROPY": "normalized"}`."""
    out = cfg.clone()
    out.defrost()
    reducible = reducible_blocks(out)
    out.MERGE.TARGET_GFLOPS = ratio * base_gflops
    out.MERGE.LOTM.LAYERS = scaled_layers((4, 7, 11), reducible)
    out.MERGE.DHTM.LAYERS = scaled_layers((4, 7, 11), reducible)
    out.MERGE.ATM.SPLIT_DEPTH = scaled_layers((9,), reducible)[0]
    for name, options in merge.items():
        for key, value in options.items():
            out.MERGE[name][key] = value
    out.freeze()
    return out


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Rank-1 and mAP against GFLOPs with 95% bootstrap intervals, one line per method (the paper's Fig. 6)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "error" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in ((axes[0], "rank1", "Rank-1 (%)"), (axes[1], "mAP", "mAP (%)")):
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r.get("effective_gflops") or r["gflops"], 100 * r[key],
                          [100 * v for v in r[f"{key}_ci95"]]) for r in rows if r["method"] == method)
            x = [p[0] for p in pts]
            y = [p[1] for p in pts]
            err = [[p[1] - p[2][0] for p in pts], [p[2][1] - p[1] for p in pts]]
            if method == "none":
                ax.axhspan(pts[0][2][0], pts[0][2][1], color="gray", alpha=0.12)
                ax.axhline(y[0], color="gray", linestyle="--", linewidth=1)
                ax.errorbar(x, y, yerr=err, fmt="k*", markersize=10, capsize=3, label="no merging")
            else:
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method)
        ax.xaxis.set_major_locator(plt.MaxNLocator(6))
        ax.set_xlabel("GFLOPs per image (effective for ATM)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(title + "\n(bars: 95% bootstrap intervals over queries; grey band: the unmerged model's)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_precision_recall(curves: dict[str, dict[str, Any]], path: Path, title: str) -> Path:
    """The test split's precision-recall curve of "the top hit is the person" per method, with the threshold
    calibrated on the validation split marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for name, c in curves.items():
        line, = ax.plot(c["recall_curve"], c["precision_curve"], label=f"{name} (AP {c['average_precision']:.2f})")
        ax.plot([c["test"]["recall"]], [c["test"]["precision"] or 0.0], "o", color=line.get_color())
    ax.set_xlabel("recall (true top hits flagged 'likely')")
    ax.set_ylabel("precision (flagged top hits that are right)")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title + "\n(dots: the threshold calibrated on validation identities)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


#: STM-ReID's decisions (docs/methods.md, STM-ReID) compared at the 75% budget: (label, MERGE.STM overrides).
STM_ABLATION: list[tuple[str, dict[str, Any]]] = [
    ("default (literal entropy, virtual coordinates, full keys, d2 = 1/20)", {}),
    ("entropy over the neighbourhood-normalised attention", {"ENTROPY": "normalized"}),
    ("tracked coordinates", {"COORDS": "tracked"}),
    ("keys averaged over heads", {"KEYS": "mean"}),
    ("DSE-Assess off (alternate split)", {"DSE": False}),
    ("CCF-Match off (cosine only)", {"CCF": False}),
    ("PRN-Fuse off (size-weighted mean)", {"PRN": False}),
    ("d2 = 0", {"DELTA2": 0.0}),
    ("d2 = 1/10", {"DELTA2": 0.1}),
    ("d2 = 1/5", {"DELTA2": 0.2}),
]
#: Methods merging in a few chosen layers (MERGE.<NAME>.LAYERS); at a budget those cannot meet, they merge in
#: every block that ToMe and STM-ReID merge in, and the row says so.
LAYERED_METHODS = ("LOTM", "DHTM")
#: Epochs of DTEM's modular training (backbone frozen) per preset, and its learning rate (the demo's).
DTEM_EPOCHS = {"gpu": 5, "cpu": 1, "tiny": 1}
DTEM_LR = 5e-3
#: Training keys that decide the weights: a finished training stage is reused only when these match.
TRAINING_NODES = ("MODEL", "INPUT", "DATASETS", "DATALOADER", "SOLVER")


def training_settings(cfg: Any) -> dict[str, Any]:
    """The config keys training depends on (TRAINING_NODES), flattened to 'NODE.KEY' -> value; the teacher's
    options drop out when there is no teacher."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, CfgNode):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = list(value) if isinstance(value, (list, tuple)) else value

    for name in TRAINING_NODES:
        walk(cfg[name], f"{name}.")
    if not flat.get("MODEL.TEACHER"):
        flat = {k: v for k, v in flat.items() if not k.startswith("MODEL.TEACHER")}
    flat.pop("MODEL.DEVICE_ID", None)  # where it ran, not what it learned
    return flat


def training_mismatches(stored: Any, cfg: Any) -> list[str]:
    """Every training setting where a finished stage's config `stored` differs from `cfg`; a key the stored
    config predates counts as its default."""
    old, new, default = training_settings(stored), training_settings(cfg), training_settings(get_cfg())
    return [f"{k}: {old.get(k, default.get(k))!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k, default.get(k)) != new.get(k)]


def train_stage(cfg: Any, split: ReIDDataset, progress: bool) -> dict[str, Any]:
    """Train on `split` (validated on its held-out identities every SOLVER.EVAL_PERIOD epochs) unless a previous
    run of this stage finished in the same folder; returns the training summary (also TRAIN_SUMMARY)."""
    out = Path(cfg.OUTPUT_DIR)
    summary_path = out / TRAIN_SUMMARY
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        mismatches = training_mismatches(CfgNode.load_cfg(summary.get("config", "")), cfg)
        if not mismatches and Path(summary["weights"]).is_file():
            logger.info("training stage already done: %s", summary_path)
            return summary
        problem = (f"was trained with other settings ({'; '.join(mismatches)})" if mismatches
                   else f"lost its weights ({summary['weights']})")
        raise ValueError(f"{summary_path} {problem}: use another --output (or delete that folder)")
    t0 = time.perf_counter()
    result = train(cfg, split, progress=progress, resume=True)
    train_seconds = time.perf_counter() - t0
    best = out / f"{cfg.MODEL.NAME}_best.pth"
    summary = {
        "train_seconds": round(train_seconds, 1), "epochs": int(cfg.SOLVER.MAX_EPOCHS),
        "history": result.history, "validation": result.evals, "best_validation": result.best,
        "weights": str(best if best.is_file() else result.final_checkpoint),
        "num_train_ids": split.num_train_pids, "num_train_images": len(split.train),
        "num_validation_ids": split.num_query_pids, "config": cfg.dump(),
    }
    summary_path.write_text(json.dumps(summary, indent=2, default=float))
    return summary


#: What `merge_diagnostics` compares at the first budget: ToMe, STM-ReID, and STM-ReID without the CC-Function.
DIAGNOSED: list[tuple[str, str, dict[str, Any]]] = [
    ("tome", "tome", {}), ("stm", "stm", {}), ("stm, CCF-Match off", "stm", {"CCF": False})]


def merge_diagnostics(cfg: Any, model: torch.nn.Module, test: ReIDDataset, ratio: float, base: float,
                      images: int = 256, batch_size: int = 64) -> list[dict[str, Any]]:
    """What each of DIAGNOSED merges, per block, at `ratio` of the unmerged GFLOPs (reid_lite.merging.diagnostics),
    on `images` test crops spread evenly over query and gallery, and how close its features stay to the unmerged
    model's (`feature_cosine`: mean and 5th percentile over the crops)."""
    records = [*test.query, *test.gallery]
    step = max(1, len(records) // images)
    chosen = records[::step][:images]
    transform = build_transforms(cfg, is_train=False)
    batches = []
    for i in range(0, len(chosen), batch_size):
        part = chosen[i:i + batch_size]
        batches.append((torch.stack([transform(read_image(r[0])) for r in part]),
                        torch.tensor([int(r[2]) for r in part])))
    with torch.no_grad():
        plain = torch.nn.functional.normalize(torch.cat([model(x, cam_label=c) for x, c in batches]), dim=-1)
    out = []
    for label, method, options in DIAGNOSED:
        mcfg = method_cfg(cfg, ratio, base, **({"STM": options} if options else {})).clone()
        mcfg.defrost()
        mcfg.MERGE.METHOD = method
        try:
            merged = merge_with_budget(copy.deepcopy(model), mcfg.MERGE)
        except BudgetError as err:
            out.append({"variant": label, "error": str(err)})
            continue
        blocks = record_merges(merged, batches)
        with torch.no_grad():
            feats = torch.nn.functional.normalize(torch.cat([merged(x, cam_label=c) for x, c in batches]), dim=-1)
        cosine = (feats * plain).sum(-1)
        out.append({"variant": label, "method": method, "options": options, "images": len(chosen),
                    "setting": budget_label(merged.merge_budget.to_dict()),
                    "feature_cosine": {"mean": cosine.mean().item(), "p05": cosine.quantile(0.05).item()},
                    "blocks": {str(b): v for b, v in blocks.items()}})
    return out


def load_trained(cfg: Any, trained: dict[str, Any], split: ReIDDataset) -> torch.nn.Module:
    """The training stage's kept weights (the best validation epoch) in an unmerged model, in eval mode."""
    plain = cfg.clone()
    plain.defrost()
    plain.MERGE.METHOD = "none"
    plain.freeze()
    camera_num, view_num = sie_counts(split)
    return build_model_for_checkpoint(plain, trained["weights"], split.num_train_pids, camera_num, view_num).eval()


def train_dtem(cfg: Any, trained: dict[str, Any], split: ReIDDataset, target_gflops: float, preset: str,
               progress: bool) -> dict[str, Any]:
    """DTEM's modular training on the training identities: the trained backbone frozen, its embedding learned
    at the r that meets `target_gflops`. Reused when done before; returns the embedding file and its time."""
    out = Path(cfg.OUTPUT_DIR).parent / "dtem"
    summary_path = out / "dtem_summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if Path(summary["weights"]).is_file() and summary["backbone"] == trained["weights"]:
            return summary
    dcfg = cfg.clone()
    dcfg.defrost()
    dcfg.MERGE.METHOD = "dtem"
    dcfg.MERGE.TARGET_GFLOPS = target_gflops
    dcfg.MERGE.DTEM.TRAIN_EMBEDDING_ONLY = True
    dcfg.MERGE.DTEM.FRESH = True
    dcfg.MODEL.PRETRAIN_CHOICE = "self"
    dcfg.MODEL.PRETRAIN_PATH = trained["weights"]
    dcfg.MODEL.TEACHER = ""
    dcfg.SOLVER.MAX_EPOCHS = DTEM_EPOCHS[preset]
    dcfg.SOLVER.BASE_LR = DTEM_LR
    dcfg.SOLVER.WARMUP_EPOCHS = 0
    dcfg.SOLVER.EVAL_PERIOD = 0
    dcfg.OUTPUT_DIR = str(out)
    dcfg.freeze()
    t0 = time.perf_counter()
    train(dcfg, split, progress=progress, evaluate=False, tensorboard=False)
    summary = {"weights": str(out / EMBEDDING_FILE), "train_seconds": round(time.perf_counter() - t0, 1),
               "epochs": DTEM_EPOCHS[preset], "lr": DTEM_LR, "target_gflops": target_gflops,
               "backbone": trained["weights"]}
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary


def run_method(cfg: Any, model: torch.nn.Module, dataset: ReIDDataset, method: str, progress: bool
               ) -> tuple[dict[str, Any], dict[str, Any] | None, tuple[Any, Any] | None]:
    """Evaluate one method as `cfg` sets it (budget included): (its result row, its per-query figures, its query
    and gallery `Features`), or ({'method', 'error'}, None, None) when its budget cannot be met."""
    try:
        res = evaluate(cfg, model, dataset, methods=[method], progress=progress, keep_features=True)
    except BudgetError as err:
        logger.warning("%s: %s", method, err)
        return {"method": method, "error": str(err)}, None, None
    row = res["rows"][0]
    query, gallery = res["features"][method]
    per_q = per_query_metrics(query.feats, gallery.feats, query.pids, gallery.pids, query.camids, gallery.camids)
    return row, per_q, (query, gallery)


def result_row(row: dict[str, Any], per_q: dict[str, Any], draws: Any, ratio: float | None, base: float,
               tol: float) -> dict[str, Any]:
    """A results.json row: the evaluator's figures, the budget it met and the bootstrap intervals."""
    target = None if ratio is None else ratio * base
    cost = row.get("effective_gflops") or row["gflops"]
    return {
        "method": row["method"], **({"layers": row["layers"]} if "layers" in row else {}),
        "budget_ratio": ratio, "target_gflops": target, "gflops": row["gflops"],
        "effective_gflops": row.get("effective_gflops"),
        "matched": target is None or abs(cost - target) <= tol * target + 1e-9,
        "setting": budget_label(row.get("budget")) if row.get("budget") else None,
        "rank5": row["rank5"], **metric_intervals(per_q, draws),
        "images_per_second": row["model_images_per_second"], "pipeline_images_per_second": row["images_per_second"],
    }


def calibrate(cfg: Any, model: torch.nn.Module, split: ReIDDataset, test_features: tuple[Any, Any], method: str,
              progress: bool) -> dict[str, Any]:
    """The gallery's "likely match" threshold chosen on the validation identities (F1 rule) and its precision
    and recall on the test split (the method's test `Features`, already extracted), with the test split's
    precision-recall curve (scikit-learn)."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    def top1(q: Any, g: Any) -> tuple[Any, Any]:
        scores, correct, _ = top1_scores(q.feats.numpy(), g.feats.numpy(), q.pids, g.pids, q.camids, g.camids)
        return scores, correct

    val = evaluate(cfg, model, split, methods=[method], progress=progress, keep_features=True)
    val_scores, val_correct = top1(*val["features"][method])
    try:
        choice = choose_threshold(val_scores, val_correct)
    except ValueError as err:  # no validation query's top hit is right: nothing to calibrate for
        return {"method": method, "error": str(err)}
    scores, correct = top1(*test_features)
    flagged = scores >= choice.threshold
    tp = int((flagged & correct).sum())
    if not correct.any():
        return {"method": method, "threshold": choice.threshold, "validation": choice.to_dict(),
                "error": "no test query's top hit is right: no precision-recall curve"}
    precision, recall, _ = precision_recall_curve(correct, scores)
    return {
        "method": method, "threshold": choice.threshold, "validation": choice.to_dict(),
        "test": {"precision": tp / int(flagged.sum()) if flagged.any() else None,
                 "recall": tp / max(int(correct.sum()), 1), "flagged": int(flagged.sum()),
                 "true_top1": int(correct.sum()), "queries": len(scores)},
        "average_precision": float(average_precision_score(correct, scores)),
        "precision_curve": [round(float(v), 4) for v in precision],
        "recall_curve": [round(float(v), 4) for v in recall],
    }


def markdown_summary(rows: list[dict[str, Any]], ablation: list[dict[str, Any]]) -> str:
    """The rows and the ablation as Markdown tables (what the reference README quotes)."""
    def pct(v: float) -> str:
        return f"{100 * v:.1f}"

    def ci(v: list[float]) -> str:
        return f"[{pct(v[0])}, {pct(v[1])}]"

    def diff(d: dict[str, Any] | None, key: str) -> str:
        if not d:
            return "-"
        x = d[key]
        return f"{100 * x['diff']:+.1f} {ci(x['ci95'])}{' *' if x['significant'] else ''}"

    head = ["method", "budget", "GFLOPs", "img/s", "Rank-1 [95% CI]", "mAP [95% CI]", "mINP", "setting",
            "ΔR1 vs ToMe", "ΔmAP vs ToMe", "ΔmAP vs none"]
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["method"], f"{r['budget_ratio']:.0%}", *["-"] * 5, r["error"][:60], *["-"] * 3])
            continue
        cost = r.get("effective_gflops") or r["gflops"]
        body.append([r["method"], "-" if r["budget_ratio"] is None else f"{r['budget_ratio']:.0%}", f"{cost:.3f}",
                     f"{r['images_per_second']:.1f}", f"{pct(r['rank1'])} {ci(r['rank1_ci95'])}",
                     f"{pct(r['mAP'])} {ci(r['mAP_ci95'])}", pct(r["mINP"]),
                     (r.get("setting") or "-") + (" (every block)" if "layers" in r else ""),
                     diff(r.get("vs_tome"), "rank1"), diff(r.get("vs_tome"), "mAP"), diff(r.get("vs_none"), "mAP")])
    text = markdown_table(head, body, left=(0, 7)) + "\n"
    if ablation:
        head = ["STM-ReID variant (75% budget)", "Rank-1 [95% CI]", "mAP [95% CI]", "ΔR1 vs default",
                "ΔmAP vs default"]
        body = [[a["variant"], f"{pct(a['rank1'])} {ci(a['rank1_ci95'])}", f"{pct(a['mAP'])} {ci(a['mAP_ci95'])}",
                 diff(a.get("vs_default"), "rank1"), diff(a.get("vs_default"), "mAP")] for a in ablation]
        text += "\n" + markdown_table(head, body, left=(0,)) + "\n"
    return text + "\n(* the 95% interval of the paired difference excludes 0)\n"


def without_local_paths(text: str, places: dict[str, str]) -> str:
    """`text` (JSON) with this machine's folders replaced by placeholders, so results can be committed and shared.

    Each key of `places` (a path as given and resolved) becomes its value; empty keys are ignored.
    """
    for path, placeholder in places.items():
        if not path:
            continue
        for form in {path.rstrip("/"), str(Path(path).resolve())}:
            text = text.replace(json.dumps(form)[1:-1], placeholder)
    return text


def evaluate_stage(args: argparse.Namespace, cfg: Any, dataset: ReIDDataset, split: ReIDDataset,
                   trained: dict[str, Any], methods: list[str], ratios: list[float], out: Path) -> int:
    """Every method at every budget on the test split, with bootstrap intervals and paired differences, then
    STM-ReID's decisions at the first budget and the calibrated threshold; writes results.json, the plots and
    summary.md to `out`."""
    progress = args.preset != "tiny"
    commit = git_commit()  # the code evaluated: read now, not after minutes in which it may change
    model = load_trained(cfg, trained, split)
    base = float(model_gflops(model))
    tol = float(cfg.MERGE.BUDGET_TOLERANCE)
    test = ReIDDataset(split.train, dataset.query, dataset.gallery)
    test.name = dataset.name
    t0 = time.perf_counter()
    dtem = None
    if "dtem" in methods:
        dtem = train_dtem(cfg, trained, split, ratios[0] * base, args.preset, progress)
    rows: list[dict[str, Any]] = []
    per_query: dict[tuple[str, float | None], Any] = {}
    test_features: dict[tuple[str, float | None], tuple[Any, Any]] = {}  # reused by the calibration
    none_row, per_query[("none", None)], test_features[("none", None)] = run_method(
        method_cfg(cfg, 1.0, base), model, test, "none", progress)
    draws = bootstrap_draws(len(per_query[("none", None)]["rank1"]), args.bootstrap, seed=int(cfg.SOLVER.SEED))
    rows.append(result_row(none_row, per_query[("none", None)], draws, None, base, tol))
    for ratio in ratios:
        for name in [m for m in methods if m != "none"]:
            extra = {"DTEM": {"WEIGHTS": dtem["weights"]}} if name == "dtem" and dtem else {}
            row, per_q, feats = run_method(method_cfg(cfg, ratio, base, **extra), model, test, name, progress)
            if per_q is None and name.upper() in LAYERED_METHODS:
                # The paper's three layers cannot remove that much: its all-layers variant (DHTM's paper has one).
                every = {name.upper(): {"LAYERS": list(cfg.MERGE.LAYERS)}}
                row, per_q, feats = run_method(method_cfg(cfg, ratio, base, **every), model, test, name, progress)
                if per_q is not None:
                    row["layers"] = f"every merging block {list(cfg.MERGE.LAYERS)} (the paper's 4/7/11 cannot reach it)"
            if per_q is None:
                rows.append({**row, "budget_ratio": ratio, "target_gflops": ratio * base})
                continue
            per_query[(name, ratio)] = per_q
            if (name, ratio) == ("stm", ratios[0]):
                test_features[(name, ratio)] = feats
            rows.append(result_row(row, per_q, draws, ratio, base, tol))
        for row in rows:
            if row.get("budget_ratio") == ratio and "error" not in row:
                mine = per_query[(row["method"], ratio)]
                row["vs_none"] = paired_difference(mine, per_query[("none", None)], draws)
                if ("tome", ratio) in per_query:
                    row["vs_tome"] = paired_difference(mine, per_query[("tome", ratio)], draws)
    ablation: list[dict[str, Any]] = []
    if not args.no_ablation and ("stm", ratios[0]) in per_query:
        default = per_query[("stm", ratios[0])]
        stm_row = next(r for r in rows if r["method"] == "stm" and r["budget_ratio"] == ratios[0])
        for label, options in STM_ABLATION:
            if options:
                row, per_q, _ = run_method(method_cfg(cfg, ratios[0], base, STM=options), model, test, "stm",
                                           progress)
                if per_q is None:
                    ablation.append({"variant": label, "options": options, "error": row["error"]})
                    continue
                figures = result_row(row, per_q, draws, ratios[0], base, tol)
            else:  # the default is STM's own row at this budget
                per_q, figures = default, {k: v for k, v in stm_row.items() if not k.startswith("vs_")}
            entry = {"variant": label, "options": options, **figures,
                     "vs_default": paired_difference(per_q, default, draws)}
            if ("tome", ratios[0]) in per_query:
                entry["vs_tome"] = paired_difference(per_q, per_query[("tome", ratios[0])], draws)
            ablation.append(entry)
    diagnostics = merge_diagnostics(cfg, model, test, ratios[0], base) if "stm" in methods else []
    calibration = [calibrate(method_cfg(cfg, r or 1.0, base), model, split, test_features[(m, r)], m, progress)
                   for m, r in (("none", None), ("stm", ratios[0])) if (m, r) in test_features]
    summary = {
        "dataset": Path(args.data_root).name, "preset": args.preset, "seed": int(cfg.SOLVER.SEED),
        "commit": commit, "device": "cpu" if str(cfg.MODEL.DEVICE) == "cpu" else str(cfg.MODEL.DEVICE),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "teacher": Path(cfg.MODEL.TEACHER).name if cfg.MODEL.TEACHER else None,
        "train_seconds": trained["train_seconds"], "epochs": trained["epochs"],
        "dtem_train_seconds": dtem["train_seconds"] if dtem else None, "dtem_training": dtem,
        "eval_seconds": round(time.perf_counter() - t0, 1), "unmerged_gflops": base,
        "budget_tolerance": tol, "bootstrap_resamples": args.bootstrap,
        "num_train_ids": split.num_train_pids, "num_validation_ids": split.num_query_pids,
        "num_query": len(dataset.query), "num_gallery": len(dataset.gallery),
        "num_valid_queries": int(len(per_query[("none", None)]["rank1"])),
        "training_history": trained["history"], "validation": trained["validation"],
        "best_validation": trained["best_validation"], "weights_kept": Path(trained["weights"]).name,
        "rows": rows, "stm_ablation": ablation, "merge_diagnostics": diagnostics, "calibration": calibration,
        "config": cfg.dump(),
    }
    (out / "results.json").write_text(without_local_paths(json.dumps(summary, indent=2, default=float), {
        args.data_root: "<data-root>", str(out): "<output>",
        str(Path(cfg.MODEL.TEACHER).parent) if cfg.MODEL.TEACHER else "": "<teacher-dir>"}))
    (out / "summary.md").write_text(markdown_summary(rows, ablation))
    title = (f"{args.preset} preset: {cfg.MODEL.DEPTH}x{cfg.MODEL.EMBED_DIM} TransReID from scratch"
             f"{' + distillation' if cfg.MODEL.TEACHER else ''} on {Path(args.data_root).name}, seed {cfg.SOLVER.SEED}")
    plot(rows, out / "accuracy_vs_gflops.png", title)
    curves = {c["method"]: c for c in calibration if "error" not in c}
    if curves:
        plot_precision_recall(curves, out / "precision_recall.png", title)
    print(markdown_summary(rows, ablation))
    print(f"wrote {out / 'results.json'}, {out / 'summary.md'} and the plots (training "
          f"{trained['train_seconds'] / 60:.1f} min, evaluation {summary['eval_seconds'] / 60:.1f} min)")
    if not all(math.isfinite(r["mAP"]) for r in rows if "error" not in r):
        return cli_error("a method produced a non-finite mAP")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the experiment; returns the process exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data = Path(args.data_root)
    missing = [d for d in ("bounding_box_train", "query", "bounding_box_test") if not (data / d).is_dir()]
    if missing:
        return cli_error(f"no Market-1501-layout dataset at {data} (missing {', '.join(missing)}); pass --data-root")
    try:
        ratios = [float(x) for x in (args.ratios or ("0.76" if args.preset == "tiny" else "0.75,0.6")).split(",")]
    except ValueError:
        return cli_error(f"--ratios must be comma-separated numbers, got {args.ratios!r}")
    if not all(0 < r <= 1 for r in ratios):
        return cli_error(f"--ratios must lie in (0, 1], got {ratios}")
    try:
        cfg = build_cfg(args)
        validate(cfg, training=True)
        dataset = limit_identities(build_dataset_from_cfg(cfg), args.max_train_ids if args.max_train_ids >= 0
                                   else (150 if args.preset == "tiny" else 0))
        split = validation_split(dataset, VALIDATION_IDS[args.preset], seed=int(cfg.SOLVER.SEED))
        methods = parse_methods([m for m in args.methods.split(",") if m.strip()])
    except USER_ERRORS as err:
        return cli_error(err)
    set_threads(args.threads)
    out = Path(cfg.OUTPUT_DIR).parent
    out.mkdir(parents=True, exist_ok=True)
    if args.stage == "evaluate" and not (Path(cfg.OUTPUT_DIR) / TRAIN_SUMMARY).is_file():
        return cli_error(f"--stage evaluate: no {Path(cfg.OUTPUT_DIR) / TRAIN_SUMMARY}; run the training stage first")
    try:
        trained = train_stage(cfg, split, progress=args.preset != "tiny")
    except USER_ERRORS as err:
        return cli_error(err)
    if args.stage == "train":
        print(f"training done: {trained['weights']} ({trained['train_seconds'] / 60:.1f} min)")
        return 0
    return evaluate_stage(args, cfg, dataset, split, trained, methods, ratios, out)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
