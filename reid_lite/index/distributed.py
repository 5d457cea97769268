"""Multi-process embedding of very large crop collections into a gallery, with torchrun.

    python -m torch.distributed.run --nproc_per_node 2 -m reid_lite.index.distributed \
        build /data/gallery /data/crops --config configs/market1501_stm.yml
    python -m torch.distributed.run --nproc_per_node 8 -m reid_lite.index.distributed add /data/gallery more/

Arguments are those of `reid-gallery build` / `add`. Backend: nccl when CUDA is available (rank r
uses cuda:LOCAL_RANK), gloo on CPU.

Every rank lists the crops (sorted, so the list is identical everywhere) and takes the contiguous
block `[rank * N // W, (rank + 1) * N // W)`; it hashes its block, the hashes are all-gathered and every
rank applies the same de-duplication (against the gallery and within the batch); each rank embeds its
surviving crops and writes a shard file. Rank 0, which holds the gallery's write lock throughout, then
concatenates the shards in rank order, which is the single-process order, and publishes one
generation through the same code path as `Gallery.add`: ids, metadata and vectors equal a
single-process run's (vectors up to float rounding of different batch compositions).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import uuid
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..engine.distributed import shard_bounds
from .backends import is_database_uri
from .cli import build_parser, config_from_args, input_paths, print_report, run_command, show_progress
from .crops import collect_crops, hash_records
from .gallery import AddReport, Gallery, GalleryError, IndexParams

__all__ = ["main", "shard_bounds"]


def _run(argv: Sequence[str] | None) -> None:
    args = build_parser().parse_args(argv)
    if args.command not in ("build", "add"):
        raise SystemExit("reid_lite.index.distributed: only 'build' and 'add' are distributed")
    if is_database_uri(args.gallery):  # its ranks exchange shard files through the gallery's folder
        raise SystemExit("reid_lite.index.distributed: a PostgreSQL gallery has no folder for the shards; run one "
                         "`reid-gallery add` per machine or GPU instead: they write into it concurrently")
    cuda = torch.cuda.is_available() and (getattr(args, "device", None) or "cuda").startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    try:
        if args.command == "build":
            # Rank 0 stages the new gallery under the lock and publishes it once, at the end (an
            # overwritten gallery stays current until then); the other ranks embed with a detached copy
            # of the same model (random weights are seeded, so every rank builds the same one).
            cfg = config_from_args(args)
            pattern = args.pattern or cfg.DATASETS.FOLDER_PATTERN
            records = collect_crops(input_paths(args), pattern=pattern, sidecar=args.sidecar,
                                    recursive=not args.no_recursive)
            params = IndexParams(kind=args.index, flat_max=args.flat_max, nlist=args.nlist, m=args.m,
                                 nprobe=args.nprobe, ef_construction=args.ef_construction, ef_search=args.ef_search)
            with Gallery.staging(args.gallery if rank == 0 else None, cfg, feature=args.feature, index=params,
                                 camera_num=args.camera_num, camids=[r.camid for r in records],
                                 overwrite=args.overwrite, device=device, pattern=pattern,
                                 lock_timeout=args.lock_timeout,
                                 accept_merged_queries=args.accept_merged_queries) as g:
                dist.barrier()  # the gallery directory exists for the shard files
                _embed_and_publish(args, g, records, rank, world)
        else:
            g = Gallery.open(args.gallery, verify=rank == 0)
            g.device = device
            records = collect_crops(input_paths(args), pattern=args.pattern or g.pattern, sidecar=args.sidecar,
                                    recursive=not args.no_recursive)
            # Rank 0 holds the lock throughout; the others open the generation it sees once it has it.
            with g.writing(args.lock_timeout) if rank == 0 else contextlib.nullcontext(g):
                dist.barrier()
                if rank != 0:
                    g = Gallery.open(args.gallery, verify=False)
                    g.device = device
                _embed_and_publish(args, g, records, rank, world)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _embed_and_publish(args, g: Gallery, records, rank: int, world: int) -> None:
    run = [uuid.uuid4().hex[:12] if rank == 0 else None]
    dist.broadcast_object_list(run, src=0)
    shard_dir = Path(args.gallery) / f".tmp-shards-{run[0]}"
    lo, hi = shard_bounds(len(records), rank, world)
    mine, unreadable = hash_records(records[lo:hi], show_progress(args) and rank == 0)
    gathered: list[list] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(gathered, [(r.path, r.sha256) for r in mine])
    hashes = dict(pair for part in gathered for pair in part)
    hashed = [replace(r, sha256=hashes[r.path]) for r in records if r.path in hashes]
    new, dups = g.dedupe(hashed)  # identical on every rank: same list, same published generation
    new_pos = {id(r): i for i, r in enumerate(hashed)}
    lo_h = sum(1 for r in records[:lo] if r.path in hashes)
    hi_h = lo_h + len(mine)
    my_new = [r for r in new if lo_h <= new_pos[id(r)] < hi_h]
    if my_new:
        feats, pos, failed, secs = g.embed_records(my_new, args.batch_size, args.workers,
                                                   show_progress(args) and rank == 0)
        order = np.array([new_pos[id(my_new[i])] for i in pos], dtype=np.int64)
    else:
        feats, order, failed, secs = np.empty((0, g.dim), np.float32), np.empty(0, np.int64), [], 0.0
    if rank == 0:
        shard_dir.mkdir()
    dist.barrier()
    np.savez(shard_dir / f"rank-{rank:05d}.npz", feats=feats, order=order,
             failed=np.array(unreadable + failed, dtype=str), seconds=np.array(secs))
    dist.barrier()
    # Rank 0 publishes; every rank learns whether that worked, so that none waits forever on a failure.
    status: list[str | None] = [None]
    error: Exception | None = None
    if rank == 0:
        try:
            parts = [np.load(shard_dir / f"rank-{r:05d}.npz") for r in range(world)]
            all_feats = np.concatenate([p["feats"] for p in parts]) if parts else np.empty((0, g.dim), np.float32)
            all_order = np.concatenate([p["order"] for p in parts])
            report = AddReport(duplicates=dups, failed=[str(f) for p in parts for f in p["failed"]])
            report.embed_seconds = max(float(p["seconds"]) for p in parts)
            report.images_per_second = len(all_order) / report.embed_seconds if report.embed_seconds else 0.0
            stored = [hashed[i] for i in all_order]
            if report.failed and not stored and len(report.failed) == len(records) - len(dups):
                raise GalleryError(f"none of the {len(report.failed)} new crop(s) could be read (e.g. "
                                   f"{', '.join(report.failed[:3])}); nothing was written")
            added = g.add_features(stored, all_feats)
            report.added, report.generation = added.added, added.generation
            print_report(report, args.json, f"{args.command} ({world} processes)")
        except Exception as exc:
            error, status[0] = exc, f"{type(exc).__name__}: {exc}"
        finally:
            shutil.rmtree(shard_dir, ignore_errors=True)
    dist.broadcast_object_list(status, src=0)
    if error is not None:
        raise error
    if status[0] is not None:
        raise GalleryError(f"rank 0 failed to publish: {status[0]}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (run under torchrun); returns the exit status (2: a mistake, in one line per rank)."""
    rank = os.environ.get("RANK", "0")
    return run_command(f"reid_lite.index.distributed (rank {rank})", lambda: _run(argv),
                       lambda: "interrupted (a generation is only ever published whole)")


if __name__ == "__main__":
    sys.exit(main())
