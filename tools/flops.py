#!/usr/bin/env python
"""Print the GFLOPs of a configured TransReID (fvcore's count, and the analytic count beside it).

    python tools/flops.py --config configs/msmt17_stm.yml [KEY VALUE ...]
    python tools/flops.py --config configs/msmt17_base.yml --methods none,tome,stm   # any registered methods
    python tools/flops.py --table            # the paper's GFLOPs table for our model, fvcore vs analytic

The counts are capacity-based (every slot a block keeps, what the hardware runs). For a method that may
leave slots empty, the mean effective GFLOPs per image (valid tokens only) come from one forward pass
over a seeded random batch (--images) and are printed beside them.
"""

from __future__ import annotations

import json
import sys
import warnings

import torch

from reid_lite import build_model, load_cfg
from reid_lite.cli import add_config_arg, add_opts_arg, tool_parser
from reid_lite.compress.flops import effective_gflops, fvcore_gflops, transreid_gflops
from reid_lite.merging import parse_methods

# (label, MERGE overrides, the paper's GFLOPs: STM-ReID Tables 1-2)
PAPER_TABLE = [
    ("TransReID, no merging", ["MERGE.METHOD", "none"], 20.41),
    ("EViT (keep 0.9, blocks 4/7/10)", ["MERGE.METHOD", "evit"], 17.50),
    ("ToMe r=8 (blocks 1-10)", ["MERGE.METHOD", "tome", "MERGE.R", "8"], 15.53),
    ("STM-ReID r=8 (blocks 1-10)", ["MERGE.METHOD", "stm", "MERGE.R", "8"], 15.53),
    ("ToMe r=6 (blocks 1-10)", ["MERGE.METHOD", "tome", "MERGE.R", "6"], 16.69),
    ("STM-ReID r=17 (blocks 1-10)", ["MERGE.METHOD", "stm", "MERGE.R", "17"], 10.31),
]


def gflops_of(config: str | None, opts: list[str], images: int = 0) -> tuple[float, float, float]:
    """(fvcore, analytic, effective) GFLOPs of the model that `config` + `opts` describe.

    effective: mean per image over `images` seeded random inputs when a reducer may leave slots empty,
    else the analytic count.
    """
    cfg = load_cfg(config, opts)
    # Camera/class counts do not change the eval-mode FLOPs; any SIE table size will do.
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=1, camera_num=2, view_num=2).eval()
    analytic = transreid_gflops(model)
    effective = analytic
    if images and any(r.may_empty for r in model.reducers.values()):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(images, 3, *cfg.INPUT.SIZE_TEST, generator=g)
        ids = torch.zeros(images, dtype=torch.long)
        effective = effective_gflops(model, x, cam_label=ids, view_label=ids)[0]
    return fvcore_gflops(model), analytic, effective


def main(argv: list[str] | None = None) -> int:
    parser = tool_parser(__doc__)
    add_config_arg(parser, default="configs/msmt17_base.yml", help="config file (looked up in configs/)")
    parser.add_argument("--table", action="store_true", help="print the paper's GFLOPs table for our model")
    parser.add_argument("--methods", default="", help="comma-separated registered methods (default: the config's)")
    parser.add_argument("--images", type=int, default=8, help="random images for the effective count")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    add_opts_arg(parser, help="KEY VALUE config overrides", remainder=True)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", module="torch.jit")  # fvcore traces with the deprecated jit
    if not args.table:
        try:
            load_cfg(args.config, args.opts)  # loads MERGE.PLUGINS' methods before the names are checked
            methods = parse_methods(args.methods) if args.methods else [None]
        except (FileNotFoundError, KeyError, ValueError, AssertionError) as err:
            parser.error(str(err))
        rows = []
        for method in methods:
            opts = [*args.opts, "MERGE.METHOD", method] if method else args.opts
            fv, an, eff = gflops_of(args.config, opts, args.images)
            label = f"{method}: " if method else ""
            print(f"{label}GFLOPs: {fv:.2f}")
            print(f"{label}analytic GFLOPs: {an:.4f} (fvcore {fv:.4f}); effective {eff:.4f} per image")
            rows.append({"method": method, "fvcore": fv, "analytic": an, "effective": eff})
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"config": args.config, "opts": args.opts, "rows": rows}, f, indent=2)
        return 0
    rows = []
    print(f"{'method':34s} {'fvcore':>8s} {'analytic':>9s} {'paper':>6s} {'vs paper':>9s}")
    for label, merge_opts, paper in PAPER_TABLE:
        fv, an, _ = gflops_of(args.config, ["MERGE.LAYERS", "[1,2,3,4,5,6,7,8,9,10]", *merge_opts, *args.opts])
        rows.append({"method": label, "fvcore": fv, "analytic": an, "paper": paper})
        print(f"{label:34s} {fv:8.2f} {an:9.4f} {paper:6.2f} {100 * (fv - paper) / paper:+8.2f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
