#!/usr/bin/env python
"""Draw the merged-token source maps over a crop (the paper's Fig. 8) as a PNG.

    python tools/visualize_merge.py --config configs/demo_synthetic.yml --image crop.jpg \
        --blocks 2,5,10 --out output/merge.png [KEY VALUE ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from reid_lite import build_model, load_cfg
from reid_lite.data import build_transforms
from reid_lite.merging.visualize import render_groups, token_groups
from reid_lite.models import load_transreid_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--image", required=True, help="a person crop")
    parser.add_argument("--blocks", default="2,5,10", help="1-based blocks to show, comma separated")
    parser.add_argument("--camera", type=int, default=0, help="0-based camera id for SIE")
    parser.add_argument("--out", default="output/merge.png")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    cfg = load_cfg(args.config, args.opts)
    if cfg.MERGE.METHOD == "none":
        parser.error("MERGE.METHOD is 'none': nothing is merged (pass MERGE.METHOD stm, say)")
    model = build_model(cfg, num_classes=1, camera_num=max(args.camera + 1, 2), view_num=0)
    if cfg.TEST.WEIGHT:
        load_transreid_checkpoint(model, cfg.TEST.WEIGHT, trust=cfg.MODEL.TRUST_CHECKPOINT, ignore_classifier=True)
    else:
        print("WARNING: no TEST.WEIGHT: the maps show a randomly initialised model", file=sys.stderr)
    pil = Image.open(args.image).convert("RGB")
    x = build_transforms(cfg, is_train=False)(pil)
    shown = np.asarray(pil.resize(tuple(cfg.INPUT.SIZE_TEST[::-1]), Image.BICUBIC))
    pe = model.base.patch_embed
    panels = [shown]
    for block in (int(b) for b in args.blocks.split(",")):
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
