#!/usr/bin/env python
"""Latency and throughput of TransReID with each registered merging method, per backend and batch.

    python tools/benchmark.py --config configs/msmt17_base.yml --backend torch onnxruntime openvino \
        --batch-size 1 8 32 --out output/bench.json
    python tools/benchmark.py --device cuda --dtype bf16 --backend torch compile --batch-size 256
    python tools/benchmark.py --methods none,stm,mine MERGE.PLUGINS "['my_method.py']"
    python tools/benchmark.py --methods all --budget 15.53 --fvcore --batch-size 8 --out output/budget_vitb.json

--budget GFLOPS (or a share of the unmerged model, 75%) sets every method's knob to that budget within
1% (MERGE.TARGET_GFLOPS; reid_lite.merging.budget): the solved setting is recorded per row. Image-dependent
methods (ATM) are matched on effective GFLOPs over MERGE.CALIBRATION_IMAGES seeded synthetic pedestrians,
the same in every child process. --fvcore adds fvcore's count beside the analytic one (they must agree).

--methods takes any registered method (default: all of them, plugins included) and the named STM
variants below. GFLOPs are the capacity count (what runs); methods that may leave slots empty also
report the mean effective GFLOPs per image, from one extra (untimed) pass over the batch.

Backends: torch (eager), compile (torch.compile), onnxruntime and openvino (CPU; each method is
exported once to --onnx-dir with tools/export.py's verified export, and the same file serves every
batch size). Each (method, backend, batch) runs in its own child process with the same weights and
inputs: per-batch latency p50/p90 over --iters timed passes after --warmup, images/s = batch / p50,
and peak memory (CUDA: max_memory_allocated; CPU: growth of the process's peak RSS). Writes JSON and
prints a table; `speedup_vs_none` compares with no merging on the same backend and batch size. A method
whose export is refused (it names the reason, e.g. STM with tracked coordinates) is reported as refused
on the ONNX backends and still timed on the PyTorch ones.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from reid_lite import build_model, load_cfg
from reid_lite.deploy.latency import measure_latency
from reid_lite.merging import get_method, method_names
from reid_lite.merging.budget import budget_label, resolve_budget
from reid_lite.utils.cli import USER_ERRORS, cli_error
from reid_lite.utils.files import check_output_dir, check_output_file
from reid_lite.utils.flops import effective_gflops, fvcore_gflops, transreid_gflops

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKENDS = ("torch", "compile", "onnxruntime", "openvino")
ONNX_BACKENDS = ("onnxruntime", "openvino")

# Named option variants, run on request (--methods); every registered method runs under its own name.
VARIANTS = {
    "stm_tracked": ["MERGE.METHOD", "stm", "MERGE.STM.COORDS", "tracked"],
    "stm_normalized": ["MERGE.METHOD", "stm", "MERGE.STM.ENTROPY", "normalized"],
}
CAMERAS = 2


def method_overrides(name: str, target_gflops: float = 0.0) -> list[str]:
    """MERGE overrides of a --methods entry (a registered method or a named variant), with a GFLOPs budget
    for the methods that declare a knob (the others, 'none', run as they are: the reference)."""
    opts = VARIANTS.get(name, ["MERGE.METHOD", name])
    if target_gflops > 0 and get_method(opts[1]).budget_knob is not None:
        opts = [*opts, "MERGE.TARGET_GFLOPS", target_gflops]
    return opts


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model(args: argparse.Namespace, method: str):
    # Timing needs no trained weights: every method gets the same seeded random ones (and the
    # exported file's fingerprint says so, rather than naming a checkpoint that was not loaded).
    cfg = load_cfg(args.config, [*args.opts, *method_overrides(method, args.target_gflops), "TEST.WEIGHT", ""])
    torch.manual_seed(0)
    return cfg, build_model(cfg, num_classes=1, camera_num=CAMERAS, view_num=0).eval()


def _onnx_path(args: argparse.Namespace, method: str) -> Path:
    return Path(args.onnx_dir) / f"{Path(args.config).stem or 'default'}_{method}.onnx"


def export_method(args: argparse.Namespace, method: str) -> dict:
    """Export one method's model (parity verified on the ONNX backends benchmarked); a refusal is returned
    as {"refused": reason}."""
    from reid_lite.deploy import export_onnx, export_refusal

    torch.set_num_threads(args.threads or torch.get_num_threads())
    cfg, model = _model(args, method)
    refusal = export_refusal(model)
    if refusal:
        return {"method": method, "refused": refusal}
    backends = tuple(b for b in args.backend if b in ONNX_BACKENDS)
    report = export_onnx(model, cfg, _onnx_path(args, method), CAMERAS, backends=backends)
    return {"method": method, "path": str(report.path), "export_seconds": report.export_seconds,
            "parity": [p.to_dict() for p in report.parity]}


def measure(args: argparse.Namespace, method: str, backend: str, batch: int) -> dict:
    """Time one (method, backend, batch) in this process: warm-up, then `iters` timed forward passes."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    cfg, model = _model(args, method)
    gflops = transreid_gflops(model)
    budget = model.merge_budget.to_dict() if model.merge_budget is not None else None
    fvcore = fvcore_gflops(model) if args.fvcore else None
    device = torch.device(args.device if backend in ("torch", "compile") else "cpu")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, *cfg.INPUT.SIZE_TEST, generator=g)
    cams = torch.randint(0, CAMERAS, (batch,), generator=g)
    effective = gflops  # equal unless a reducer may leave slots empty
    if budget is not None and budget["matched"] == "effective":
        effective = budget["effective_gflops"]  # over the calibration images the budget was matched on
    elif any(r.may_empty for r in model.reducers.values()):
        effective = effective_gflops(model, x, cam_label=cams)[0]
    dtype = DTYPES[args.dtype] if backend in ("torch", "compile") else None
    if backend in ONNX_BACKENDS:
        from reid_lite.deploy import open_runtime

        del model
        run = open_runtime(backend, _onnx_path(args, method), threads=args.threads)
    else:
        model = model.to(device)
        # Camera ids stay on the CPU, as the extractor passes them: the model range-checks them there and copies
        # them over without waiting on the device (ids already on a GPU would cost a sync for that check).
        x = x.to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        run = torch.compile(model) if backend == "compile" else model

    def forward():
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return run(x, cam_label=cams)

    sync = torch.cuda.synchronize if device.type == "cuda" else None
    if device.type == "cuda":
        forward()
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_mb()
    lat = measure_latency(forward, iters=args.iters, warmup=args.warmup, sync=sync)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _rss_mb() - rss_before
    return {
        "method": method, "backend": backend, "batch_size": batch, "gflops": gflops, "effective_gflops": effective,
        "fvcore_gflops": fvcore, "budget": budget,
        "images_per_s": 1e3 * batch / lat["p50_ms"], **lat, "peak_memory_mb": peak,
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "CPU peak RSS growth",
        "device": str(device), "dtype": args.dtype if dtype is not None else "fp32",
    }


def _child(fn, queue: mp.Queue, *a) -> None:
    try:
        queue.put(fn(*a))
    except Exception as e:  # report, do not hang the parent
        queue.put({"error": f"{type(e).__name__}: {e}"})


def _in_child(ctx, fn, *a) -> dict:
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, queue, *a))
    proc.start()
    res = queue.get()
    proc.join()
    return res


def table(results: list[dict]) -> str:
    """Markdown table: method x backend x batch with p50/p90 latency, img/s and speed-up vs none."""
    lines = ["| method | backend | batch | GFLOPs | fvcore | p50 ms | p90 ms | img/s | vs none | setting (error) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r or "refused" in r:
            why = f"error: {r['error'][:60]}" if "error" in r else "export refused"
            lines.append(f"| {r['method']} | {r['backend']} | {r['batch_size']} | {why} | | | | | | |")
            continue
        gflops = f"{r['gflops']:.2f}"
        if r["effective_gflops"] != r["gflops"]:
            gflops += f" (eff. {r['effective_gflops']:.2f})"
        fvcore = "-" if r.get("fvcore_gflops") is None else f"{r['fvcore_gflops']:.2f}"
        setting = budget_label(r.get("budget"))
        lines.append(f"| {r['method']} | {r['backend']} | {r['batch_size']} | {gflops} | {fvcore} | "
                     f"{r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['images_per_s']:.1f} | "
                     f"{r.get('speedup_vs_none', float('nan')):.2f}x | {setting} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Export (ONNX backends), time every (method, backend, batch) and write the JSON; the exit code."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/msmt17_base.yml")
    p.add_argument("--methods", default="", help="comma separated registered methods or variants "
                   f"({', '.join(VARIANTS)}); default: every registered method")
    p.add_argument("--backend", nargs="+", default=["torch"], choices=BACKENDS,
                   help="torch (eager), compile (torch.compile), onnxruntime / openvino (CPU, exported file)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device of the torch and compile backends (the ONNX runtimes run on the CPU)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="autocast dtype of torch/compile")
    p.add_argument("--batch-size", type=int, nargs="+", default=None, help="default: 256 on GPU, 32 on CPU")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="CPU threads of torch and the runtimes (0: default)")
    p.add_argument("--onnx-dir", default="output/bench_onnx", help="where the ONNX files are exported")
    p.add_argument("--out", default="output/benchmark.json")
    p.add_argument("--budget", default="", help="GFLOPs per image for every method (within 1%%, through its knob), "
                   "e.g. 15.53 (the paper's, ViT-B) or 75%% of the unmerged model")
    p.add_argument("--fvcore", action="store_true", help="also count each model's GFLOPs with fvcore")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args(argv)
    batches = args.batch_size or [256 if args.device.startswith("cuda") else 32]
    if any(b < 1 for b in batches):
        return cli_error("--batch-size values must be >= 1")
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError) as err:
        return cli_error(f"--device {args.device!r} is not a device ({err}); use cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        # Checked here, once: each child process would otherwise fail with CUDA's own traceback.
        return cli_error(f"--device {args.device}: CUDA is not available on this machine (torch "
                         f"{torch.__version__}, no GPU found); use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        return cli_error(f"--device {args.device}: this machine has {torch.cuda.device_count()} GPU(s)")
    try:
        load_cfg(args.config, args.opts)  # a bad config fails here, once; loads MERGE.PLUGINS' methods
        # Output paths before any work: the runs take minutes and the report is written last.
        check_output_file(args.out, "--out")
        if any(b in ONNX_BACKENDS for b in args.backend):
            check_output_dir(args.onnx_dir, "--onnx-dir")
    except USER_ERRORS as err:
        return cli_error(err)
    methods = [m.strip().lower() for m in args.methods.split(",") if m.strip()] or method_names()
    if "all" in methods:
        methods = list(dict.fromkeys(n for m in methods for n in (method_names() if m == "all" else [m])))
    unknown = [m for m in methods if m not in method_names() and m not in VARIANTS]
    if unknown:
        return cli_error(f"unknown methods {unknown}; choose from all, {', '.join([*method_names(), *VARIANTS])}")
    args.target_gflops = 0.0
    if args.budget:
        knobs = [m for m in methods if get_method(method_overrides(m)[1]).budget_knob is not None]
        if not knobs:  # the report would name a budget that no row ran under
            return cli_error(f"--budget {args.budget}: none of the methods ({', '.join(methods)}) has a GFLOPs "
                             "knob (MERGE.METHOD none merges nothing): add merging methods to --methods")
        try:
            _, unmerged = _model(args, "none")
            args.target_gflops = resolve_budget(args.budget, unmerged)
        except USER_ERRORS as err:
            return cli_error(err)
        print(f"budget: {args.target_gflops:.4g} GFLOPs per image ({args.budget})", flush=True)

    ctx = mp.get_context("spawn")
    exports, results = {}, []
    for method in methods:
        if any(b in ONNX_BACKENDS for b in args.backend):
            print(f"exporting {method} to {_onnx_path(args, method)} ...", flush=True)
            exports[method] = _in_child(ctx, export_method, args, method)
            if "error" in exports[method]:
                print(f"{method}: export failed: {exports[method]['error']}", file=sys.stderr)
            elif "refused" in exports[method]:
                print(f"{method}: export refused: {exports[method]['refused']}", file=sys.stderr)
        for backend in args.backend:
            for batch in batches:
                if backend in ONNX_BACKENDS and "error" in exports[method]:
                    res = {"error": "export failed"}
                elif backend in ONNX_BACKENDS and "refused" in exports[method]:
                    res = {"refused": exports[method]["refused"]}
                else:
                    res = _in_child(ctx, measure, args, method, backend, batch)
                res = {"method": method, "backend": backend, "batch_size": batch, **res}
                results.append(res)
                if "error" in res or "refused" in res:
                    if "error" in res:
                        print(f"{method} {backend} b{batch}: {res['error']}", file=sys.stderr)
                    continue
                eff = f" (effective {res['effective_gflops']:.2f})" if res["effective_gflops"] != res["gflops"] else ""
                if res.get("fvcore_gflops") is not None:
                    eff += f" fvcore {res['fvcore_gflops']:.2f}"
                print(f"{method:14s} {backend:11s} b{batch:<4d} {res['gflops']:6.2f} GFLOPs{eff}  "
                      f"p50 {res['p50_ms']:9.1f} ms  p90 {res['p90_ms']:9.1f} ms  {res['images_per_s']:9.1f} img/s",
                      flush=True)
    for r in results:
        base = next((b for b in results if b["method"] == "none" and b["backend"] == r["backend"]
                     and b["batch_size"] == r["batch_size"] and "p50_ms" in b), None)
        if base and "p50_ms" in r:
            r["speedup_vs_none"] = r["images_per_s"] / base["images_per_s"]
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu"
    report = {
        "config": args.config, "opts": args.opts, "device": args.device, "device_name": device_name,
        "cpu_count": mp.cpu_count(), "threads": args.threads or torch.get_num_threads(), "dtype": args.dtype,
        "backends": args.backend, "batch_sizes": batches, "iters": args.iters, "warmup": args.warmup,
        "budget": {"spec": args.budget, "target_gflops": args.target_gflops} if args.budget else None,
        "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "exports": exports,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(table(results))
    print(f"wrote {args.out}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
