"""MERGE.TARGET_LATENCY_MS for an exported model: each candidate setting of the method's knob is exported and
timed on an ONNX runtime, with the chooser of `reid_lite.compress.latency`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..compress.latency import LatencyChoice, choose_on_model, measure_latency
from .export import FeatureGraph, build_metadata, example_inputs, trace_to_onnx, write_metadata
from .runtime import open_runtime

logger = logging.getLogger(__name__)


def choose_r_on_runtime(model: nn.Module, cfg: Any, backend: str, workdir: str | Path,
                        batch_size: int | None = None, threads: int = 0) -> LatencyChoice:
    """MERGE.TARGET_LATENCY_MS for an ONNX runtime: each candidate setting of the method's knob is exported to
    `workdir` and timed on `backend` ('onnxruntime' or 'openvino') at `batch_size` (default TEST.IMS_PER_BATCH).

    An export takes a while (about a minute for ViT-B on two cores) and the search needs a handful;
    the chosen schedule is attached to `model` (`merge_setting`, `merge_r`), ready for `export_onnx`.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    bs = int(batch_size or cfg.TEST.IMS_PER_BATCH)
    model = model.cpu().eval()
    count = [0]

    def measure() -> float:
        graph = FeatureGraph(model)
        example = example_inputs(graph, cfg)
        with torch.inference_mode():
            graph(*example)  # eager first: fills the merging caches with real tensors
        count[0] += 1
        path = workdir / f"latency_{count[0]}.onnx"
        with torch.no_grad():
            trace_to_onnx(graph, example, path)
        write_metadata(path, build_metadata(model, cfg, int(model.base.cam_num)))
        runtime = open_runtime(backend, path, threads)
        images, *ids = example_inputs(graph, cfg, bs)
        labels = dict(zip([{"camera": "cam_label", "view": "view_label"}[n] for n in graph.inputs[1:]], ids))
        ms = measure_latency(lambda: runtime(images, **labels), iters=5, warmup=1)["p50_ms"]
        logger.info("candidate %d on %s at batch %d: %.1f ms", count[0], backend, bs, ms)
        return ms

    choice, _ = choose_on_model(model, cfg, measure)
    logger.info("%s at batch %d on %s", choice.describe(), bs, backend)
    return choice
