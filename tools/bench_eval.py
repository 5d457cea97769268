"""Benchmark chunked retrieval evaluation: wall time and peak RSS (ru_maxrss).

Default: G=100,000 gallery x Q=10,000 queries of 3840-d float32 clustered features (identities with
several crops each, random cameras). Example (smaller)::

    python tools/bench_eval.py --num-gallery 20000 --num-query 2000 --out output/bench_small.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from reid_lite.metrics import evaluate_retrieval


def _rss_gib() -> float:
    """Current resident set size (GiB) from /proc (Linux); 0 where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        return 0.0


def _maxrss_gib() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


def make_clustered(num: int, dim: int, centers: np.ndarray, pid_of: np.ndarray, noise: float,
                   rng: np.random.Generator, block: int = 8192) -> np.ndarray:
    """float32 features ``normalize(center[pid] + noise * N(0, I))`` generated in blocks (no float64 copy)."""
    out = np.empty((num, dim), dtype=np.float32)
    for s in range(0, num, block):
        e = min(s + block, num)
        x = rng.standard_normal((e - s, dim), dtype=np.float32)
        x *= noise
        x += centers[pid_of[s:e]]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s:e] = x
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-gallery", type=int, default=100_000)
    p.add_argument("--num-query", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=3840)
    p.add_argument("--crops-per-id", type=int, default=10, help="average gallery crops per identity")
    p.add_argument("--num-cams", type=int, default=6)
    p.add_argument("--center-scale", type=float, default=0.3,
                   help="norm of identity centres relative to the unit-norm per-crop noise; smaller = harder")
    p.add_argument("--query-chunk", type=int, default=1024)
    p.add_argument("--metric", choices=["cosine", "euclidean"], default="cosine")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("output/bench_eval.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    num_ids = max(2, args.num_gallery // args.crops_per_id)
    # Per-crop noise has norm ~1; centres have norm ~center_scale. In 3840-d, distances concentrate, so a
    # small centre norm is what makes identities confusable (realistic, non-saturated mAP).
    centers = rng.standard_normal((num_ids, args.dim), dtype=np.float32)
    centers *= args.center_scale / np.sqrt(args.dim)
    g_pids = rng.integers(0, num_ids, args.num_gallery)
    q_pids = rng.integers(0, num_ids, args.num_query)
    g_cams = rng.integers(0, args.num_cams, args.num_gallery)
    q_cams = rng.integers(0, args.num_cams, args.num_query)
    scale = 1.0 / np.sqrt(args.dim)
    gallery = make_clustered(args.num_gallery, args.dim, centers, g_pids, scale, rng)
    query = make_clustered(args.num_query, args.dim, centers, q_pids, scale, rng)
    del centers
    t_data = time.perf_counter() - t0
    rss_before = _rss_gib()
    maxrss_before = _maxrss_gib()

    # Sample the current RSS during the evaluation: ru_maxrss is a process-lifetime high-water mark.
    peak = {"rss": rss_before}
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            peak["rss"] = max(peak["rss"], _rss_gib())
            stop.wait(0.05)

    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    t1 = time.perf_counter()
    res = evaluate_retrieval(query, gallery, q_pids, g_pids, q_cams, g_cams, query_chunk=args.query_chunk,
                             max_rank=50, metric=args.metric)
    t_eval = time.perf_counter() - t1
    stop.set()
    th.join()

    report = {
        "num_gallery": args.num_gallery,
        "num_query": args.num_query,
        "dim": args.dim,
        "num_ids": num_ids,
        "center_scale": args.center_scale,
        "metric": args.metric,
        "query_chunk": args.query_chunk,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "data_gen_s": round(t_data, 2),
        "eval_wall_s": round(t_eval, 2),
        "eval_queries_per_s": round(args.num_query / t_eval, 1),
        "features_gib": round((gallery.nbytes + query.nbytes) / 2**30, 3),
        "rss_after_data_gib": round(rss_before, 3),
        "ru_maxrss_after_data_gib": round(maxrss_before, 3),
        "ru_maxrss_peak_gib": round(_maxrss_gib(), 3),
        "sampled_peak_rss_during_eval_gib": round(peak["rss"], 3),
        "eval_extra_peak_gib": round(peak["rss"] - rss_before, 3),
        "rank1": res["rank1"],
        "rank5": res["rank5"],
        "rank10": res["rank10"],
        "mAP": res["mAP"],
        "mINP": res["mINP"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
