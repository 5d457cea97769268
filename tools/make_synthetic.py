"""Write the synthetic Market-1501-style dataset used by the README's demo (no download needed).

    python tools/make_synthetic.py --root datasets --seed 0
    python tools/make_synthetic.py --root datasets --train-ids 200 --test-ids 100 --overwrite

The result is `<root>/<name>/{bounding_box_train,query,bounding_box_test}` plus a `_COMPLETE`
marker; rerunning with the same parameters reuses the finished folder.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
    from reid_lite.data.synthetic import MARKER_NAME, dataset_summary, generate_reid_dataset
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from reid_lite.data.synthetic import MARKER_NAME, dataset_summary, generate_reid_dataset


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 256x128, got {text!r}") from exc
    return h, w


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="datasets", help="parent folder (default: datasets)")
    p.add_argument("--name", default="synthetic", help="dataset folder under --root (default: synthetic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-ids", type=int, default=60)
    p.add_argument("--test-ids", type=int, default=40)
    p.add_argument("--cameras", type=int, default=6)
    p.add_argument("--images-per-camera", type=int, default=3, help="images per identity per camera")
    p.add_argument("--distractors", type=int, default=20, help="pid 0000 junk crops in the gallery")
    p.add_argument("--size", type=_size, default=(256, 128), help="HEIGHTxWIDTH (default: 256x128)")
    p.add_argument("--workers", type=int, default=1, help="render processes (pays off for large sets only)")
    p.add_argument("--overwrite", action="store_true", help="replace an incomplete or different dataset")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    marker = Path(args.root) / args.name / MARKER_NAME
    before = marker.stat().st_mtime_ns if marker.exists() else None
    start = time.perf_counter()
    try:
        out = generate_reid_dataset(
            args.root, num_train_ids=args.train_ids, num_test_ids=args.test_ids, num_cameras=args.cameras,
            images_per_id_per_camera=args.images_per_camera, seed=args.seed, size=args.size,
            overwrite=args.overwrite, name=args.name, num_distractors=args.distractors,
            progress=not args.no_progress, workers=args.workers,
        )
    except FileExistsError as exc:
        print(f"error: {exc} (here: --overwrite)", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    # The same marker file (same mtime) means the finished folder was reused, not rewritten.
    reused = before is not None and marker.exists() and marker.stat().st_mtime_ns == before
    how = "already complete, reused" if reused else f"written in {elapsed:.1f} s"
    print(f"synthetic dataset: {out} ({how})")
    for split, counts in dataset_summary(out).items():
        print(f"  {split:<20} {counts['images']:>6} images {counts['ids']:>5} ids {counts['cameras']:>2} cameras")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
