#!/usr/bin/env python
"""Throughput and peak memory of TransReID with each registered merging method, same batch.

    python tools/benchmark.py --config configs/msmt17_base.yml --batch-size 32 --out output/bench.json
    python tools/benchmark.py --device cuda --dtype bf16 --batch-size 256 --compile
    python tools/benchmark.py --methods none,stm,mine MERGE.PLUGINS "['my_method.py']"

--methods takes any registered method (default: all of them, plugins included) and the named STM
variants below. GFLOPs are the capacity count (what runs); methods that may leave slots empty also
report the mean effective GFLOPs per image, from one extra (untimed) pass over the batch.

Each method runs in its own child process (same weights seed, same batch): peak memory is then the
method's own (CUDA: max_memory_allocated; CPU: growth of the process's peak RSS during the timed runs).
Throughput is batch / median time of a forward pass after warm-up. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from reid_lite import build_model, load_cfg
from reid_lite.merging import method_names
from reid_lite.utils.flops import effective_gflops, transreid_gflops

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# Named option variants, run on request (--methods); every registered method runs under its own name.
VARIANTS = {
    "stm_tracked": ["MERGE.METHOD", "stm", "MERGE.STM.COORDS", "tracked"],
    "stm_normalized": ["MERGE.METHOD", "stm", "MERGE.STM.ENTROPY", "normalized"],
}


def method_overrides(name: str) -> list[str]:
    """MERGE overrides of a --methods entry: a registered method or a named variant."""
    return VARIANTS.get(name, ["MERGE.METHOD", name])


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(args: argparse.Namespace, method: str) -> dict:
    """Time one method in this process: warm-up, then `iters` timed forward passes."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    cfg = load_cfg(args.config, [*args.opts, *method_overrides(method)])
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=1, camera_num=2, view_num=0).eval().to(device)
    gflops = transreid_gflops(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch_size, 3, *cfg.INPUT.SIZE_TEST, generator=g).to(device)
    # Camera ids stay on the CPU, as the extractor passes them: the model range-checks them there and copies
    # them over without waiting on the device (ids already on a GPU would cost a sync for that check in eval).
    cams = torch.randint(0, 2, (args.batch_size,), generator=g)
    effective = gflops  # equal unless a reducer may leave slots empty
    if any(r.may_empty for r in model.reducers.values()):
        effective = effective_gflops(model, x, cam_label=cams)[0]
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    run = torch.compile(model) if args.compile else model
    dtype = DTYPES[args.dtype]

    def forward():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return run(x, cam_label=cams)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        forward()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_mb()
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        forward()
        sync()  # once per timed pass: the timing needs it; the model itself never syncs
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _rss_mb() - rss_before
    med = statistics.median(times)
    return {
        "method": method,
        "gflops": gflops,
        "effective_gflops": effective,
        "images_per_s": args.batch_size / med,
        "ms_per_batch_median": 1e3 * med,
        "ms_per_batch_min": 1e3 * min(times),
        "ms_per_batch_max": 1e3 * max(times),
        "peak_memory_mb": peak,
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "CPU peak RSS growth",
    }


def _child(args: argparse.Namespace, method: str, queue: mp.Queue) -> None:
    try:
        queue.put(measure(args, method))
    except Exception as e:  # report, do not hang the parent
        queue.put({"method": method, "error": f"{type(e).__name__}: {e}"})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/msmt17_base.yml")
    p.add_argument("--methods", default="", help="comma separated registered methods or variants "
                   f"({', '.join(VARIANTS)}); default: every registered method")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--batch-size", type=int, default=None, help="default: 256 on GPU, 32 on CPU")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--out", default="output/benchmark.json")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args(argv)
    args.batch_size = args.batch_size or (256 if args.device.startswith("cuda") else 32)
    try:
        load_cfg(args.config, args.opts)  # a bad config fails here, once; loads MERGE.PLUGINS' methods
    except (FileNotFoundError, KeyError, ValueError, AssertionError) as err:
        p.error(str(err))
    methods = [m.strip().lower() for m in args.methods.split(",") if m.strip()] or method_names()
    unknown = [m for m in methods if m not in method_names() and m not in VARIANTS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {', '.join([*method_names(), *VARIANTS])}")

    ctx = mp.get_context("spawn")
    results = []
    for method in methods:
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(args, method, queue))
        proc.start()
        res = queue.get()
        proc.join()
        results.append(res)
        if "error" in res:
            print(f"{method}: {res['error']}", file=sys.stderr)
            continue
        eff = f" (effective {res['effective_gflops']:.2f})" if res["effective_gflops"] != res["gflops"] else ""
        print(f"{method:15s} {res['gflops']:6.2f} GFLOPs{eff}  {res['images_per_s']:9.1f} img/s  "
              f"{res['ms_per_batch_median']:9.1f} ms/batch  peak {res['peak_memory_mb']:8.1f} MB", flush=True)
    base = next((r for r in results if r["method"] == "none" and "error" not in r), None)
    for r in results:
        if base and "error" not in r:
            r["speedup_vs_none"] = r["images_per_s"] / base["images_per_s"]
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu"
    report = {
        "config": args.config, "opts": args.opts, "device": args.device, "device_name": device_name,
        "cpu_count": mp.cpu_count(), "threads": args.threads or torch.get_num_threads(), "dtype": args.dtype,
        "batch_size": args.batch_size, "iters": args.iters, "warmup": args.warmup, "compile": args.compile,
        "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    for r in results:
        if "speedup_vs_none" in r:
            print(f"{r['method']:15s} speed-up vs none: {r['speedup_vs_none']:.3f}x")
    print(f"wrote {args.out}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
