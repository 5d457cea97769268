"""`reid-gallery` with `ingest`: camera video into a gallery, one entry per tracklet (docs/video.md).

    reid-gallery ingest GALLERY cam1_0900.mp4 cam1_0910.mp4 --camera 1 --start 2026-12-04T09:00:00 \\
        --detector pedestrian-detection-adas-0002.xml --every 5 [--detector-threshold 0.5] [--keep-crops] \\
        [--config configs/x.yml --weights w.pth]     # --config: create the gallery when it does not exist

The gallery's other subcommands are reid_lite.index.cli's; this module adds `ingest` (it needs the video
layer, which sits above the index) and is the installed `reid-gallery` entry point.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..index import cli as index_cli
from ..index.backends import is_database_uri
from ..index.crops import to_seconds
from ..index.gallery import Gallery
from ..index.storage import LOCK
from ..utils.text import count
from .crops import CropRule
from .detect import SSDDetector
from .to_gallery import VideoIngestReport, ingest_to_gallery, is_iso_time

__all__ = ["add_ingest_parser", "main", "open_or_create", "run_ingest"]

INGEST_HELP = """Detect people in camera video (an SSD-style detector file), track them (ByteTrack), embed each
track's best crops once with the gallery's model and store one gallery entry per tracklet: its aggregate
feature, camera, start and end time, crop count, best crop as thumbnail (and its crops with --keep-crops).
Several videos of one camera given together follow each other in time: the first starts at --start, each
next one where the one before ended. Each video is published as one generation when it is done: Ctrl-C or a
crash loses only the video in progress, and the same command run again skips the videos already stored
(same file, same settings). Search the tracklets with `reid-gallery search GALLERY --after ID --within
20s..10min` (docs/video.md)."""


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def add_ingest_parser(sub: Any) -> None:
    """Add `ingest` to the `reid-gallery` subparsers `sub`."""
    p = sub.add_parser("ingest", help="detect, track and embed people in camera video: one entry per tracklet",
                       description=INGEST_HELP)
    p.add_argument("gallery", help="the gallery (its model embeds); created with --config when it does not exist")
    p.add_argument("videos", nargs="+", help="video files (any OpenCV/FFmpeg reads, raw H.264 included)")
    p.add_argument("--camera", type=int, required=True, help="0-based camera id of these videos")
    p.add_argument("--start", default="0", metavar="TIME",
                   help="time of the first video's frame 0: seconds or ISO 8601 (default 0); the others follow it")
    p.add_argument("--detector", required=True, help="SSD-style detector: OpenVINO IR .xml (with its .bin) or .onnx")
    p.add_argument("--detector-threshold", type=_unit_interval, default=0.5,
                   help="detector confidence threshold (default 0.5)")
    p.add_argument("--every", type=index_cli._positive_int, default=1, help="detect every K-th frame (default 1)")
    p.add_argument("--activation", type=_unit_interval, default=0.6,
                   help="ByteTrack: boxes at/above it are matched first, above it + 0.1 start tracks (default 0.6)")
    p.add_argument("--max-crops", type=index_cli._positive_int, default=8,
                   help="best crops embedded per tracklet (default 8)")
    p.add_argument("--keep-crops", action="store_true", help="store each tracklet's best crops (JPEG), not only "
                                                              "its thumbnail")
    p.add_argument("--fps", type=float, default=None, help="frame rate, where the container tells none")
    p.add_argument("--detect-batch", type=index_cli._positive_int, default=8,
                   help="frames per detector inference (default 8)")
    p.add_argument("--threads", type=index_cli._positive_int, default=None,
                   help="detector CPU threads (default: OpenVINO's, all cores)")
    p.add_argument("--device", help="cpu | cuda (the gallery's model)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a progress bar per video on stderr (default: when stderr is a terminal)")
    p.add_argument("--json", action="store_true", help="print one JSON report per video")
    new = p.add_argument_group("a new gallery (when GALLERY does not exist yet)")
    new.add_argument("--config", help="YAML config of the gallery's model (e.g. configs/demo_synthetic.yml)")
    new.add_argument("--weights", help="its checkpoint (TEST.WEIGHT)")
    new.add_argument("--opts", nargs="*", default=[], metavar="KEY VALUE", help="config overrides")
    new.add_argument("--camera-num", type=int, default=0,
                     help="cameras of the SIE for a model without a checkpoint's table (default: --camera + 1)")
    new.add_argument("--feature", choices=("global", "full"), default="global", help="stored feature (default global)")
    index_cli._add_lock_arg(p)


def print_video(report: VideoIngestReport, as_json: bool) -> None:
    """One video's report: its tracklets (camera, span, crops) and speed per stage, or JSON."""
    if as_json:
        print(json.dumps(report.to_dict()))
        return
    verb = "added" if report.added else "already stored:"
    print(f"{report.path}: {verb} {count(len(report.tracklets), 'tracklet')} "
          f"({report.frames} frames at {report.fps:g} fps, {report.start:.2f}..{report.end:.2f} s); "
          f"generation {report.generation}; {report.seconds:.1f} s")
    if report.tracklets:
        print(f"  {'id':>6} {'camera':>6} {'track':>5} {'start s':>10} {'end s':>10} {'frames':>11} {'crops':>5}")
    for t in report.tracklets:
        print(f"  {t.id:>6} {t.camid!s:>6} {t.track:>5} {t.start:>10.2f} {t.end:>10.2f} "
              f"{f'{t.first_frame}-{t.last_frame}':>11} {t.crop_count:>5}")
    for n in report.notes:
        print(f"  note: {n}")
    if report.stats is not None:
        print(f"  speed: {report.stats.summary()}")


def open_or_create(args: argparse.Namespace) -> Gallery:
    """The gallery of `ingest`: opened; created (empty, published) from --config when its folder holds none."""
    root = Path(args.gallery)
    # A database URI names an existing gallery unless --config asks for a new one (staging refuses to overwrite).
    exists = not args.config if is_database_uri(args.gallery) else (
        root.is_dir() and any(p.name != LOCK for p in root.iterdir()))
    if exists:
        if args.config or args.weights or args.opts:
            raise ValueError(f"{root} is a gallery already: its own model embeds (--config, --weights and --opts "
                             "only create a new one)")
        g = Gallery.open(args.gallery)
    else:
        if not args.config:
            raise FileNotFoundError(f"no gallery at {root}: give --config (and --weights) to create one")
        with Gallery.staging(args.gallery, index_cli.config_from_args(args), feature=args.feature,
                             camera_num=args.camera_num, camids=[args.camera], device=args.device,
                             lock_timeout=args.lock_timeout) as g:
            pass
        print(f"created {root} (empty, generation {g.generation})", file=sys.stderr)
    g.device = args.device
    return g


def run_ingest(args: argparse.Namespace) -> None:
    """`reid-gallery ingest`: each video in turn, one generation each."""
    to_seconds(args.start)  # a bad time fails before any video is read
    missing = [v for v in args.videos if not Path(v).is_file()]
    if missing:
        raise FileNotFoundError(f"video not found: {missing[0]}")
    g = open_or_create(args)
    detector = SSDDetector(args.detector, threshold=args.detector_threshold, batch_size=args.detect_batch,
                           threads=args.threads)
    progress = index_cli.show_progress(args)
    start: float | str = args.start
    for video in args.videos:
        report = ingest_to_gallery(g, video, detector, camera=args.camera, start=start, every=args.every,
                                   threshold=args.detector_threshold, keep_crops=args.keep_crops, progress=progress,
                                   fps=args.fps, detect_batch=args.detect_batch, activation=args.activation,
                                   crop_rule=CropRule(max_crops=args.max_crops), lock_timeout=args.lock_timeout)
        print_video(report, args.json)
        sys.stdout.flush()
        # the next video follows this one; an ISO --start keeps the entries' times shown in ISO 8601
        start = report.end if not is_iso_time(start) else _dt.datetime.fromtimestamp(
            report.end, tz=_dt.timezone.utc).isoformat()


COMMANDS: dict[str, index_cli.Command] = {"ingest": (add_ingest_parser, run_ingest)}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `reid-gallery` (every subcommand; `ingest` is this module's)."""
    return index_cli.main(argv, COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
