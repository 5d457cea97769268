"""Deployment: ONNX export with verified parity, and ONNX Runtime / OpenVINO inference backends.

    from reid_lite.deploy import export_onnx, load_runtime_model
    report = export_onnx(model, cfg, "model.onnx", camera_num=6)   # verified against PyTorch
    model = load_runtime_model(cfg)   # MODEL.BACKEND onnxruntime|openvino, MODEL.ONNX_PATH model.onnx

`tools/export.py` is the command line on top; `MODEL.BACKEND` selects the backend for feature
extraction, `tools/test.py` and `reid-gallery`.
"""

from .export import ExportError, ExportRefused, ExportReport, export_onnx, export_refusal, parity_table
from .parity import ParityReport, compare_features, same_ranking
from .runtime import (
    BACKENDS,
    DeployError,
    OnnxRuntimeModel,
    OpenVINOModel,
    RuntimeModel,
    load_runtime_model,
    open_runtime,
    read_metadata,
)

__all__ = [
    "BACKENDS",
    "DeployError",
    "ExportError",
    "ExportRefused",
    "ExportReport",
    "OnnxRuntimeModel",
    "OpenVINOModel",
    "ParityReport",
    "RuntimeModel",
    "compare_features",
    "export_onnx",
    "export_refusal",
    "load_runtime_model",
    "open_runtime",
    "parity_table",
    "read_metadata",
    "same_ranking",
]
