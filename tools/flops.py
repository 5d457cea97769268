#!/usr/bin/env python
"""Print the GFLOPs of a configured TransReID (fvcore's count, and the analytic count beside it).

    python tools/flops.py --config configs/msmt17_stm.yml [KEY VALUE ...]
    python tools/flops.py --table            # the paper's GFLOPs table for our model, fvcore vs analytic
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from reid_lite import build_model, load_cfg
from reid_lite.utils.flops import fvcore_gflops, transreid_gflops

# (label, MERGE overrides, the paper's GFLOPs: STM-ReID Tables 1-2)
PAPER_TABLE = [
    ("TransReID, no merging", ["MERGE.METHOD", "none"], 20.41),
    ("EViT (keep 0.9, blocks 4/7/10)", ["MERGE.METHOD", "evit"], 17.50),
    ("ToMe r=8 (blocks 1-10)", ["MERGE.METHOD", "tome", "MERGE.R", "8"], 15.53),
    ("STM-ReID r=8 (blocks 1-10)", ["MERGE.METHOD", "stm", "MERGE.R", "8"], 15.53),
    ("ToMe r=6 (blocks 1-10)", ["MERGE.METHOD", "tome", "MERGE.R", "6"], 16.69),
    ("STM-ReID r=17 (blocks 1-10)", ["MERGE.METHOD", "stm", "MERGE.R", "17"], 10.31),
]


def gflops_of(config: str | None, opts: list[str]) -> tuple[float, float]:
    """(fvcore, analytic) GFLOPs of the model that `config` + `opts` describe."""
    cfg = load_cfg(config, opts)
    # Camera/class counts do not change the eval-mode FLOPs; any SIE table size will do.
    model = build_model(cfg, num_classes=1, camera_num=2, view_num=2).eval()
    return fvcore_gflops(model), transreid_gflops(model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/msmt17_base.yml", help="config file (looked up in configs/)")
    parser.add_argument("--table", action="store_true", help="print the paper's GFLOPs table for our model")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", module="torch.jit")  # fvcore traces with the deprecated jit
    if not args.table:
        fv, an = gflops_of(args.config, args.opts)
        print(f"GFLOPs: {fv:.2f}")
        print(f"analytic GFLOPs: {an:.4f} (fvcore {fv:.4f})")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"config": args.config, "opts": args.opts, "fvcore": fv, "analytic": an}, f, indent=2)
        return 0
    rows = []
    print(f"{'method':34s} {'fvcore':>8s} {'analytic':>9s} {'paper':>6s} {'vs paper':>9s}")
    for label, merge_opts, paper in PAPER_TABLE:
        fv, an = gflops_of(args.config, ["MERGE.LAYERS", "[1,2,3,4,5,6,7,8,9,10]", *merge_opts, *args.opts])
        rows.append({"method": label, "fvcore": fv, "analytic": an, "paper": paper})
        print(f"{label:34s} {fv:8.2f} {an:9.4f} {paper:6.2f} {100 * (fv - paper) / paper:+8.2f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
