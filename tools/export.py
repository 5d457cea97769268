#!/usr/bin/env python
"""Export the eval model with its token merging to ONNX, verified against PyTorch.

    python tools/export.py --config configs/demo_synthetic.yml --out output/demo_stm.onnx [--overwrite]
    python tools/export.py --config configs/msmt17_stm.yml TEST.WEIGHT transreid_msmt17.pth --out stm.onnx
    python tools/export.py --config demo_synthetic.yml MERGE.METHOD tome --out tome.onnx --backends onnxruntime

The graph takes `images` (B, 3, H, W) float32 preprocessed as the file's metadata says, and `camera`
(B,) int64 with a camera SIE; the batch is dynamic. After export, the same synthetic pedestrians
(several cameras in one batch) run through PyTorch and each runtime in --backends, at the whole
batch and at batch 1: the per-image cosine, max relative difference and top-10 agreement are printed,
and the export fails (exit 1, file moved to <out>.failed.onnx) when parity is not met. With
MERGE.TARGET_LATENCY_MS the schedule is chosen first by timing exported candidates on the first of
--backends at batch TEST.IMS_PER_BATCH (a handful of exports: minutes for ViT-B). A configuration
that cannot be exported is refused with the reason (exit 2). Use the file with
`MODEL.BACKEND onnxruntime MODEL.ONNX_PATH <out>` in tools/test.py, reid-gallery or FeatureExtractor.
Exit codes: 0 exported and verified, 1 export or parity failed, 2 bad arguments/config or refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from reid_lite.build import build_model, build_model_for_checkpoint
from reid_lite.cli import USER_ERRORS, add_config_arg, add_opts_arg, cli_error, tool_parser
from reid_lite.config import load_cfg
from reid_lite.deploy import ExportError, ExportRefused, export_onnx, parity_table
from reid_lite.deploy.parity import MIN_COSINE
from reid_lite.deploy.runtime import RUNTIMES
from reid_lite.deploy.runtime_latency import choose_r_on_runtime
from reid_lite.utils.files import check_output_file

logger = logging.getLogger("reid_lite.export")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; trailing `KEY VALUE` pairs override the config."""
    p = tool_parser(__doc__, summary=True, epilog=True)
    add_config_arg(p)
    p.add_argument("--out", required=True, help="ONNX file to write (an existing file only with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--backends", default="onnxruntime,openvino",
                   help=f"runtimes whose parity with PyTorch is verified, comma-separated from {', '.join(RUNTIMES)}")
    p.add_argument("--cameras", type=int, default=0,
                   help="cameras of the SIE table (default: the checkpoint's table; needed without TEST.WEIGHT)")
    p.add_argument("--parity-images", type=int, default=12, help="synthetic pedestrians used for the parity check")
    p.add_argument("--min-cosine", type=float, default=MIN_COSINE,
                   help="per-image cosine with PyTorch required, merging-decision flips included")
    add_opts_arg(p)
    return p.parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Export, verify and report; returns the exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = load_cfg(args.config or None, args.opts)
        # Before any work: an export takes minutes, and an existing file may be the one a gallery runs.
        check_output_file(args.out, "--out", overwrite=args.overwrite)
    except USER_ERRORS as err:
        return cli_error(err)
    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    unknown = [b for b in backends if b not in RUNTIMES]
    if unknown or not backends:
        return cli_error(f"--backends {unknown or args.backends!r}: choose from {', '.join(RUNTIMES)}")
    if args.parity_images < 2:
        return cli_error("--parity-images must be at least 2 (rankings need a gallery)")
    if cfg.MODEL.SIE_CAMERA and not args.cameras and not cfg.TEST.WEIGHT:
        return cli_error("MODEL.SIE_CAMERA needs the camera count: pass --cameras N or TEST.WEIGHT (its SIE table)")
    try:
        # A latency budget is measured on the runtime below, not on PyTorch as build_model would.
        build_cfg = cfg.clone()
        build_cfg.merge_from_list(["MERGE.TARGET_LATENCY_MS", 0.0])
        if cfg.TEST.WEIGHT:
            # The SIE camera count is the checkpoint's table (--cameras, if given, must fit in it).
            model = build_model_for_checkpoint(build_cfg, cfg.TEST.WEIGHT, 1, args.cameras, 0)
        else:
            logger.warning("TEST.WEIGHT is not set: exporting a RANDOMLY INITIALISED model")
            model = build_model(build_cfg, 1, args.cameras, 0)
        camera_num = int(model.base.cam_num)
        if cfg.MERGE.TARGET_LATENCY_MS > 0:
            with tempfile.TemporaryDirectory() as work:
                choice = choose_r_on_runtime(model, cfg, backends[0], work)
            print(f"{choice.describe()} on {backends[0]} at batch {cfg.TEST.IMS_PER_BATCH}")
    except USER_ERRORS as err:
        return cli_error(err)
    try:
        with torch.random.fork_rng(devices=[]):
            report = export_onnx(model.eval(), cfg, args.out, camera_num, backends=backends,
                                 parity_count=args.parity_images, min_cosine=args.min_cosine)
    except ExportRefused as err:
        return cli_error(err)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(report.summary())
    print(parity_table(report.parity))
    meta_path = Path(args.out).with_suffix(".json")
    meta_path.write_text(json.dumps(report.metadata, indent=2))
    print(f"metadata (also inside the ONNX file): {meta_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
