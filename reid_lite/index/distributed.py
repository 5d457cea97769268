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

import os
import shutil
import sys
import uuid
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from .cli import _cfg, _inputs, _print_report, build_parser
from .gallery import AddReport, Gallery, IndexParams, _hash_records, _Lock, collect_crops

__all__ = ["main", "shard_bounds"]


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous block of a sorted list of `n` items that `rank` of `world` processes handles."""
    return rank * n // world, (rank + 1) * n // world


def _run(argv: Sequence[str] | None) -> None:
    args = build_parser().parse_args(argv)
    if args.command not in ("build", "add"):
        raise SystemExit("reid_lite.index.distributed: only 'build' and 'add' are distributed")
    cuda = torch.cuda.is_available() and (getattr(args, "device", None) or "cuda").startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    try:
        records = collect_crops(_inputs(args), pattern=args.pattern, sidecar=args.sidecar,
                                recursive=not args.no_recursive)
        if args.command == "build":
            if rank == 0:
                cfg = _cfg(args)
                camera_num = args.camera_num or 1 + max((r.camid for r in records if r.camid is not None), default=0)
                params = IndexParams(kind=args.index, flat_max=args.flat_max, nlist=args.nlist, m=args.m,
                                     nprobe=args.nprobe)
                Gallery.create(args.gallery, cfg, feature=args.feature, index=params, camera_num=camera_num,
                               overwrite=args.overwrite, device="cpu", pattern=args.pattern).close()
            dist.barrier()
        lock = _Lock(Gallery.open(args.gallery, verify=False).root) if rank == 0 else None
        if lock is not None:
            lock.__enter__()
        try:
            _embed_and_publish(args, records, rank, world, device)
        finally:
            if lock is not None:
                lock.__exit__(None, None, None)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _embed_and_publish(args, records, rank: int, world: int, device: str) -> None:
    g = Gallery.open(args.gallery, verify=rank == 0)  # opened after rank 0 took the lock: a stable state
    g.device = device
    run = [uuid.uuid4().hex[:12] if rank == 0 else None]
    dist.broadcast_object_list(run, src=0)
    shard_dir = g.root / f".tmp-shards-{run[0]}"
    lo, hi = shard_bounds(len(records), rank, world)
    mine = _hash_records(records[lo:hi])
    gathered: list[list] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(gathered, [r.sha256 for r in mine])
    hashes = [h for part in gathered for h in part]
    from dataclasses import replace

    hashed = [replace(r, sha256=h) for r, h in zip(records, hashes)]
    new, dups = g._dedupe(hashed)  # identical on every rank: same list, same published generation
    new_pos = {id(r): i for i, r in enumerate(hashed)}
    my_new = [r for r in new if lo <= new_pos[id(r)] < hi]
    if my_new:
        feats, pos, failed, secs = g.embed_records(my_new, args.batch_size, args.workers, args.progress and rank == 0)
        order = np.array([new_pos[id(my_new[i])] for i in pos], dtype=np.int64)
    else:
        feats, order, failed, secs = np.empty((0, g.dim), np.float32), np.empty(0, np.int64), [], 0.0
    if rank == 0:
        shard_dir.mkdir()
    dist.barrier()
    np.savez(shard_dir / f"rank-{rank:05d}.npz", feats=feats, order=order, failed=np.array(failed, dtype=str),
             seconds=np.array(secs))
    dist.barrier()
    if rank != 0:
        return
    try:
        parts = [np.load(shard_dir / f"rank-{r:05d}.npz") for r in range(world)]
        all_feats = np.concatenate([p["feats"] for p in parts]) if parts else np.empty((0, g.dim), np.float32)
        all_order = np.concatenate([p["order"] for p in parts])
        report = AddReport(duplicates=dups, failed=[str(f) for p in parts for f in p["failed"]])
        report.embed_seconds = max(float(p["seconds"]) for p in parts)
        report.images_per_second = len(all_order) / report.embed_seconds if report.embed_seconds else 0.0
        g._publish_add([hashed[i] for i in all_order], all_feats, report)
        _print_report(report, args.json, f"{args.command} ({world} processes)")
    finally:
        shutil.rmtree(shard_dir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (run under torchrun); returns the exit status."""
    _run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
