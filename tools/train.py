"""Train TransReID with the official recipe (ID + triplet loss, JPM, SIE, cosine schedule).

    python tools/train.py --config configs/demo_synthetic.yml
    python tools/train.py --config market1501_base.yml MODEL.PRETRAIN_PATH jx_vit_base_p16_224-80ecf9dd.pth
    python tools/train.py --config demo_synthetic.yml --resume             # continue an interrupted run
    torchrun --nproc_per_node 4 tools/train.py --config msmt17_base.yml   # DDP: nccl on GPUs, gloo on CPUs

Written to OUTPUT_DIR: checkpoints (`<MODEL.NAME>_<epoch>.pth`, plain state dicts in the official key
layout), `<MODEL.NAME>_best.pth` (best mAP of the evaluations every SOLVER.EVAL_PERIOD epochs),
`last_checkpoint.pth` (the resumable state), TensorBoard logs in `tensorboard/`, the config used and
`train_log.txt`. Token merging (MERGE.*) is applied at test time only unless SOLVER.TRAIN_WITH_MERGING.
The synthetic dataset (DATASETS.NAMES 'synthetic') is generated when missing (by rank 0 under
torchrun) under the default DATASETS.ROOT_DIR (elsewhere with DATASETS.GENERATE True); any other
dataset must be in place.
Exit codes: 0 success, 2 bad arguments/config, missing dataset or unreadable checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from reid_lite.cli import (
    USER_ERRORS,
    add_config_arg,
    add_malloc_arg,
    add_opts_arg,
    add_threads_arg,
    cli_error,
    set_malloc,
    set_threads,
    tool_parser,
)
from reid_lite.config import load_cfg, validate
from reid_lite.engine.distributed import init_distributed, shutdown_distributed
from reid_lite.engine.trainer import prepare_dataset, save_state_dict, train
from reid_lite.models import CheckpointError
from reid_lite.utils.device import resolve_device
from reid_lite.utils.files import check_output_dir

logger = logging.getLogger("reid_lite.train")

FROM_SCRATCH_WARNING = """
################################################################################
##  WARNING: MODEL.PRETRAIN_CHOICE is 'imagenet' but MODEL.PRETRAIN_PATH is    ##
##  empty: the backbone is TRAINED FROM SCRATCH (random initialisation).      ##
##  TransReID's accuracy needs ImageNet weights: pass MODEL.PRETRAIN_PATH      ##
##  <timm ViT file>, or set MODEL.PRETRAIN_CHOICE none to silence this.       ##
################################################################################
"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; trailing `KEY VALUE` pairs override the config."""
    p = tool_parser(__doc__, summary=True)
    add_config_arg(p, aliases=True)
    p.add_argument("--save", default="", help="also copy the final weights to this path (e.g. weights/x.pth)")
    p.add_argument("--half", action="store_true", help="store the --save copy in fp16 (half the size)")
    add_threads_arg(p, help="CPU threads for torch (default: torch's choice); 1 is much faster on a busy shared CPU")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUTPUT_DIR/last_checkpoint.pth (same step, sampler position and RNG state)")
    p.add_argument("--resume-force", action="store_true",
                   help="with --resume: continue even though SOLVER.IMS_PER_BATCH, BASE_LR, OPTIMIZER_NAME or the "
                        "sampler differ from the saved run's (logged); another architecture is always refused")
    p.add_argument("--stop-after-steps", type=int, default=0, metavar="N",
                   help="stop after N optimiser steps of this run, leaving a resumable state (preemptible jobs)")
    p.add_argument("--state-every-steps", type=int, default=0, metavar="N",
                   help="also write the resumable state every N steps (it is always written after each epoch)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluations of SOLVER.EVAL_PERIOD")
    p.add_argument("--save-features", action="store_true",
                   help="write each evaluation's query/gallery features to OUTPUT_DIR/features_<epoch>.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard logs")
    add_malloc_arg(p)
    add_opts_arg(p)
    # Intermixed: options may follow the KEY VALUE pairs, as users naturally append them.
    return p.parse_intermixed_args(argv)


def _setup_logging(output_dir: str) -> None:
    """INFO to stdout and to OUTPUT_DIR/train_log.txt (the official log file name); under torchrun only
    rank 0 logs INFO (the others log warnings to stderr)."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    if int(os.environ.get("RANK", 0)) != 0:
        root.setLevel(logging.WARNING)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(fmt)
        root.addHandler(handler)
        return
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    root.setLevel(logging.INFO)
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(Path(output_dir) / "train_log.txt")):
        handler.setFormatter(fmt)
        root.addHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Train; returns the process exit code."""
    args = parse_args(argv)
    try:
        cfg = load_cfg(args.config or None, args.opts)
        check_output_dir(cfg.OUTPUT_DIR, "OUTPUT_DIR")  # the log file goes there first: refuse before any work
        if args.resume_force and not args.resume:
            raise ValueError("--resume-force applies to --resume")
    except USER_ERRORS as err:
        return cli_error(err)
    try:
        validate(cfg, training=True)  # before the dataset is prepared: a refused key must not wait for that
    except ValueError as err:
        return cli_error(err)
    for flag in ("stop_after_steps", "state_every_steps"):
        if getattr(args, flag) < 0:
            return cli_error(f"--{flag.replace('_', '-')} must be >= 0")
    if args.half and not args.save:
        return cli_error("--half applies to the --save copy; give --save PATH")
    set_threads(args.threads)
    set_malloc(args.system_malloc)
    _setup_logging(cfg.OUTPUT_DIR)
    if cfg.MODEL.PRETRAIN_CHOICE.lower() == "imagenet" and not cfg.MODEL.PRETRAIN_PATH:
        print(FROM_SCRATCH_WARNING, file=sys.stderr)
        logger.warning("training from scratch: no ImageNet weights (MODEL.PRETRAIN_PATH is empty)")
    # Under torchrun, rank 0 prepares the dataset first (the synthetic one generates itself) and the others
    # read it once it is complete.
    try:
        ctx = init_distributed(resolve_device(cfg.MODEL.DEVICE, cfg.MODEL.DEVICE_ID))
    except ValueError as err:  # an unknown MODEL.DEVICE or a GPU index that is not there
        return cli_error(err)
    if not ctx.is_main:
        ctx.barrier()
    try:
        dataset = prepare_dataset(cfg)
    except USER_ERRORS as err:
        return cli_error(err)
    if ctx.is_main:
        ctx.barrier()
    try:
        result = train(cfg, dataset, resume=args.resume, resume_force=args.resume_force,
                       stop_after_steps=args.stop_after_steps,
                       state_every_steps=args.state_every_steps, progress=not args.no_progress,
                       evaluate=not args.no_eval, save_features=args.save_features,
                       tensorboard=not args.no_tensorboard)
    except (CheckpointError, ValueError) as err:  # bad PRETRAIN_PATH, optimiser name, sampler, ...
        return cli_error(err)
    finally:
        shutdown_distributed()
    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    if result.best is not None:
        print(f"best: epoch {int(result.best['epoch'])}, mAP {result.best['mAP']:.1%}, "
              f"Rank-1 {result.best['rank1']:.1%}")
    if result.stopped:
        print(f"stopped after step {result.global_step}; continue with --resume")
        return 0
    final = result.final_checkpoint
    print(f"final weights: {final}")
    if args.save:
        dest = Path(args.save)
        if args.half:
            save_state_dict(torch.load(final, map_location="cpu", weights_only=True), dest, half=True)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(final, dest)
        print(f"copied to {dest} ({dest.stat().st_size / 2**20:.1f} MiB{', fp16' if args.half else ''})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
