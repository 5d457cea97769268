#!/usr/bin/env python
"""Draw the merged-token source maps over a crop (the paper's Fig. 8) as a PNG.

    python tools/visualize_merge.py --config configs/demo_synthetic.yml --image crop.jpg \
        --blocks 2,5,10 --out output/merge.png [KEY VALUE ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from reid_lite import build_model, load_cfg
from reid_lite.build import build_model_for_checkpoint
from reid_lite.cli import USER_ERRORS, add_config_arg, add_opts_arg, cli_error, tool_parser
from reid_lite.data import build_transforms, read_image
from reid_lite.data.loader import IMAGE_READ_ERRORS
from reid_lite.merging.visualize import render_groups, token_groups
from reid_lite.utils.files import check_output_file


def parse_blocks(text: str, depth: int) -> list[int]:
    """The 1-based block numbers of `--blocks` ("2,5,10"); ValueError naming the bad entry or the range."""
    blocks = []
    for part in text.split(","):
        try:
            block = int(part.strip())
        except ValueError:
            raise ValueError(f"--blocks {text!r}: {part.strip()!r} is not a block number (1-based, comma "
                             f"separated, e.g. 2,5,10)") from None
        if not 1 <= block <= depth:
            raise ValueError(f"--blocks {text!r}: block {block} is outside the model's 1..{depth} (MODEL.DEPTH)")
        blocks.append(block)
    return blocks


def main(argv: list[str] | None = None) -> int:
    """Draw the maps; returns the exit code (2 with one `error:` line for bad input)."""
    parser = tool_parser(__doc__)
    add_config_arg(parser, help=None, required=True)
    parser.add_argument("--image", required=True, help="a person crop")
    parser.add_argument("--blocks", default="2,5,10", help="1-based blocks to show, comma separated")
    parser.add_argument("--camera", type=int, default=0, help="0-based camera id for SIE")
    parser.add_argument("--out", default="output/merge.png")
    add_opts_arg(parser, help="KEY VALUE config overrides", remainder=True)
    args = parser.parse_args(argv)
    try:
        cfg = load_cfg(args.config, args.opts)
        if cfg.MERGE.METHOD == "none":
            raise ValueError("MERGE.METHOD is 'none': nothing is merged (pass MERGE.METHOD stm, say)")
        blocks = parse_blocks(args.blocks, int(cfg.MODEL.DEPTH))
        check_output_file(args.out, "--out")  # before the model is built and run
        if args.camera < 0:
            raise ValueError(f"--camera {args.camera}: camera ids are 0-based")
    except USER_ERRORS as err:
        return cli_error(err)
    try:
        pil = read_image(args.image)
    except IMAGE_READ_ERRORS as err:
        return cli_error(f"--image {args.image}: not a usable image ({err})")
    try:
        if cfg.TEST.WEIGHT:
            # The SIE camera count is the checkpoint's table, as in every other tool.
            model = build_model_for_checkpoint(cfg, cfg.TEST.WEIGHT, 1, 0, 0)
        else:
            print("WARNING: no TEST.WEIGHT: the maps show a randomly initialised model", file=sys.stderr)
            model = build_model(cfg, num_classes=1, camera_num=max(args.camera + 1, 2), view_num=0)
    except USER_ERRORS as err:
        return cli_error(err)
    cameras = int(model.base.cam_num)
    if cameras and args.camera >= cameras:
        return cli_error(f"--camera {args.camera} is outside the model's SIE table of {cameras} cameras "
                         f"(0..{cameras - 1})")
    x = build_transforms(cfg, is_train=False)(pil)
    shown = np.asarray(pil.resize(tuple(cfg.INPUT.SIZE_TEST[::-1]), Image.BICUBIC))
    pe = model.base.patch_embed
    panels = [shown]
    for block in blocks:
        groups = token_groups(model, x, args.camera, block)
        panels.append(render_groups(shown, groups, pe.grid_size, pe.proj.kernel_size[0], pe.proj.stride[0]))
        print(f"block {block}: {len(np.unique(groups))} tokens hold the {len(groups)} patches")
    gap = np.full((shown.shape[0], 4, 3), 255, np.uint8)
    sheet = np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
