"""`reid-gallery`: build, extend, query and maintain a persisted gallery of person crops.

    reid-gallery build  /tmp/gal crops/ --config configs/market1501_stm.yml [--weights W.pth] [--opts KEY VALUE ...]
    reid-gallery add    /tmp/gal more_crops/ one.jpg
    reid-gallery search /tmp/gal q1.jpg q2.jpg -k 10 --exclude-same-camera --json --sheet out.png
    reid-gallery search /tmp/gal --after 12 --within 20s..10min   # where did tracklet 12's person go next
    reid-gallery info   /tmp/gal
    reid-gallery remove /tmp/gal --camera 3 --path crops/x.jpg [--purge]
    reid-gallery recover /tmp/gal
    reid-gallery serve  /tmp/gal [--host 127.0.0.1] [--port 8000] [--allow-add]   # HTTP API + web page
    reid-gallery migrate /tmp/gal "postgresql://reid@db:5432/city?gallery=cams"     # and back; verified

A gallery is a folder or a PostgreSQL URI, `postgresql://USER@HOST:PORT/DB?gallery=NAME` (any libpq URI, a
Unix socket's `postgresql://USER@/DB?host=/run/dir&gallery=NAME` too; NAME defaults to `default`): see
docs/postgres.md (the `postgres` extra).

Cameras are 0-based ids (a file name's `c1` is camera 0), as in the data package. Mistakes end in
one line on stderr and exit status 2; Ctrl-C in 130; the gallery is never left half-written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import load_cfg
from ..deploy.runtime import DeployError
from ..utils.checkpoint_file import CheckpointError
from ..utils.text import count
from .backends import storage_for
from .gallery import Gallery, GalleryError, IndexParams
from .migrate import migrate_gallery
from .server import serve
from .sheet import write_sheet
from .tracklets import parse_within, search_after, tracklet_table, tracklets_of_hits

__all__ = ["Command", "build_parser", "config_from_args", "input_paths", "main", "print_report", "run_command",
           "show_progress", "write_sheet"]

#: A subcommand added by a higher layer (reid_lite.video.cli adds `ingest`): (add its parser to the
#: subparsers, run it with the parsed arguments).
Command = tuple[Callable[[Any], None], Callable[[argparse.Namespace], None]]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 seconds, got {text}")
    return value


def _read_list(path: str | None) -> list[str]:
    if not path:
        return []
    base = Path(path).parent
    out = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(line)
            out.append(str(p if p.is_absolute() else base / p))
    return out


def config_from_args(args: argparse.Namespace) -> Any:
    """The config of `--config` with `--opts`, `--weights` and `--device` applied (frozen)."""
    opts = list(args.opts or [])
    if getattr(args, "weights", None):
        opts += ["TEST.WEIGHT", args.weights]
    if getattr(args, "device", None):
        opts += ["MODEL.DEVICE", args.device]
    return load_cfg(args.config, opts)


def _add_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", help="folders of crops and/or image files")
    p.add_argument("--list", help="text file with one image path per line (relative to the file)")
    p.add_argument("--pattern", help="file-name regex with groups camid, optional pid and timestamp "
                                     "(default: DATASETS.FOLDER_PATTERN)")
    p.add_argument("--sidecar", help="CSV/JSON with path,camid[,pid][,timestamp] for one folder")
    p.add_argument("--no-recursive", action="store_true", help="do not descend into sub-folders")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="images per forward (default TEST.IMS_PER_BATCH)")
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars for hashing and embedding on stderr (default: when stderr is a terminal)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_lock_arg(p)


def _add_lock_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lock-timeout", type=_seconds, default=None, metavar="SECONDS",
                   help="give up after waiting this long for another writer's lock (default: wait, saying so)")


def build_parser(commands: dict[str, Command] | None = None) -> argparse.ArgumentParser:
    """The argument parser of `reid-gallery` (with the parsers of `commands` added)."""
    ap = argparse.ArgumentParser(prog="reid-gallery", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--version", action="version", version=f"reid-gallery {__version__} (reid_lite)")
    sub = ap.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="embed crops into a new gallery")
    b.add_argument("gallery")
    _add_input_args(b)
    b.add_argument("--config", help="YAML config (e.g. configs/market1501_stm.yml)")
    b.add_argument("--weights", help="TransReID checkpoint (TEST.WEIGHT); without it the weights are random")
    b.add_argument("--device", help="cpu | cuda (MODEL.DEVICE)")
    b.add_argument("--feature", choices=("global", "full"), default="global",
                   help="store the 768-d global feature (default) or the full JPM concatenation")
    b.add_argument("--index", choices=("auto", "flat", "ivfpq", "hnsw"), default="auto",
                   help="auto: a folder's exact flat index up to --flat-max crops, then IVF-PQ; PostgreSQL's HNSW. "
                        "flat: exact search. ivfpq: folders only; hnsw: PostgreSQL only")
    b.add_argument("--flat-max", type=int, default=IndexParams.flat_max)
    b.add_argument("--nlist", type=int, default=0)
    b.add_argument("--m", type=int, default=0, help="IVF-PQ sub-quantizers, or HNSW's graph degree (0: default)")
    b.add_argument("--nprobe", type=int, default=0)
    b.add_argument("--ef-construction", type=int, default=0, help="HNSW build breadth (0: pgvector's 64)")
    b.add_argument("--ef-search", type=int, default=0, help="HNSW search breadth (0: pgvector's 40)")
    b.add_argument("--camera-num", type=int, default=0,
                   help="cameras of the SIE embedding for random/ImageNet weights (default: highest camera id of "
                        "the crops + 1); a checkpoint's SIE table decides by itself")
    b.add_argument("--overwrite", action="store_true",
                   help="replace the gallery at this path; it stays current until the new one is complete")
    b.add_argument("--opts", nargs="*", default=[], metavar="KEY VALUE", help="config overrides")
    b.add_argument("--accept-merged-queries", action="store_true",
                   help="a gallery embedded without merging (MERGE.METHOD none) also accepts queries embedded by "
                        "the same model with token merging (search --opts MERGE.METHOD stm); recorded in its "
                        "fingerprint. Measure the accuracy first: tools/test.py --asymmetric")

    a = sub.add_parser("add", help="append crops (already stored crops are skipped, none re-embedded)")
    a.add_argument("gallery")
    _add_input_args(a)
    a.add_argument("--device", help="cpu | cuda")

    s = sub.add_parser("search", help="rank gallery crops for query images")
    s.add_argument("gallery")
    s.add_argument("queries", nargs="*", help="query image files (or --after)")
    s.add_argument("--after", type=int, metavar="ID",
                   help="search from the stored tracklet ID: where did this person appear next (other cameras, "
                        "in time order; --within, --same-camera)")
    s.add_argument("--within", default="..", metavar="FROM..TO",
                   help="with --after: hits starting FROM..TO after the tracklet ends, e.g. 20s..10min (default: any "
                        "time after it); a negative FROM as --within=-1min..1min also takes what starts earlier")
    s.add_argument("--same-camera", action="store_true",
                   help="with --after: the tracklet's own camera too (a person returning to one camera)")
    s.add_argument("-k", type=_positive_int, default=10, help="results per query (default 10)")
    s.add_argument("--query-camera", type=int, nargs="+", help="0-based camera of each query (or one for all)")
    s.add_argument("--pattern", help="file-name pattern to read query cameras (default: the gallery's)")
    s.add_argument("--exclude-same-camera", action="store_true", help="drop crops from the query's camera")
    s.add_argument("--cameras", type=int, nargs="+", help="keep only these cameras")
    s.add_argument("--time-from", help="keep crops with timestamp >= this (number or ISO 8601)")
    s.add_argument("--time-to", help="keep crops with timestamp <= this")
    s.add_argument("--nprobe", type=int, default=None,
                   help="IVF lists to visit (IVF-PQ galleries), or HNSW's ef_search (PostgreSQL)")
    s.add_argument("--config", help="query model config: refused unless it is the gallery's model")
    s.add_argument("--weights", help="query model checkpoint: refused unless it is the gallery's")
    s.add_argument("--device", help="cpu | cuda")
    s.add_argument("--no-verify", action="store_true", help="skip the checksum verification on open")
    s.add_argument("--json", action="store_true", help="print results as JSON")
    s.add_argument("--sheet", help="write a contact sheet (.png or .html)")
    s.add_argument("--opts", nargs="*", default=[], metavar="KEY VALUE",
                   help="query model overrides: refused unless they leave the gallery's model unchanged")

    i = sub.add_parser("info", help="size, model and index of a gallery")
    i.add_argument("gallery")
    i.add_argument("--no-verify", action="store_true")
    i.add_argument("--json", action="store_true")

    r = sub.add_parser("remove", help="remove crops by path or camera",
                       description="Remove crops by path or camera. The previous generation keeps them on disk "
                                   "until the next write (--purge: drop it now), and adding their files again "
                                   "stores them again.")
    r.add_argument("gallery")
    r.add_argument("--path", nargs="+", default=[], help="crop paths to remove")
    r.add_argument("--camera", type=int, nargs="+", default=[], help="0-based cameras to remove")
    r.add_argument("--purge", action="store_true", help="delete every older generation now (alone: purge only)")
    r.add_argument("--json", action="store_true")
    _add_lock_arg(r)

    c = sub.add_parser("recover", help="republish the newest complete generation (CURRENT missing or damaged)")
    c.add_argument("gallery")
    _add_lock_arg(c)

    v = sub.add_parser("serve", help="HTTP API and web page for searching the gallery (docs/gallery.md)")
    v.add_argument("gallery")
    v.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: loopback only; anything else exposes the gallery's crops)")
    v.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: any free port)")
    v.add_argument("--allow-add", action="store_true", help="accept uploads that add crops (default: read-only)")
    v.add_argument("--max-upload-mb", type=float, default=10.0, help="larger uploads get 413 (default 10)")
    v.add_argument("--device", help="cpu | cuda (the model that embeds uploaded queries)")
    v.add_argument("--no-verify", action="store_true", help="skip the checksum verification on (re)open")
    v.add_argument("--query-opts", nargs="*", default=[], metavar="KEY VALUE",
                   help="embed uploaded queries with the gallery's model changed by these overrides, e.g. "
                        "MERGE.METHOD stm: only token merging may change, on a gallery built with "
                        "--accept-merged-queries")

    m = sub.add_parser("migrate", help="copy a gallery between a folder and PostgreSQL (either way), verified",
                       description="Copy every crop's record and stored vector (no embedding) with the model "
                                   "fingerprint and calibration, then compare crop counts and checksums.")
    m.add_argument("source", help="the gallery to copy (a folder or a postgresql:// URI)")
    m.add_argument("target", help="where to build the copy (a folder or a postgresql:// URI)")
    m.add_argument("--overwrite", action="store_true", help="replace a gallery at the target")
    m.add_argument("--json", action="store_true")
    _add_lock_arg(m)
    for add_parser, _ in (commands or {}).values():
        add_parser(sub)
    return ap


def input_paths(args: argparse.Namespace) -> list[str]:
    """The crops of a build/add: positional folders/files plus the `--list` file's lines."""
    inputs = list(args.inputs) + _read_list(args.list)
    if not inputs:
        raise ValueError("no crops given (folders, image files or --list)")
    return inputs


def show_progress(args: argparse.Namespace) -> bool:
    """--progress / --no-progress, else on when stderr is a terminal."""
    return args.progress if args.progress is not None else sys.stderr.isatty()


def print_report(report: Any, as_json: bool, what: str) -> None:
    """Print an AddReport (one line, or JSON with the first 100 duplicates)."""
    d = report.to_dict()
    if as_json:
        d["duplicates"] = d["duplicates"][:100]
        print(json.dumps(d, indent=1))
    else:
        print(f"{what}: added {count(d['added'], 'crop')}, skipped {count(d['num_duplicates'], 'duplicate')}, "
              f"{d['num_failed']} unreadable; generation {d['generation']}; {d['seconds']:.1f}s "
              f"({d['images_per_second']:.1f} img/s embedding)")


def _cmd_build(args: argparse.Namespace) -> None:
    params = IndexParams(kind=args.index, flat_max=args.flat_max, nlist=args.nlist, m=args.m, nprobe=args.nprobe,
                         ef_construction=args.ef_construction, ef_search=args.ef_search)
    g, report = Gallery.build(args.gallery, config_from_args(args), input_paths(args), pattern=args.pattern,
                              sidecar=args.sidecar, recursive=not args.no_recursive, feature=args.feature,
                              index=params, camera_num=args.camera_num, overwrite=args.overwrite, device=args.device,
                              batch_size=args.batch_size, workers=args.workers, progress=show_progress(args),
                              lock_timeout=args.lock_timeout, accept_merged_queries=args.accept_merged_queries)
    g.close()
    print_report(report, args.json, "build")


def _cmd_add(args: argparse.Namespace) -> None:
    g = Gallery.open(args.gallery)
    g.device = args.device
    report = g.add(input_paths(args), pattern=args.pattern, sidecar=args.sidecar, recursive=not args.no_recursive,
                   batch_size=args.batch_size, workers=args.workers, progress=show_progress(args),
                   lock_timeout=args.lock_timeout)
    print_report(report, args.json, "add")


def _merge_overrides(cfg: Any, opts: Sequence[str]) -> Any:
    """`cfg` (a gallery's stored config) with KEY VALUE overrides; an unknown key is a ValueError naming it."""
    if len(opts) % 2:
        raise ValueError(f"--opts must be KEY VALUE pairs, got an odd count: {list(opts)}")
    cfg = cfg.clone()
    cfg.defrost()
    try:
        cfg.merge_from_list(list(opts))
    except AssertionError as exc:  # yacs asserts on a key the config lacks
        raise ValueError(f"unknown config key in --opts ({exc})") from None
    cfg.freeze()
    return cfg


def _span(t: Any) -> str:
    """'1.20..2.60 s (1.4 s, 8 crops)' of a tracklet."""
    return f"{t.start:.2f}..{t.end:.2f} s ({t.end - t.start:.1f} s, {count(t.crop_count, 'crop')})"


def _cmd_after(args: argparse.Namespace, g: Gallery) -> None:
    if args.queries:
        raise ValueError("give query images or --after ID, not both")
    res = search_after(g, args.after, parse_within(args.within), k=args.k, same_camera=args.same_camera,
                       cameras=args.cameras, nprobe=args.nprobe)
    for note in res.notes:
        print(f"reid-gallery search: note: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps(res.to_dict(), indent=1))
        return
    q = res.query
    lo, hi = res.window
    print(f"tracklet {q.id}: camera {q.camid}, {_span(q)}, track {q.track}")
    print(f"next: {count(len(res.hits), 'hit')} starting {lo:.2f}..{hi:.2f} s on "
          f"{'any camera' if args.same_camera else 'other cameras'}, in time order (rank = by similarity)")
    for h in res.hits:
        span = _span(h.tracklet) if h.tracklet is not None else f"t {h.hit.timestamp_raw or h.hit.timestamp}"
        flag = "" if h.hit.likely is None else ("  likely  " if h.hit.likely else "  unlikely")
        print(f"  cam {h.hit.camid}  {span}  #{h.hit.rank} {h.hit.score:.4f}{flag}  id {h.hit.id}  {h.hit.path}")


def _cmd_search(args: argparse.Namespace) -> None:
    g = Gallery.open(args.gallery, verify=not args.no_verify)
    if args.after is not None:
        _cmd_after(args, g)
        return
    if not args.queries:
        raise ValueError("give query image files, or --after ID to search from a stored tracklet")
    if args.within != ".." or args.same_camera:
        raise ValueError("--within and --same-camera go with --after ID")
    g.device = args.device
    cfg = None
    if args.config:
        cfg = config_from_args(args)
    elif args.weights or args.opts:  # overrides apply to the gallery's own config
        cfg = _merge_overrides(g.cfg, list(args.opts) + (["TEST.WEIGHT", args.weights] if args.weights else []))
    camids: Any = None
    if args.query_camera:
        camids = args.query_camera[0] if len(args.query_camera) == 1 else args.query_camera
    results = g.search(args.queries, k=args.k, camids=camids, exclude_same_camera=args.exclude_same_camera,
                       cameras=args.cameras, time_window=(args.time_from, args.time_to), cfg=cfg,
                       nprobe=args.nprobe, pattern=args.pattern)
    for i, why in sorted(results.skipped.items()):
        print(f"reid-gallery search: warning: query {args.queries[i]} skipped: {why}", file=sys.stderr)
    for note in results.notes:
        print(f"reid-gallery search: note: {note}", file=sys.stderr)
    t = results.threshold
    if t is None:
        print("reid-gallery search: note: no match threshold calibrated for this query model, so hits are not "
              "flagged likely/unlikely (tools/test.py --calibrate GALLERY)", file=sys.stderr)
    spans = [tracklets_of_hits(g, hits) for hits in results]  # tracklet hits carry their time span
    if args.json:
        print(json.dumps([{"query": q, "results": [h.to_dict() for h in tracked], "threshold": t,
                           "no_likely_match": None if i in results.skipped else results.no_likely_match(i),
                           **({"skipped": results.skipped[i]} if i in results.skipped else {})}
                          for i, (q, tracked) in enumerate(zip(args.queries, spans))], indent=1))
    else:
        for i, (q, hits, tracked) in enumerate(zip(args.queries, results, spans)):
            if i in results.skipped:
                continue
            verdict = "" if t is None else ("  (no likely match: every hit scores below the threshold "
                                            f"{t:.4f})" if results.no_likely_match(i) else f"  (threshold {t:.4f})")
            print(f"query {q}{verdict}")
            for h, tr in zip(hits, tracked):
                ts = h.timestamp_raw if h.timestamp_raw is not None else "-"
                flag = "" if h.likely is None else ("  likely  " if h.likely else "  unlikely")
                span = f"  tracklet {_span(tr.tracklet)}" if tr.tracklet is not None else ""
                print(f"  {h.rank:3d}  {h.score:.4f}{flag}  cam {h.camid}  t {ts}{span}  {h.path}")
    if args.sheet:
        write_sheet(args.sheet, args.queries, results)
        print(f"contact sheet: {args.sheet}", file=sys.stderr)


def _cmd_info(args: argparse.Namespace) -> None:
    g = Gallery.open(args.gallery, verify=not args.no_verify)
    info = g.info()
    table = tracklet_table(g.store)
    info["tracklets"] = table.count()
    info["videos"] = [v.to_dict() for v in table.videos()]
    if args.json:
        print(json.dumps(info, indent=1))
        return
    m = info["model"]
    a = m["architecture"]
    print(f"gallery   {info['path']} (generation {info['generation']})")
    print(f"size      {count(info['size'], 'crop')}, {info['bytes'] / 1e6:.1f} MB "
          f"({info['bytes_per_crop']:.0f} B/crop)")
    print(f"index     {info['index']['kind']} (policy {info['index']['params']['kind']}), "
          f"{info['index']['ntotal']} vectors of {m['feature']['dim']}-d ({m['feature']['kind']} feature)")
    print(f"model     {a['transformer_type']} dim {a['embed_dim']} depth {a['depth']} heads {a['num_heads']} "
          f"stride {a['stride']} jpm {a['jpm']} sie_camera {a['sie_camera']}")
    print(f"weights   {m['weights']}")
    print(f"merging   {m['merging']}")
    print(f"input     {m['input']['size']}  digest {info['model_digest'][:16]}")
    print(f"cameras   {info['cameras']}")
    if info["tracklets"]:
        print(f"tracklets {info['tracklets']} from {count(len(info['videos']), 'video')} (reid-gallery ingest)")
    if info["accepts_merged_queries"]:
        print("queries   also from this model with token merging (--accept-merged-queries)")
    if not info["calibration"]:
        print("threshold not calibrated: hits are not flagged likely/unlikely (tools/test.py --calibrate GALLERY)")
    for e in info["calibration"]:
        method = (e.get("query_merging") or {}).get("method", "?")
        held = e.get("held_out") or {}
        held_text = (f"; held out: precision {held['precision']:.3f}, recall {held['recall']:.3f}"
                     if held.get("precision") is not None else "")
        print(f"threshold {e['threshold']:.4f} for queries merging {method} ({e['rule']}; precision "
              f"{e['precision']:.3f}, recall {e['recall']:.3f} on "
              f"{count(e['num_queries'], 'labelled query', 'labelled queries')}{held_text})")


def _cmd_remove(args: argparse.Namespace) -> None:
    if not args.path and not args.camera and not args.purge:
        raise ValueError("give --path and/or --camera (and/or --purge)")
    g = Gallery.open(args.gallery)
    with g.writing(args.lock_timeout):  # remove and purge as one write: no other writer in between
        n = g.remove(paths=args.path, cameras=args.camera) if args.path or args.camera else 0
        purged = g.purge() if args.purge else []
    out = {"removed": n, "generation": g.generation, "size": g.store.count(), "purged": purged}
    if args.json:
        print(json.dumps(out))
        return
    purge_text = f"purged {', '.join(purged) or 'nothing (no older generation)'}"
    if not args.path and not args.camera:
        print(f"{purge_text}; generation {out['generation']} ({count(out['size'], 'crop')}) kept")
        return
    print(f"removed {count(n, 'crop')}; {out['size']} left (generation {out['generation']})"
          + (f"; {purge_text}" if args.purge else
             "; older generations keep them until the next write (--purge to delete now)" if n else ""))


def _cmd_recover(args: argparse.Namespace) -> None:
    g, gen = Gallery.recover(args.gallery, lock_timeout=args.lock_timeout)
    if gen is None:
        print(f"nothing to recover: {args.gallery} is complete at generation {g.generation} "
              f"({count(g.store.count(), 'crop')})")
    else:
        print(f"recovered {args.gallery}: CURRENT now names generation {gen} ({count(g.store.count(), 'crop')})")
    g.close()


def _cmd_serve(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:  # before the gallery is opened and the model built
        raise ValueError(f"--port {args.port} is not a TCP port: use 1-65535 (or 0 for any free port)")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        warnings.warn(f"listening on {args.host}: anyone who can reach it can search the gallery and see its crops "
                      "(there is no authentication)", stacklevel=1)
    if args.allow_add and storage_for(args.gallery).local_dir() is None:
        raise ValueError(f"--allow-add keeps uploaded crops in the gallery's folder, and {args.gallery} is a database "
                         "gallery with none; add crops with `reid-gallery add`")
    query_cfg = None
    if args.query_opts:
        with Gallery.open(args.gallery, verify=False) as g:
            query_cfg = _merge_overrides(g.cfg, args.query_opts)
    serve(args.gallery, args.host, args.port, allow_add=args.allow_add, max_upload_mb=args.max_upload_mb,
          verify=not args.no_verify, device=args.device, query_cfg=query_cfg)


def _cmd_migrate(args: argparse.Namespace) -> None:
    report = migrate_gallery(args.source, args.target, overwrite=args.overwrite, lock_timeout=args.lock_timeout)
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"migrated {count(report['crops'], 'crop')} from {report['source']} to {report['target']} "
          f"({report['target_index']} index) in {report['seconds']:.1f}s; counts and checksums match "
          f"({report['checksum'][:16]}, vectors as {report['vectors_compared_as']})")


def _interrupted(args: argparse.Namespace) -> str:
    """What an interrupted command left behind, read from the disk (not assumed)."""
    if args.command in ("search", "info", "serve"):
        return "interrupted"
    if args.command == "migrate":
        return f"interrupted; nothing was published at {args.target} (a copy is published whole or not at all)"
    try:
        gen, _ = storage_for(args.gallery).current()
    except (GalleryError, OSError, ValueError):
        return "interrupted; nothing was written (no gallery there)"
    return f"interrupted; {args.gallery} is intact at generation {gen} (no partial write is ever published)"


def run_command(prefix: str, command: Callable[[], None], interrupted: Callable[[], str]) -> int:
    """Run `command`: an ordinary mistake becomes one line on stderr and exit status 2, Ctrl-C the line
    `interrupted()` and 130, a warning one line (not Python's file:line and source echo)."""
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, category, *a, **k: print(f"{prefix}: warning: {message}",
                                                                         file=sys.stderr)
        try:
            command()
        except KeyboardInterrupt:
            print(f"{prefix}: {interrupted()}", file=sys.stderr)
            return 130
        except (GalleryError, CheckpointError, DeployError, OSError, ValueError, KeyError) as exc:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            print(f"{prefix}: error: {msg}".replace("\n", " "), file=sys.stderr)
            return 2
    return 0


def main(argv: Sequence[str] | None = None, commands: dict[str, Command] | None = None) -> int:
    """Entry point of `reid-gallery`; returns the exit status (2: a mistake, explained in one line). `commands`:
    subcommands of higher layers (the installed `reid-gallery` is reid_lite.video.cli's, which adds `ingest`)."""
    args = build_parser(commands).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    handlers = {"build": _cmd_build, "add": _cmd_add, "search": _cmd_search, "info": _cmd_info,
                "remove": _cmd_remove, "recover": _cmd_recover, "serve": _cmd_serve, "migrate": _cmd_migrate,
                **{name: run for name, (_, run) in (commands or {}).items()}}
    return run_command(f"reid-gallery {args.command}", lambda: handlers[args.command](args),
                       lambda: _interrupted(args))


if __name__ == "__main__":
    sys.exit(main())
