"""Train TransReID with the official recipe (ID + triplet loss, JPM, SIE, cosine schedule).

    python tools/train.py --config configs/demo_synthetic.yml
    python tools/train.py --config market1501_base.yml MODEL.PRETRAIN_PATH jx_vit_base_p16_224-80ecf9dd.pth
    python tools/train.py --config demo_synthetic.yml --save weights/demo_synthetic.pth --half SOLVER.MAX_EPOCHS 40

Checkpoints (`<MODEL.NAME>_<epoch>.pth`, plain state dicts in the official key layout), the config used
and `train_log.txt` go to OUTPUT_DIR. Token merging (MERGE.*) is applied at test time only; training
always runs the unmerged model. The synthetic dataset (DATASETS.NAMES 'synthetic')
is generated when missing under the default DATASETS.ROOT_DIR (elsewhere with DATASETS.GENERATE True);
any other dataset must be in place.
Exit codes: 0 success, 2 bad arguments/config, missing dataset or unreadable checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from reid_lite.config import load_cfg
from reid_lite.engine.trainer import prepare_dataset, save_state_dict, train
from reid_lite.models import CheckpointError
from reid_lite.utils.cli import USER_ERRORS, cli_error

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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "--config_file", dest="config", default="",
                   help="YAML config (a bare name is looked up in configs/)")
    p.add_argument("--save", default="", help="also copy the final weights to this path (e.g. weights/x.pth)")
    p.add_argument("--half", action="store_true", help="store the --save copy in fp16 (half the size)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (default: torch's choice); 1 is much faster on a busy shared CPU")
    p.add_argument("opts", nargs="*", help="config overrides as KEY VALUE pairs")
    # Intermixed: options may follow the KEY VALUE pairs, as users naturally append them.
    return p.parse_intermixed_args(argv)


def _setup_logging(output_dir: str) -> None:
    """INFO to stdout and to OUTPUT_DIR/train_log.txt (the official log file name)."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(Path(output_dir) / "train_log.txt")):
        handler.setFormatter(fmt)
        root.addHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Train; returns the process exit code."""
    args = parse_args(argv)
    try:
        cfg = load_cfg(args.config or None, args.opts)
    except USER_ERRORS as err:
        return cli_error(err)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    _setup_logging(cfg.OUTPUT_DIR)
    if cfg.MODEL.PRETRAIN_CHOICE.lower() == "imagenet" and not cfg.MODEL.PRETRAIN_PATH:
        print(FROM_SCRATCH_WARNING, file=sys.stderr)
        logger.warning("training from scratch: no ImageNet weights (MODEL.PRETRAIN_PATH is empty)")
    try:
        dataset = prepare_dataset(cfg)
    except USER_ERRORS as err:
        return cli_error(err)
    try:
        result = train(cfg, dataset)
    except (CheckpointError, ValueError) as err:  # bad PRETRAIN_PATH, optimiser name, sampler, ...
        return cli_error(err)
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
