"""Benchmark of the gallery's large-scale index (not a test): build time, bytes per crop, single-query
latency p50/p99 and recall@10 against exact search, on synthetic features shaped like real ReID ones.

    python tools/bench_gallery.py --n 1000000 --out /tmp/bench_gallery.json
    python tools/bench_gallery.py --backend both --n 100000 --out bench.json   # faiss beside PostgreSQL + pgvector

`--backend faiss` (the default) sweeps the IVF-PQ settings below. `--backend postgres` / `both` instead builds
each backend's gallery through the same public API (`Gallery.staging` + `add_features`, published whole: a
folder's IVF-PQ with float16 re-ranking, a PostgreSQL table with an HNSW cosine index built at publish) and
measures one table: build seconds, recall@10 against exact search, and `Gallery.search` latency p50/p99 and
queries per second with 1 and 8 client threads, without and with a camera + time filter, plus the rate of an
incremental add into the built gallery. PostgreSQL: `--pg-uri`, else a private pgserver (PostgreSQL 16 +
pgvector 0.6, its default settings) in a temporary folder.

Vectors: `--ids` identity centres on the unit sphere, `n / ids` crops each spread over `--cameras`
cameras, crop = centre + camera offset + per-crop noise, L2-normalised (within-identity cosine ~0.6,
between identities ~0), i.e. clustered like real features rather than uniform noise. Stored dimension:
768, the TransReID global (b1) feature, which is what a default gallery (`feature='global'`) stores.
The gallery is built through the real code path (`Gallery.create` + `Gallery.add_features`: IVF-PQ
training, SQLite metadata, float16 re-ranking segments, fsync, checksummed manifest), so build time and
bytes per crop are those of a real gallery. Queries are new crops of stored identities.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from reid_lite.config import load_cfg
from reid_lite.index.gallery import Gallery, IndexParams
from reid_lite.index.store import CropRecord
from reid_lite.index.vector_index import VectorIndex


def _centres(rng: np.random.Generator, ids: int, dim: int, spectrum: float = 0.6) -> np.ndarray:
    """Identity centres with a decaying (power-law) PCA spectrum, as trained ReID embeddings have (a few
    hundred directions carry most of the variance), in a random basis; unit norm."""
    scale = (np.arange(1, dim + 1, dtype=np.float32) ** -spectrum)[None, :]
    z = rng.standard_normal((ids, dim), dtype=np.float32) * scale
    basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)).astype(np.float32))
    c = z @ basis.T
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def make_vectors(n: int, dim: int, ids: int, cameras: int, seed: int, chunk: int = 100_000,
                 noise: float = 0.6, cam_scale: float = 0.35) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, dim) float32 unit vectors, their identity and camera; identities are contiguous blocks."""
    rng = np.random.default_rng(seed)
    centres = _centres(rng, ids, dim)
    cam_off = rng.standard_normal((cameras, dim), dtype=np.float32)
    cam_off *= cam_scale / np.linalg.norm(cam_off, axis=1, keepdims=True)
    pid = (np.arange(n) * ids // n).astype(np.int64)
    cam = rng.integers(0, cameras, n)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        x = centres[pid[s:e]] + cam_off[cam[s:e]]
        x += rng.standard_normal((e - s, dim), dtype=np.float32) * (noise / np.sqrt(dim))
        out[s:e] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out, pid, cam


def queries_like(n: int, dim: int, ids: int, cameras: int, seed: int, q: int) -> np.ndarray:
    """`q` fresh crops of stored identities (same centres: same seed, then another noise stream)."""
    rng = np.random.default_rng(seed)
    centres = _centres(rng, ids, dim)
    cam_off = rng.standard_normal((cameras, dim), dtype=np.float32)
    cam_off *= 0.35 / np.linalg.norm(cam_off, axis=1, keepdims=True)
    r2 = np.random.default_rng(seed + 1)
    x = centres[r2.integers(0, ids, q)] + cam_off[r2.integers(0, cameras, q)]
    x += r2.standard_normal((q, dim), dtype=np.float32) * (0.6 / np.sqrt(dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact_topk(x: np.ndarray, q: np.ndarray, k: int, allowed: np.ndarray | None = None) -> np.ndarray:
    """Exact top-k ids (row numbers of `x`) of each query, among `allowed` rows when given."""
    exact = VectorIndex.exact(x.shape[1])
    if allowed is None:
        exact.add(x)
    else:
        exact.add(x[allowed], allowed.astype(np.int64))
    return exact.search(q, k)[1]


def latencies(g: Gallery, q: np.ndarray, k: int, clients: int, search_kw: dict[str, Any]
              ) -> tuple[list[float], float, np.ndarray]:
    """(per-query latencies in ms, queries per second, (Q, k) ids) of `g.search` with `clients` threads sharing
    the gallery, each taking every `clients`-th query."""
    lat: list[list[float]] = [[] for _ in range(clients)]
    found = np.full((len(q), k), -1, np.int64)

    def client(c: int) -> None:
        for i in range(c, len(q), clients):
            t = time.perf_counter()
            hits = g.search(q[i:i + 1], k=k, **search_kw)[0]
            lat[c].append((time.perf_counter() - t) * 1000)
            found[i, :len(hits)] = [h.id for h in hits]

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return [v for part in lat for v in part], len(q) / wall, found


def recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean fraction of the exact top-k found."""
    return float(np.mean([len(set(found[i]) & set(truth[i][truth[i] >= 0])) / k for i in range(len(found))]))


def bench_backend(backend: str, target: Any, cfg: Any, x: np.ndarray, pid: np.ndarray, cam: np.ndarray,
                  q: np.ndarray, truth: dict[str, np.ndarray], args: argparse.Namespace) -> dict[str, Any]:
    """One backend's row of the comparison (see the module docstring); `target` a folder or a database URI."""
    if backend == "faiss":
        params = IndexParams(kind="ivfpq", nlist=args.nlist, m=args.m)
        search_kw: dict[str, Any] = {"nprobe": args.faiss_nprobe}
    else:
        params = IndexParams(kind="hnsw", m=args.hnsw_m, ef_construction=args.ef_construction)
        search_kw = {"nprobe": args.ef_search}
    records = [CropRecord(path=f"/synthetic/{i:07d}_c{c + 1}.jpg", sha256=f"{i:064x}", camid=int(c),
                          timestamp=float(i), identity=int(p)) for i, (p, c) in enumerate(zip(pid, cam))]
    t0 = time.perf_counter()
    with Gallery.staging(target, cfg, index=params, camera_num=args.cameras, overwrite=True) as g:
        g.add_features(records, x, fingerprint=g.fingerprint)
    row: dict[str, Any] = {"backend": backend, "build_seconds": round(time.perf_counter() - t0, 1)}
    del records
    g = Gallery.open(target, verify=False)
    info = g.info()
    row.update(index=info["index"]["kind"], search=search_kw, bytes_per_crop=round(info["bytes_per_crop"], 1))
    filters = {"none": {}, "camera+time": {"cameras": [0, 1], "time_window": (0, args.n // 2)}}
    for name, flt in filters.items():
        g.search(q[:5], k=args.k, **search_kw, **flt)  # warm-up (connections, caches)
        for clients in (1, 8):
            lat, qps, found = latencies(g, q, args.k, clients, {**search_kw, **flt})
            key = f"{name}/{clients}c"
            row[key] = {"recall@10": round(recall(found, truth[name], args.k), 4),
                        "p50_ms": round(float(np.percentile(lat, 50)), 2),
                        "p99_ms": round(float(np.percentile(lat, 99)), 2), "qps": round(qps, 1)}
            print(json.dumps({"backend": backend, key: row[key]}), flush=True)
    extra = make_vectors(args.add, args.dim, args.ids, args.cameras, args.seed + 7)[0]
    more = [CropRecord(path=f"/synthetic/add/{i:07d}_c1.jpg", sha256=f"{args.n + i:064x}", camid=0,
                       timestamp=float(args.n + i)) for i in range(args.add)]
    t0 = time.perf_counter()
    g.add_features(more, extra, fingerprint=g.fingerprint)
    secs = time.perf_counter() - t0
    row["incremental_add"] = {"crops": args.add, "seconds": round(secs, 2),
                              "crops_per_second": round(args.add / secs, 1)}
    g.close()
    return row


def compare(args: argparse.Namespace, backends: list[str]) -> dict[str, Any]:
    """The faiss / PostgreSQL comparison table (see the module docstring)."""
    res: dict[str, Any] = {"n": args.n, "dim": args.dim, "ids": args.ids, "cameras": args.cameras,
                           "queries": args.queries, "k": args.k, "cpu_count": os.cpu_count(),
                           "load_average_at_start": os.getloadavg()}
    t0 = time.perf_counter()
    x, pid, cam = make_vectors(args.n, args.dim, args.ids, args.cameras, args.seed)
    q = queries_like(args.n, args.dim, args.ids, args.cameras, args.seed, args.queries)
    res["generate_seconds"] = round(time.perf_counter() - t0, 1)
    allowed = np.flatnonzero(np.isin(cam, [0, 1]) & (np.arange(args.n) <= args.n // 2))
    truth = {"none": exact_topk(x, q, args.k), "camera+time": exact_topk(x, q, args.k, allowed)}
    res["filter"] = {"cameras": [0, 1], "time_window": [0, args.n // 2], "selectivity": round(len(allowed) / args.n, 4)}
    cfg = load_cfg("configs/market1501_stm.yml", ["MODEL.DEVICE", "cpu", "MODEL.PRETRAIN_CHOICE", "none"])
    tmp = tempfile.mkdtemp(prefix="bench-gallery-", dir=args.dir)
    server = None
    try:
        rows = []
        for backend in backends:
            if backend == "faiss":
                target: Any = Path(tmp) / "g"
            else:
                uri = args.pg_uri
                if not uri:
                    import pgserver  # the postgres extra; only this backend needs it

                    server = pgserver.get_server(Path(tmp) / "pgdata", cleanup_mode="stop")
                    uri = server.get_uri()
                target = f"{uri}{'&' if '?' in uri else '?'}gallery=bench"
            rows.append(bench_backend(backend, target, cfg, x, pid, cam, q, truth, args))
            res["load_average_after_" + backend] = os.getloadavg()
        res["table"] = rows
    finally:
        if server is not None:
            server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--ids", type=int, default=50_000)
    ap.add_argument("--cameras", type=int, default=8)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--nlist", type=int, default=0, help="0: the gallery's automatic choice")
    ap.add_argument("--m", type=int, default=0, help="PQ sub-quantizers, 0: the gallery's automatic choice (D/8)")
    ap.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--refine", type=int, nargs="+", default=[0, 5, 10])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="where to build the gallery (default: a temporary dir)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--backend", choices=("faiss", "postgres", "both"), default="faiss",
                    help="faiss: the IVF-PQ sweep; postgres / both: the comparison table")
    ap.add_argument("--pg-uri", default="", help="PostgreSQL database (default: a private pgserver)")
    ap.add_argument("--faiss-nprobe", type=int, default=32, help="the folder gallery's nprobe in the table")
    ap.add_argument("--hnsw-m", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=64)
    ap.add_argument("--ef-search", type=int, default=40)
    ap.add_argument("--add", type=int, default=2000, help="crops of the incremental add after the build")
    args = ap.parse_args()
    if args.backend != "faiss":
        res = compare(args, ["faiss", "postgres"] if args.backend == "both" else ["postgres"])
        text = json.dumps(res, indent=1)
        print(text)
        if args.out:
            Path(args.out).write_text(text)
        return

    res: dict = {"n": args.n, "dim": args.dim, "ids": args.ids, "cameras": args.cameras, "queries": args.queries,
                 "k": args.k, "threads": faiss.omp_get_max_threads(), "cpu_count": os.cpu_count(),
                 "stored_feature": "768-d TransReID global (b1) feature, L2-normalised, float32 queries"}
    t0 = time.perf_counter()
    x, pid, cam = make_vectors(args.n, args.dim, args.ids, args.cameras, args.seed)
    q = queries_like(args.n, args.dim, args.ids, args.cameras, args.seed, args.queries)
    res["generate_seconds"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    exact = VectorIndex.exact(args.dim)  # the same wrapper as evaluation and the gallery
    exact.add(x)
    _, gt = exact.search(q, args.k)
    res["exact_search_seconds_all_queries"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    for i in range(min(20, len(q))):
        exact.search(q[i:i + 1], args.k)
    res["exact_flat_ms_per_query"] = round((time.perf_counter() - t0) / min(20, len(q)) * 1000, 2)
    del exact

    tmp = tempfile.TemporaryDirectory(prefix="bench-gallery-", dir=args.dir)
    cfg = load_cfg("configs/market1501_stm.yml", ["MODEL.DEVICE", "cpu", "MODEL.PRETRAIN_CHOICE", "none"])
    params = IndexParams(kind="ivfpq", nlist=args.nlist, m=args.m)
    g = Gallery.create(Path(tmp.name) / "g", cfg, index=params, camera_num=args.cameras)
    records = [CropRecord(path=f"/synthetic/{i:07d}_c{c + 1}.jpg", sha256=f"{i:064x}", camid=int(c),
                          timestamp=float(i), identity=int(p)) for i, (p, c) in enumerate(zip(pid, cam))]
    t0 = time.perf_counter()
    g.add_features(records, x, fingerprint=g.fingerprint)
    res["build_seconds"] = round(time.perf_counter() - t0, 1)
    del records
    info = g.info()
    res["index"] = info["index"]
    manifest = g.manifest
    res["bytes"] = {f["name"]: f["bytes"] for f in manifest["files"] + manifest["segment_files"]}
    res["bytes_per_crop"] = {
        "total": round(info["bytes"] / args.n, 1),
        "faiss_index": round(res["bytes"]["index.faiss"] / args.n, 1),
        "sqlite_metadata": round(res["bytes"]["meta.sqlite"] / args.n, 1),
        "float16_rerank_vectors": round(sum(f["bytes"] for f in manifest["segment_files"]) / args.n, 1),
    }
    t0 = time.perf_counter()
    g = Gallery.open(g.root, verify=True)
    res["open_verify_seconds"] = round(time.perf_counter() - t0, 1)

    idx = g.index
    runs = []
    for refine in args.refine:
        for nprobe in args.nprobe:
            lat = []
            found = np.empty((len(q), args.k), np.int64)
            for i in range(len(q)):
                t = time.perf_counter()
                _, ids = idx.search(q[i:i + 1], args.k, None, nprobe=nprobe, refine=refine)
                lat.append((time.perf_counter() - t) * 1000)
                found[i] = ids[0]
            recall = np.mean([len(set(found[i]) & set(gt[i])) / args.k for i in range(len(q))])
            run = {"nprobe": nprobe, "refine": refine, "recall@10": round(float(recall), 4),
                   "p50_ms": round(float(np.percentile(lat, 50)), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2)}
            runs.append(run)
            print(json.dumps(run), flush=True)
    res["runs"] = runs
    ok = [r for r in runs if r["recall@10"] >= 0.95 and r["p50_ms"] < 20]
    res["chosen"] = min(ok, key=lambda r: r["p50_ms"]) if ok else None
    # End to end through the public API (features in, ranked crops with metadata out), chosen setting.
    if res["chosen"]:
        lat = []
        for i in range(min(200, len(q))):
            t = time.perf_counter()
            g.search(q[i:i + 1], k=args.k, nprobe=res["chosen"]["nprobe"])
            lat.append((time.perf_counter() - t) * 1000)
        res["api_search_p50_ms_default_refine"] = round(float(np.percentile(lat, 50)), 2)
        lat = []
        for i in range(min(200, len(q))):
            t = time.perf_counter()
            g.search(q[i:i + 1], k=args.k, nprobe=res["chosen"]["nprobe"], exclude_same_camera=True, camids=[0])
            lat.append((time.perf_counter() - t) * 1000)
        res["api_search_filtered_p50_ms"] = round(float(np.percentile(lat, 50)), 2)
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    g.close()
    tmp.cleanup()


if __name__ == "__main__":
    main()
