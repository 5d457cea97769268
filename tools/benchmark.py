#!/usr/bin/env python
"""Latency and throughput of TransReID with each registered merging method, per backend and batch.

    python tools/benchmark.py --config configs/msmt17_base.yml --backend torch onnxruntime openvino \
        --batch-size 1 8 32 --out output/bench.json
    python tools/benchmark.py --device cuda --dtype bf16 --backend torch compile --batch-size 256
    python tools/benchmark.py --methods none,stm,mine MERGE.PLUGINS "['my_method.py']"
    python tools/benchmark.py --methods all --budget 15.53 --fvcore --batch-size 8 --out output/budget_vitb.json

--budget GFLOPS (or a share of the unmerged model, 75%) sets every method's knob to that budget within
1% (MERGE.TARGET_GFLOPS; reid_lite.compress.budget): the solved setting is recorded per row. Image-dependent
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
import os
import platform
import queue as queue_module
import resource
import signal
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from reid_lite import build_model, load_cfg
from reid_lite.build import build_model_for_checkpoint
from reid_lite.cli import (
    USER_ERRORS,
    add_config_arg,
    add_malloc_arg,
    add_opts_arg,
    add_threads_arg,
    cli_error,
    set_malloc,
    tool_parser,
)
from reid_lite.compress.budget import budget_label, resolve_budget, synthetic_calibration
from reid_lite.compress.flops import effective_gflops, fvcore_gflops, transreid_gflops
from reid_lite.compress.latency import measure_latency
from reid_lite.deploy import export_onnx, export_refusal, open_runtime
from reid_lite.merging import get_method, method_names
from reid_lite.utils.files import check_output_dir, check_output_file

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


def _cfg(args: argparse.Namespace, method: str):
    return load_cfg(args.config, [*args.opts, *method_overrides(method, args.target_gflops), "TEST.WEIGHT", ""])


def _model(args: argparse.Namespace, method: str):
    # Timing needs no trained weights: every method gets the same seeded random ones (and the exported file's
    # fingerprint says so, rather than naming a checkpoint that was not loaded). --weights loads a checkpoint
    # instead (image-dependent methods merge differently on trained weights; their budgets are solved again).
    cfg = _cfg(args, method)
    torch.manual_seed(0)
    if getattr(args, "weights", ""):
        model = build_model_for_checkpoint(cfg, args.weights, 1, camera_num=CAMERAS)
    else:
        model = build_model(cfg, num_classes=1, camera_num=CAMERAS, view_num=0)
    return cfg, model.eval()


def _onnx_path(args: argparse.Namespace, method: str) -> Path:
    return Path(args.onnx_dir) / f"{Path(args.config).stem or 'default'}_{method}.onnx"


def setup_process(args: argparse.Namespace) -> None:
    """What every (spawned) process of the benchmark sets first: torch's CPU threads and the malloc setting."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    set_malloc(args.system_malloc)


def export_method(args: argparse.Namespace, method: str) -> dict:
    """Export one method's model (parity verified on the ONNX backends benchmarked); a refusal is returned
    as {"refused": reason}."""
    setup_process(args)
    cfg, model = _model(args, method)
    refusal = export_refusal(model)
    if refusal:
        return {"method": method, "refused": refusal}
    backends = tuple(b for b in args.backend if b in ONNX_BACKENDS)
    report = export_onnx(model, cfg, _onnx_path(args, method), CAMERAS, backends=backends)
    return {"method": method, "path": str(report.path), "export_seconds": report.export_seconds,
            "parity": [p.to_dict() for p in report.parity]}


def bench_inputs(args: argparse.Namespace, cfg, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The timed batch and its camera ids, the same for every method: seeded noise (`--inputs random`) or
    seeded synthetic pedestrians (`--inputs pedestrians`), on which image-dependent methods (ATM) merge as
    they would on crops, and which their effective-GFLOPs budgets are matched on."""
    if args.inputs == "pedestrians":
        calib = synthetic_calibration(cfg, batch, CAMERAS)
        return calib.images, calib.cams
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, *cfg.INPUT.SIZE_TEST, generator=g)
    return x, torch.randint(0, CAMERAS, (batch,), generator=g)


def prepare(args: argparse.Namespace, method: str, backend: str, batch: int,
            inputs: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[dict, Callable[[], Any], Callable | None]:
    """Build one method's model for timing: (its report fields, a forward over the batch, the device sync).

    `inputs` (images, camera ids) lets several methods share one batch; default: `bench_inputs`.
    """
    cfg, model = _model(args, method)
    gflops = transreid_gflops(model)
    budget = model.merge_budget.to_dict() if model.merge_budget is not None else None
    fvcore = fvcore_gflops(model) if args.fvcore else None
    device = torch.device(args.device if backend in ("torch", "compile") else "cpu")
    x, cams = inputs if inputs is not None else bench_inputs(args, cfg, batch)
    effective = gflops  # equal unless a reducer may leave slots empty
    if any(r.may_empty for r in model.reducers.values()):
        effective = effective_gflops(model, x, cam_label=cams)[0]  # on the timed images themselves
    dtype = DTYPES[args.dtype] if backend in ("torch", "compile") else None
    if backend in ONNX_BACKENDS:
        del model
        run = open_runtime(backend, _onnx_path(args, method), threads=args.threads)
    else:
        pure = DTYPES[args.dtype] if args.pure else None
        model, x = to_device(model, device, pure_dtype=pure), to_device(x, device, pure_dtype=pure)
        run = torch.compile(model) if backend == "compile" else model
    # Camera ids stay on the CPU, as the extractor passes them: the model range-checks them there and copies
    # them over without waiting on the device (ids already on a GPU are checked by an asynchronous assert).
    use_autocast = dtype is not None and not args.pure

    def forward():
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=use_autocast):
            return run(x, cam_label=cams)

    sync = device_sync(device)
    info = {
        "method": method, "backend": backend, "batch_size": batch, "gflops": gflops, "effective_gflops": effective,
        "fvcore_gflops": fvcore, "budget": budget, "device": str(device), "inputs": args.inputs,
        "dtype": ("pure " if args.pure and dtype is not None else "") + (args.dtype if dtype is not None else "fp32"),
    }
    return info, forward, sync


def to_device(obj, device: torch.device, pure_dtype: torch.dtype | None = None):
    """A model or an image batch on `device`; on CUDA in channels-last memory layout (the patch-embedding
    convolution's fast path there); with `pure_dtype` the model's floating-point weights and the images cast to
    it (no autocast: every op runs in that dtype; the merge decisions still take fp32)."""
    obj = obj.to(device)
    if pure_dtype is not None:
        obj = obj.to(dtype=pure_dtype)
    if device.type == "cuda":
        if isinstance(obj, torch.nn.Module):
            return obj.to(memory_format=torch.channels_last)
        return obj.contiguous(memory_format=torch.channels_last)
    return obj


def device_sync(device: torch.device) -> Callable[[], None] | None:
    """What makes a timed call include the device's work: `torch.cuda.synchronize` on CUDA, nothing on the
    CPU (its execution is synchronous)."""
    return torch.cuda.synchronize if device.type == "cuda" else None


def peak_memory_reset(device: torch.device) -> float:
    """Start a peak-memory measurement; returns the CPU baseline (peak RSS, MB) to subtract later."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return _rss_mb()


def peak_memory_mb(device: torch.device, rss_before: float) -> tuple[float, str]:
    """(peak memory in MB since `peak_memory_reset`, what kind of peak it is)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20, "cuda max_memory_allocated"
    return _rss_mb() - rss_before, "CPU peak RSS growth"


def measure(args: argparse.Namespace, method: str, backend: str, batch: int) -> dict:
    """Time one (method, backend, batch) in this process: warm-up, then `iters` timed forward passes."""
    setup_process(args)
    info, forward, sync = prepare(args, method, backend, batch)
    device = torch.device(info["device"])
    if sync is not None:
        forward()  # the first call allocates the caching allocator's pool: not part of the peak
    rss_before = peak_memory_reset(device)
    lat = measure_latency(forward, iters=args.iters, warmup=args.warmup, sync=sync)
    peak, kind = peak_memory_mb(device, rss_before)
    return {**info, "images_per_s": 1e3 * batch / lat["p50_ms"], **lat, "peak_memory_mb": peak,
            "peak_memory_kind": kind}


def measure_interleaved(args: argparse.Namespace, methods: list[str], backend: str, batch: int) -> list[dict]:
    """Time every method in this one process, in alternating rounds, so that load from other work on a shared
    machine falls on all of them alike: each round times one forward of every method (the order reversed every
    other round), `args.iters` rounds after `args.warmup` untimed ones. Per method: the median latency over the
    rounds and, when 'none' is among them, `speedup_vs_none` = the median over rounds of none's time / its
    time (the ratio within a round is what interleaving protects). Peak memory is not measured here (the
    models share one process)."""
    setup_process(args)
    shared = None
    runs = {}
    for method in methods:
        if shared is None:
            shared = bench_inputs(args, _cfg(args, method), batch)
        runs[method] = prepare(args, method, backend, batch, shared)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for i in range(args.warmup + max(1, args.iters)):
        for method in (methods if i % 2 == 0 else methods[::-1]):
            _, forward, sync = runs[method]
            t0 = time.perf_counter()
            forward()
            if sync is not None:
                sync()
            if i >= args.warmup:
                times[method].append(1e3 * (time.perf_counter() - t0))
    rows = []
    for method in methods:
        t = sorted(times[method])
        p90 = t[min(len(t) - 1, round(0.9 * (len(t) - 1)))]
        row = {**runs[method][0], "p50_ms": statistics.median(t), "p90_ms": p90, "min_ms": t[0], "max_ms": t[-1],
               "iters": len(t), "interleaved": True, "times_ms": times[method]}
        row["images_per_s"] = 1e3 * batch / row["p50_ms"]
        if "none" in times:
            row["speedup_vs_none"] = statistics.median(a / b for a, b in zip(times["none"], times[method]))
        rows.append(row)
    return rows


def _child(fn, queue: mp.Queue, *a) -> None:
    try:
        queue.put(fn(*a))
    except Exception as e:  # report, do not hang the parent
        queue.put({"error": f"{type(e).__name__}: {e}"})


def _in_child(ctx, fn, *a, poll_s: float = 1.0) -> Any:
    """`fn(*a)` in a fresh process of `ctx`; its result, or {'error': ...} when it raised or died without one
    (killed, out of memory, a crash in native code): waiting for a dead child's result would hang the run."""
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, queue, *a))
    proc.start()
    while True:
        try:
            res = queue.get(timeout=poll_s)
            break
        except queue_module.Empty:
            if proc.is_alive():
                continue
            try:  # it may have put its result just before exiting
                res = queue.get(timeout=poll_s)
            except queue_module.Empty:
                res = {"error": f"the measuring process died without a result ({_exit_text(proc.exitcode)})"}
            break
    proc.join()
    return res


def _exit_text(code: int | None) -> str:
    """'exit code 1', or 'killed by SIGKILL' for a process a signal ended."""
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


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


def _report_row(res: dict, method: str, backend: str, batch: int) -> dict:
    """One result row, printed as it comes (errors to stderr)."""
    res = {"method": method, "backend": backend, "batch_size": batch, **res}
    if "error" in res:
        print(f"{method} {backend} b{batch}: {res['error']}", file=sys.stderr)
    if "error" in res or "refused" in res:
        return res
    eff = f" (effective {res['effective_gflops']:.2f})" if res["effective_gflops"] != res["gflops"] else ""
    if res.get("fvcore_gflops") is not None:
        eff += f" fvcore {res['fvcore_gflops']:.2f}"
    print(f"{method:14s} {backend:11s} b{batch:<4d} {res['gflops']:6.2f} GFLOPs{eff}  "
          f"p50 {res['p50_ms']:9.1f} ms  p90 {res['p90_ms']:9.1f} ms  {res['images_per_s']:9.1f} img/s", flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    """Export (ONNX backends), time every (method, backend, batch) and write the JSON; the exit code."""
    p = tool_parser(__doc__)
    add_config_arg(p, default="configs/msmt17_base.yml", help=None)
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
    add_threads_arg(p, help="CPU threads of torch and the runtimes (0: default)")
    add_malloc_arg(p)
    p.add_argument("--onnx-dir", default="output/bench_onnx", help="where the ONNX files are exported")
    p.add_argument("--out", default="output/benchmark.json")
    p.add_argument("--budget", default="", help="GFLOPs per image for every method (within 1%%, through its knob), "
                   "e.g. 15.53 (the paper's, ViT-B) or 75%% of the unmerged model")
    p.add_argument("--fvcore", action="store_true", help="also count each model's GFLOPs with fvcore")
    p.add_argument("--compile", action="store_true", help="time torch.compile'd models (the 'compile' backend; "
                   "replaces the default 'torch' backend, adds to an explicit --backend list)")
    p.add_argument("--pure", action="store_true", help="cast the weights to --dtype instead of autocasting "
                   "(pure bf16/fp16 weights)")
    p.add_argument("--interleave", action="store_true", help="time all methods in one process, in alternating "
                   "rounds (--iters rounds): fair ratios on a machine shared with other work")
    p.add_argument("--inputs", default="random", choices=("random", "pedestrians"), help="timed images: seeded "
                   "noise, or seeded synthetic pedestrians (what image-dependent methods such as ATM merge on)")
    p.add_argument("--weights", default="", help="a TransReID checkpoint to time instead of seeded random weights")
    add_opts_arg(p, help="KEY VALUE config overrides", remainder=True)
    args = p.parse_args(argv)
    if args.compile and "compile" not in args.backend:
        explicit = argv is not None and "--backend" in argv or argv is None and "--backend" in sys.argv
        args.backend = [*args.backend, "compile"] if explicit else ["compile"]
    if args.pure and args.dtype == "fp32":
        return cli_error("--pure needs --dtype bf16 or fp16")
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

    load_before = os.getloadavg()
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
        if args.interleave:
            continue  # timed together below
        for backend in args.backend:
            for batch in batches:
                if backend in ONNX_BACKENDS and "error" in exports[method]:
                    res = {"error": "export failed"}
                elif backend in ONNX_BACKENDS and "refused" in exports[method]:
                    res = {"refused": exports[method]["refused"]}
                else:
                    res = _in_child(ctx, measure, args, method, backend, batch)
                results.append(_report_row(res, method, backend, batch))
    if args.interleave:
        for backend in args.backend:
            timed = [m for m in methods if backend not in ONNX_BACKENDS or "path" in exports[m]]
            for method in methods:
                if method not in timed:
                    why = "export failed" if "error" in exports[method] else None
                    results.append(_report_row({"error": why} if why else {"refused": exports[method]["refused"]},
                                               method, backend, 0))
            for batch in batches:
                rows = _in_child(ctx, measure_interleaved, args, timed, backend, batch)
                rows = rows if isinstance(rows, list) else [rows] * len(timed)
                results += [_report_row(r, m, backend, batch) for r, m in zip(rows, timed)]
    for r in results:
        if "speedup_vs_none" in r:
            continue  # interleaved: the median of the per-round ratios
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
        "interleaved": args.interleave, "inputs": args.inputs, "weights": args.weights or None, "pure": args.pure,
        "system_malloc": args.system_malloc,  # False: freed buffers kept in the process (reid_lite.utils.malloc)
        # Other work on the machine while timing: the 1/5/15-minute load averages before and after.
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(table(results))
    print(f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, after "
          f"{report['loadavg_after'][0]:.2f} {report['loadavg_after'][1]:.2f} {report['loadavg_after'][2]:.2f}; "
          f"{report['cpu_count']} CPUs, {report['threads']} threads")
    print(f"wrote {args.out}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
