"""Benchmark of `reid-gallery serve` (not a test): request latency p50/p99 under concurrent clients.

    python tools/bench_serve.py --n 100000 --clients 8 --out bench_serve.json

A gallery of `--n` crops is built through the public API from precomputed synthetic features
(`Gallery.create` + `Gallery.add_features`, the clustered 768-d vectors of tools/bench_gallery.py, the
stored size of a ViT-B TransReID global feature) with the default index policy. The server runs as
`reid-gallery serve` in its own process on loopback; `--clients` threads here send requests back to back
(keep-alive) for `--seconds` per kind of request:

    crop_id            GET  /api/crops/{id}/search?k=10          stored feature: index + metadata + HTTP
    crop_id_filtered   the same with exclude_same_camera and a time window
    upload             POST /api/search?k=10&camera=0, a 256x128 JPEG (embedded by the model: ViT-B with
                       STM-ReID, random weights, on the CPU; the ranking is meaningless, the cost is real)

Latency is measured by the client (request sent to answer read). The JSON records the machine's load
average before and after: on a shared machine the numbers are noisy.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from reid_lite.config import load_cfg  # noqa: E402  (the repository first on the path)
from reid_lite.index.gallery import Gallery  # noqa: E402
from reid_lite.index.server import bind  # noqa: E402
from reid_lite.index.store import CropRecord  # noqa: E402


def _free_port() -> int:
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    return port


def _jpeg(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (256, 128, 3), dtype=np.uint8)).save(out, "JPEG")
    return out.getvalue()


def run_clients(url: str, clients: int, seconds: float, request) -> dict:
    """`clients` threads calling request(session, rng) back to back for `seconds`: latency percentiles."""
    import requests

    lat: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        rng = np.random.default_rng(i)
        with requests.Session() as s:
            while time.monotonic() < stop:
                t = time.perf_counter()
                r = request(s, rng)
                lat[i].append((time.perf_counter() - t) * 1000)
                errors[i] += r.status_code != 200
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    all_lat = np.concatenate([np.asarray(x) for x in lat]) if any(lat) else np.zeros(0)
    return {"requests": int(all_lat.size), "errors": int(sum(errors)), "seconds": round(wall, 1),
            "requests_per_second": round(all_lat.size / wall, 1),
            "p50_ms": round(float(np.percentile(all_lat, 50)), 1) if all_lat.size else None,
            "p99_ms": round(float(np.percentile(all_lat, 99)), 1) if all_lat.size else None,
            "mean_ms": round(float(all_lat.mean()), 1) if all_lat.size else None}


def main(argv: list[str] | None = None) -> int:
    """Build the gallery, start the server, measure; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0, help="per kind of request")
    ap.add_argument("--upload-seconds", type=float, default=20.0)
    ap.add_argument("--cameras", type=int, default=8)
    ap.add_argument("--dir", default=None, help="where to build the gallery (default: a temporary dir)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    import requests
    from bench_gallery import make_vectors

    res: dict = {"n": args.n, "clients": args.clients, "cpu_count": os.cpu_count(),
                 "load_average_before": [round(x, 2) for x in os.getloadavg()],
                 "note": "shared machine (other jobs running): latencies are noisy, an upper bound"}
    tmp = tempfile.TemporaryDirectory(prefix="bench-serve-", dir=args.dir)
    root = Path(tmp.name) / "g"
    cfg = load_cfg(str(REPO / "configs/market1501_stm.yml"), ["MODEL.DEVICE", "cpu", "MODEL.PRETRAIN_CHOICE", "none"])
    g = Gallery.create(root, cfg, camera_num=args.cameras)
    x, pid, cam = make_vectors(args.n, g.dim, max(1, args.n // 20), args.cameras, seed=0)
    records = [CropRecord(path=f"/synthetic/{i:07d}_c{c + 1}.jpg", sha256=f"{i:064x}", camid=int(c),
                          timestamp=float(i), identity=int(p)) for i, (p, c) in enumerate(zip(pid, cam))]
    t0 = time.perf_counter()
    g.add_features(records, x, fingerprint=g.fingerprint)
    res["build_seconds"] = round(time.perf_counter() - t0, 1)
    res["index"] = g.info()["index"]
    res["dim"] = g.dim
    g.close()
    del x, records

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(Path(tmp.name) / "server.log", "w+")  # a file, not a pipe: an unread pipe would block the server
    server = subprocess.Popen([sys.executable, "-m", "reid_lite.index.cli", "serve", str(root), "--port", str(port)],
                              env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if requests.get(url + "/api/info", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                print(log.read()[-3000:], file=sys.stderr)
                raise SystemExit("the server did not start")
            time.sleep(0.5)
        n = args.n
        images = [_jpeg(i) for i in range(16)]
        kinds = {
            "crop_id": lambda s, rng: s.get(f"{url}/api/crops/{int(rng.integers(n))}/search", params={"k": 10},
                                            timeout=120),
            "crop_id_filtered": lambda s, rng: s.get(
                f"{url}/api/crops/{int(rng.integers(n))}/search", timeout=120,
                params={"k": 10, "exclude_same_camera": "true", "time_from": n // 4, "time_to": 3 * n // 4}),
            "upload": lambda s, rng: s.post(f"{url}/api/search", params={"k": 10, "camera": 0},
                                            data=images[int(rng.integers(len(images)))], timeout=120),
        }
        res["runs"] = {}
        for name, request in kinds.items():
            run_clients(url, 2, 2.0, request)  # warm-up (caches, lazy metadata columns)
            seconds = args.upload_seconds if name == "upload" else args.seconds
            res["runs"][name] = run = run_clients(url, args.clients, seconds, request)
            print(name, json.dumps(run), flush=True)
    finally:
        server.terminate()
        server.wait(30)
        log.close()
        tmp.cleanup()
    res["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
