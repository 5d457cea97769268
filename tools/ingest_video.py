#!/usr/bin/env python
"""Turn camera video into tracklets: decode, detect people, track them (ByteTrack), embed each track's best
crops once, and print the tracklets (camera, time span, crop count) and each stage's frames/s.

    python tools/ingest_video.py people-detection.264 \
        --detector pedestrian-detection-adas-0002.xml --every 5 --camera 0
    python tools/ingest_video.py cam1.mp4 --detector det.onnx --start 2026-12-04T09:00:00 \
        --config configs/demo_synthetic.yml --thumbnails output/thumbs

The detector is an SSD-style OpenVINO IR (.xml + .bin) or ONNX file (reid_lite.video.detect). With
--config the tracklets are embedded with that model (the gallery's; token merging as configured;
KEY VALUE overrides after the config), else only detected and tracked. A frame's time is --start
(seconds, or an ISO 8601 time) plus its index over the video's frame rate. --thumbnails writes each
tracklet's best crop as <video>_t<track>.jpg into that folder (created when missing).
Exit codes: 0 done, 2 bad input (one `error:` line on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

try:
    from reid_lite.index.crops import to_seconds
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from reid_lite.index.crops import to_seconds
from reid_lite.cli import USER_ERRORS, cli_error  # noqa: E402  (after the checkout's path, when needed)
from reid_lite.config import load_cfg  # noqa: E402
from reid_lite.engine.extractor import FeatureExtractor  # noqa: E402
from reid_lite.video import CropRule, SSDDetector, extractor_embedder, ingest_video  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; trailing `KEY VALUE` pairs override --config."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("video", help="video file (any OpenCV/FFmpeg reads, raw H.264 included)")
    p.add_argument("--detector", required=True, help="SSD-style detector: OpenVINO IR .xml (with its .bin) or .onnx")
    p.add_argument("--threshold", type=float, default=0.5, help="detector confidence threshold (default 0.5)")
    p.add_argument("--activation", type=float, default=0.6,
                   help="ByteTrack: boxes at/above it are matched first and (above it + 0.1) start tracks")
    p.add_argument("--camera", type=int, default=0, help="0-based camera id (recorded; the SIE camera of --config)")
    p.add_argument("--start", default="0", help="time of frame 0 of the first video: seconds or ISO 8601 (default 0)")
    p.add_argument("--every", type=int, default=1, help="detect every K-th frame (default 1)")
    p.add_argument("--fps", type=float, default=None, help="frame rate, where the container tells none")
    p.add_argument("--detect-batch", type=int, default=8, help="frames per detector inference (default 8)")
    p.add_argument("--threads", type=int, default=None, help="detector CPU threads (default: OpenVINO's)")
    p.add_argument("--max-crops", type=int, default=8, help="best crops embedded per tracklet (default 8)")
    p.add_argument("--config", default="", help="embed with this model config (the gallery's); none: no embedding")
    p.add_argument("--thumbnails", default="", help="folder to write each tracklet's best crop into (JPEG)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("opts", nargs="*", help="config overrides as KEY VALUE pairs (with --config)")
    return p.parse_intermixed_args(argv)


def thumbnail_folder(text: str) -> Path | None:
    """The --thumbnails folder, created when missing; ValueError when it is a file or not writable."""
    if not text:
        return None
    folder = Path(text)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--thumbnails {folder}: exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--thumbnails {folder}: cannot create it ({err.strerror or err})") from None
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--thumbnails {folder}: not writable")
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.every < 1 or args.detect_batch < 1 or args.max_crops < 1:
            raise ValueError("--every, --detect-batch and --max-crops must be at least 1")
        if args.opts and not args.config:
            raise ValueError(f"config overrides {args.opts[:2]} need --config")
        start = to_seconds(args.start)
        if not Path(args.video).is_file():
            raise FileNotFoundError(f"video not found: {args.video}")
        thumbs = thumbnail_folder(args.thumbnails)
        detector = SSDDetector(args.detector, threshold=args.threshold, batch_size=args.detect_batch,
                               threads=args.threads)
        embed = None
        if args.config:
            cfg = load_cfg(args.config, args.opts)
            extractor = FeatureExtractor(cfg, weights=cfg.TEST.WEIGHT or None, camera_num=args.camera + 1)
            embed = extractor_embedder(extractor, camera=args.camera if cfg.MODEL.SIE_CAMERA else None)
    except USER_ERRORS as err:
        return cli_error(err)
    video = args.video
    try:
        result = ingest_video(video, detector, embed, camera=args.camera, start=start, every=args.every,
                              threshold=args.threshold, progress=not args.no_progress, fps=args.fps,
                              detect_batch=args.detect_batch, activation=args.activation,
                              crop_rule=CropRule(max_crops=args.max_crops))
    except USER_ERRORS as err:
        return cli_error(err)
    info = result.info
    print(f"{video}: {result.stats.decoded} frames at {info.fps:g} fps ({info.width}x{info.height}), camera "
          f"{args.camera}, start {start:g} s, every {args.every}; {len(result.tracklets)} tracklets"
          + ("" if embed else " (not embedded: no --config)"))
    print(f"  {'track':>5} {'camera':>6} {'start s':>9} {'end s':>9} {'frames':>11} {'boxes':>5} {'crops':>5}")
    for t in result.tracklets:
        print(f"  {t.track_id:>5} {t.camera:>6} {t.start:>9.2f} {t.end:>9.2f} "
              f"{f'{t.first_frame}-{t.last_frame}':>11} {t.hits:>5} {t.crop_count:>5}")
        if thumbs is not None:
            (thumbs / f"{Path(video).stem}_t{t.track_id}.jpg").write_bytes(t.thumbnail_jpeg())
    print(f"  speed: {result.stats.summary()}")
    if thumbs is not None:
        print(f"thumbnails: {thumbs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
