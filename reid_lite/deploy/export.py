"""ONNX export of the eval model with its token merging, with parity verified before the file is kept.

    report = export_onnx(model, cfg, "model.onnx", camera_num=6)   # raises ExportError on failure
    print(report.summary())

The graph takes `images` (B, 3, H, W) float32, preprocessed as the file's metadata says, and `camera`
(B,) int64 when the model has a camera SIE (`view` likewise), with a dynamic batch B; it returns
`features` (B, D), the model's eval feature before L2 normalisation. The schedule is fixed, so every
shape inside depends on B alone. Merge steps use exportable ops only (reid_lite.merging.exportable).

Parity: the same synthetic pedestrians (several cameras in one batch) go through PyTorch and through
each runtime, at the whole batch and at batch 1 (the dynamic batch); cosine, max relative difference,
merging-decision flips and top-10 rankings must meet the criteria of reid_lite.deploy.parity, else
the file is moved aside and ExportError is raised.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..compress.flops import transreid_gflops
from ..data.synthetic_batch import synthetic_test_batch
from ..merging import token_counts
from ..models.fingerprint import model_fingerprint
from .parity import MIN_COSINE, ParityReport, compare_features, self_flips
from .runtime import METADATA_KEY, open_runtime

logger = logging.getLogger(__name__)

OPSET = 18  # ReduceMax with axes as an input and ScatterElements' add reduction


class ExportError(RuntimeError):
    """The export failed, or the exported file's features do not match PyTorch's."""


class ExportRefused(ExportError):
    """The model's configuration cannot be exported; the message names the reason."""


def export_refusal(model: nn.Module) -> str | None:
    """Why `model` (a TransReID with its reducers) cannot be exported, or None when it can.

    Each method decides on its reducers (`TokenReducer.export_refusal`, None when exportable), so a
    plugin declares it the same way as the built-in ones (STM refuses tracked coordinates). The source
    map (MERGE.TRACE_SOURCE) is a visualisation side output that a feature graph does not return.
    """
    reasons: dict[str, list[int]] = {}  # the same reason for many blocks is named once, with its blocks
    for i, reducer in sorted(getattr(model, "reducers", {}).items()):
        why = getattr(reducer, "export_refusal", None)
        if why:
            reasons.setdefault(str(why), []).append(i + 1)
    out = [f"blocks {blocks}: {why}" for why, blocks in reasons.items()]
    if getattr(model, "trace_source", False):
        out.append("MERGE.TRACE_SOURCE keeps a visualisation-only source map that the exported graph cannot "
                       "return; export with MERGE.TRACE_SOURCE False")
    if not hasattr(model, "reducible_blocks"):
        out.append(f"{type(model).__name__} is not a reid_lite TransReID")
    return "; ".join(out) or None


class FeatureGraph(nn.Module):
    """The eval forward as the exported graph sees it: positional inputs (images[, camera][, view])."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        base = model.base
        self.inputs = ["images"] + (["camera"] if base.cam_num else []) + (["view"] if base.view_num else [])

    def forward(self, images: torch.Tensor, *ids: torch.Tensor) -> torch.Tensor:
        """Features (B, D) of preprocessed images and their ids, in the order of `self.inputs`."""
        labels = dict(zip(self.inputs[1:], ids))
        return self.model(images, cam_label=labels.get("camera"), view_label=labels.get("view"))


@dataclass
class ExportReport:
    """What `export_onnx` produced: the file, its metadata, parity per runtime and timings."""

    path: Path
    metadata: dict[str, Any]
    parity: list[ParityReport] = field(default_factory=list)
    export_seconds: float = 0.0

    def summary(self) -> str:
        """Human-readable lines: the file, the schedule, parity per runtime."""
        meta = self.metadata
        lines = [f"wrote {self.path} ({self.path.stat().st_size / 2**20:.1f} MiB, exported in "
                 f"{self.export_seconds:.1f} s): merging {meta['merging']['description']}, "
                 f"feature {meta['feature']['dim']}-d, inputs {', '.join(meta['inputs'])}"]
        lines += [f"parity {p.line()}" for p in self.parity]
        return "\n".join(lines)


def _merging_description(model: nn.Module) -> dict[str, Any]:
    reducers = model.reducers
    blocks = model.reducible_blocks
    counts = token_counts(model.base.patch_embed.num_patches + 1, len(blocks), reducers)
    method = type(next(iter(reducers.values()))).__name__ if reducers else "none"
    layers = sorted(i + 1 for i in reducers)
    desc = "none" if not reducers else f"{method} in blocks {layers}, tokens {counts[0][0]} -> {counts[-1][1]}"
    return {"description": desc, "reducer": method, "blocks": layers,
            "tokens": [list(c) for c in counts], "prop_attn": bool(model.prop_attn)}


def build_metadata(model: nn.Module, cfg: Any, camera_num: int) -> dict[str, Any]:
    """The metadata stored in the ONNX file: inputs and their preprocessing, feature layout, merging
    schedule, GFLOPs and the model fingerprint (the gallery's, for the full feature)."""
    base = model.base
    dim = int(model.in_planes)
    inputs: dict[str, Any] = {"images": {
        "shape": ["batch", 3, *map(int, cfg.INPUT.SIZE_TEST)], "dtype": "float32", "layout": "NCHW RGB",
        "size": [int(s) for s in cfg.INPUT.SIZE_TEST], "pixel_mean": [float(v) for v in cfg.INPUT.PIXEL_MEAN],
        "pixel_std": [float(v) for v in cfg.INPUT.PIXEL_STD],
        "preprocess": "resize to size (bilinear, antialiased), RGB / 255, then (x - pixel_mean) / pixel_std"}}
    if base.cam_num:
        inputs["camera"] = {"shape": ["batch"], "dtype": "int64", "num": int(base.cam_num),
                            "meaning": "0-based camera id, one per image (SIE)"}
    if base.view_num:
        inputs["view"] = {"shape": ["batch"], "dtype": "int64", "num": int(base.view_num),
                          "meaning": "0-based view id, one per image (SIE)"}
    jpm = bool(getattr(model, "jpm", False))
    neck = str(getattr(model, "neck_feat", "before"))
    layout = (f"[global {dim}, 4 JPM parts x {dim} divided by 4]" if jpm else f"[global {dim}]")
    return {
        "format": 1,
        "inputs": inputs,
        "output": "features",
        "feature": {"dim": int(model.feature_dim), "embed_dim": dim, "jpm": jpm, "neck_feat": neck,
                    "layout": f"{layout}, {'after' if neck == 'after' else 'before'} the BNNeck, not normalised "
                              "(reid_lite L2-normalises when TEST.FEAT_NORM is yes)"},
        "merging": _merging_description(model),
        "gflops": float(transreid_gflops(model)),
        "fingerprint": model_fingerprint(cfg, model, "full", camera_num),
        "exporter": {"torch": torch.__version__, "opset": OPSET,
                     "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
    }


def write_metadata(path: Path, metadata: dict[str, Any]) -> None:
    """Store `metadata` as JSON in the ONNX file's metadata_props (key 'reid_lite'), replacing any."""
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata, sort_keys=True)
    proto.doc_string = ("reid_lite TransReID feature extractor; see metadata_props['reid_lite'] for inputs, "
                        "preprocessing, feature layout and merging schedule")
    onnx.save(proto, str(path))


def trace_to_onnx(graph: FeatureGraph, example: tuple[torch.Tensor, ...], path: Path) -> None:
    """torch.onnx.export (dynamo) of `graph` with a dynamic batch; ExportError naming the failing op."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    # Positional, as forward(images, *ids) takes them: the ids (if any) form one tuple argument.
    dynamic = ({0: batch},) + ((tuple({0: batch} for _ in example[1:]),) if len(example) > 1 else ())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter, not about this model
        try:
            torch.onnx.export(graph, example, str(path), dynamo=True, input_names=graph.inputs,
                              output_names=["features"], dynamic_shapes=dynamic,
                              opset_version=OPSET, optimize=True, verbose=False, external_data=False)
        except Exception as exc:  # the exporter raises many types; one clear error names the op
            first = str(exc).strip().splitlines()
            detail = next((ln for ln in first if "No ONNX function" in ln or "Error" in ln), first[0] if first else "")
            raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {detail.strip()[:500]}") from exc


def check_parity(path: str | Path, reference: torch.Tensor, images: torch.Tensor, labels: dict[str, torch.Tensor],
                 backends: tuple[str, ...] = ("onnxruntime", "openvino"), min_cosine: float = MIN_COSINE,
                 batch_sizes: tuple[int, ...] = (0, 1)) -> list[ParityReport]:
    """Run the exported file on each runtime and compare with PyTorch's `reference` features.

    labels: `cam_label` / `view_label` ids of the images. batch_sizes: chunk sizes the images are fed
    in (0: all at once); batch 1 exercises the dynamic batch dimension of the same file. The report
    of each runtime is its worst batch size's.
    """
    reports = []
    for backend in backends:
        runtime = open_runtime(backend, path)
        sizes = [b or len(images) for b in batch_sizes]
        candidates = []
        for bs in sizes:
            feats = torch.cat([runtime(images[s:s + bs], **{k: v[s:s + bs] for k, v in labels.items()})
                               for s in range(0, len(images), bs)])
            candidates.append(compare_features(backend, reference, feats, sizes, min_cosine))
        reports.append(min(candidates, key=lambda r: (r.passed, r.min_cosine)))
    return reports


def example_inputs(graph: FeatureGraph, cfg: Any, batch: int = 2) -> tuple[torch.Tensor, ...]:
    """Random inputs of `batch` images (and camera/view ids) for tracing or timing `graph`."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, *map(int, cfg.INPUT.SIZE_TEST), generator=g)
    return (images, *(torch.zeros(batch, dtype=torch.long) for _ in graph.inputs[1:]))


def export_onnx(model: nn.Module, cfg: Any, path: str | Path, camera_num: int = 0, *,
                backends: tuple[str, ...] = ("onnxruntime", "openvino"), parity_count: int = 12,
                min_cosine: float = MIN_COSINE) -> ExportReport:
    """Export `model` (a TransReID in eval mode, reducers attached) to `path` and verify it.

    Raises ExportRefused when the configuration cannot be exported, ExportError when the exporter
    fails or parity with PyTorch is not met on any runtime in `backends` (the file is then renamed
    `<path>.failed.onnx` for inspection). `camera_num` is recorded in the fingerprint (SIE table size).
    """
    reason = export_refusal(model)
    if reason:
        raise ExportRefused(f"cannot export this model: {reason}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    graph = FeatureGraph(model)
    cams = max(1, int(model.base.cam_num or model.base.view_num or 1))
    images, cam_ids = synthetic_test_batch(cfg, parity_count, num_cameras=cams)
    ids = tuple(cam_ids for _ in graph.inputs[1:])
    labels = dict(zip([{"camera": "cam_label", "view": "view_label"}[n] for n in graph.inputs[1:]], ids))
    with torch.inference_mode():
        # Eager first: the reference, and it fills the merging caches (e.g. STM's virtual-grid
        # neighbourhoods) with real tensors, which the exporter then embeds as constants.
        reference = graph(images, *ids)
    t0 = time.perf_counter()
    logger.info("exporting %s to %s", _merging_description(model)["description"], path)
    with torch.no_grad():
        trace_to_onnx(graph, (images[:2], *(i[:2] for i in ids)), path)
    seconds = time.perf_counter() - t0
    metadata = build_metadata(model, cfg, camera_num or int(model.base.cam_num))
    write_metadata(path, metadata)
    reports = check_parity(path, reference, images, labels, backends, min_cosine)
    flips = self_flips(lambda x: graph(x, *ids), images, reference)
    for r in reports:
        r.torch_self_flips = flips
    metadata["parity"] = [r.to_dict() for r in reports]
    failed = [r for r in reports if not r.passed]
    if failed:
        bad = path.with_suffix(".failed.onnx")
        path.replace(bad)
        raise ExportError("parity with PyTorch not met, file moved to " + str(bad) + ": "
                          + " | ".join(r.line() for r in failed))
    write_metadata(path, metadata)
    report = ExportReport(path, metadata, reports, seconds)
    for r in reports:
        logger.info("parity %s", r.line())
    return report


def parity_table(reports: list[ParityReport]) -> str:
    """Markdown table of parity reports."""
    rows = ["| backend | images | cosine min | cosine mean | max rel diff | max rel diff w/o flips | decision flips "
            "(PyTorch itself) | same top-10 |", "|---|---|---|---|---|---|---|---|"]
    for r in reports:
        rows.append(f"| {r.backend} | {r.images} | {r.min_cosine:.6f} | {r.mean_cosine:.6f} | {r.max_rel_diff:.2e} | "
                    f"{r.max_rel_diff_rounding:.2e} | {len(r.flipped)} ({r.torch_self_flips}) | "
                    f"{r.ranking_same}/{r.ranked} |")
    return "\n".join(rows)


__all__ = ["ExportError", "ExportRefused", "ExportReport", "FeatureGraph", "build_metadata", "check_parity",
           "export_onnx", "export_refusal", "parity_table"]
