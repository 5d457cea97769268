"""Inference backends for an exported model: ONNX Runtime (CPU) and OpenVINO (CPU).

A `RuntimeModel` is called as a TransReID is, `model(images, cam_label=..., view_label=...)` -> (B, D)
features, so feature extraction, `tools/test.py` and the gallery use it unchanged. Everything it needs
(input size, normalisation, cameras, merging, the model fingerprint) comes from the file's metadata.

    model = load_runtime_model(cfg)           # MODEL.BACKEND onnxruntime|openvino, MODEL.ONNX_PATH
    feats = model(images, cam_label=cams)
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..utils.files import sha256_file

#: MODEL.BACKEND values.
BACKENDS = ("torch", "onnxruntime", "openvino")
#: Key of the JSON metadata in the ONNX file's metadata_props.
METADATA_KEY = "reid_lite"


class DeployError(RuntimeError):
    """An exported model cannot be used as configured (missing file, foreign file, config mismatch)."""


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The reid_lite metadata of an exported ONNX file (DeployError when absent)."""
    import onnx

    path = Path(path)
    if path.is_dir():
        raise DeployError(f"ONNX file {path} is a folder: MODEL.ONNX_PATH names the exported .onnx file")
    if not path.is_file():
        raise DeployError(f"ONNX file not found: {path} (export one with tools/export.py)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError, onnx's own errors: the bytes are not an ONNX model
        raise DeployError(f"{path} is not a readable ONNX file ({path.stat().st_size} bytes; truncated or "
                          f"not ONNX: {_first_line(err)}); export it again with tools/export.py") from None
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise DeployError(f"{path} has no reid_lite metadata: export it with tools/export.py")
    try:
        meta = json.loads(props[METADATA_KEY])
        for key in ("inputs", "feature", "fingerprint"):
            meta[key]  # noqa: B018 (what every reader of the metadata indexes)
    except (ValueError, KeyError, TypeError) as err:
        raise DeployError(f"{path}: its reid_lite metadata is malformed ({type(err).__name__}: {err}); export it "
                          "again with tools/export.py") from None
    return meta


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


class RuntimeModel(nn.Module):
    """An exported model run by a runtime. Subclasses implement `_run(feeds) -> features`."""

    backend = ""

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        super().__init__()
        self.path = Path(path)
        self.meta = read_metadata(self.path)
        self.digest = sha256_file(self.path)
        self.threads = int(threads)
        cam = self.meta["inputs"].get("camera")
        view = self.meta["inputs"].get("view")
        # The attributes feature extraction reads from a TransReID (SIE sizes, feature size).
        self.cam_num = int(cam["num"]) if cam else 0
        self.view_num = int(view["num"]) if view else 0
        self.feature_dim = int(self.meta["feature"]["dim"])
        self.in_planes = int(self.meta["feature"]["embed_dim"])
        self.gflops = self.meta.get("gflops")

    def forward(self, images: torch.Tensor, cam_label: torch.Tensor | None = None,
                view_label: torch.Tensor | None = None) -> torch.Tensor:
        """Features (B, D) float32 on `images`' device, from preprocessed images (B, 3, H, W)."""
        size = tuple(self.meta["inputs"]["images"]["size"])
        if tuple(images.shape[1:]) != (3, *size):
            raise ValueError(f"input of shape {tuple(images.shape)}; this model takes (B, 3, {size[0]}, {size[1]})")
        feeds = {"images": images.detach().float().cpu().numpy()}
        for name, label in (("camera", cam_label), ("view", view_label)):
            if name in self.meta["inputs"]:
                if label is None:
                    raise ValueError(f"this model uses side-information embedding: pass {name} ids")
                feeds[name] = label.detach().cpu().numpy().astype(np.int64).reshape(-1)
        return torch.from_numpy(np.asarray(self._run(feeds), dtype=np.float32)).to(images.device)

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def deployed_fingerprint(self, cfg: Any, feature: str) -> dict[str, Any]:
        """The gallery fingerprint of this model: the exported model's, with the file's digest and backend.

        A gallery built with one backend refuses queries from another (their features differ in the
        last bits, and merging decisions can flip), and from any other file.
        """
        fp = copy.deepcopy(self.meta["fingerprint"])
        fp["feature"] = {"kind": feature, "dim": self.in_planes if feature == "global" else self.feature_dim,
                         "normalisation": "l2", "flip": bool(cfg.TEST.FLIP)}
        fp["backend"] = {"name": self.backend, "model": "sha256:" + self.digest}
        return fp

    def extra_repr(self) -> str:
        return f"backend={self.backend}, path={self.path}"


class OnnxRuntimeModel(RuntimeModel):
    """ONNX Runtime on the CPU (all graph optimisations on)."""

    backend = "onnxruntime"

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        super().__init__(path, threads)
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads
        opts.log_severity_level = 3  # constant-folding notes on every load say nothing actionable
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime's Fail / InvalidGraph / ... for a graph it cannot load
            raise DeployError(f"{self.path}: ONNX Runtime cannot load it ({_first_line(err)})") from None
        self.input_names = {i.name for i in self.session.get_inputs()}

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        # An input the graph does not use (e.g. camera ids of a model that ignores them) is not fed.
        return self.session.run(None, {k: v for k, v in feeds.items() if k in self.input_names})[0]


class OpenVINOModel(RuntimeModel):
    """OpenVINO on the CPU, at fp32 (OpenVINO would pick bf16 on CPUs that have it; parity is fp32's)."""

    backend = "openvino"

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        super().__init__(path, threads)
        import openvino as ov

        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        try:
            self.compiled = ov.Core().compile_model(str(self.path), "CPU", config)
        except Exception as err:  # OpenVINO raises RuntimeError subclasses for a graph it cannot read
            raise DeployError(f"{self.path}: OpenVINO cannot load it ({_first_line(err)})") from None
        self.input_names = {n for i in self.compiled.inputs for n in i.get_names()}
        self.request = self.compiled.create_infer_request()

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        out = self.request.infer({k: v for k, v in feeds.items() if k in self.input_names})
        return np.array(out[self.compiled.outputs[0]])


RUNTIMES: dict[str, type[RuntimeModel]] = {"onnxruntime": OnnxRuntimeModel, "openvino": OpenVINOModel}


def open_runtime(backend: str, path: str | Path, threads: int = 0) -> RuntimeModel:
    """A RuntimeModel for `backend` ('onnxruntime' or 'openvino') on the ONNX file at `path`."""
    if backend not in RUNTIMES:
        raise ValueError(f"unknown backend {backend!r}; runtimes for ONNX files: {', '.join(RUNTIMES)}")
    return RUNTIMES[backend](path, threads)


def _cfg_value(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def config_mismatches(meta: dict[str, Any], cfg: Any) -> list[str]:
    """What in `cfg` contradicts the exported model: input size and normalisation, merging settings.

    A config whose MERGE section differs from the file's would label results with a method the file
    does not run; a different input size or normalisation would feed it the wrong pixels.
    """
    out = []
    images = meta["inputs"]["images"]
    for key, field_ in (("size", "SIZE_TEST"), ("pixel_mean", "PIXEL_MEAN"), ("pixel_std", "PIXEL_STD")):
        want = [float(v) for v in cfg.INPUT[field_]]
        if [float(v) for v in images[key]] != want:
            out.append(f"INPUT.{field_} {want} != the file's {images[key]}")
    merging = meta["fingerprint"]["merging"]
    if str(cfg.MERGE.METHOD).lower() != merging["method"]:
        out.append(f"MERGE.METHOD {str(cfg.MERGE.METHOD).lower()!r} != the file's {merging['method']!r}")
        return out
    for key, value in merging.items():
        if key in ("method", "r_solved") or key.upper() not in cfg.MERGE:
            continue  # solved values and fields a config cannot set are the file's to decide
        node = cfg.MERGE[key.upper()]
        if isinstance(value, dict):
            for sub, sub_value in value.items():
                if sub in node and _cfg_value(node[sub]) != sub_value:
                    out.append(f"MERGE.{key.upper()}.{sub} {_cfg_value(node[sub])!r} != the file's {sub_value!r}")
        elif _cfg_value(node) != value:
            out.append(f"MERGE.{key.upper()} {_cfg_value(node)!r} != the file's {value!r}")
    return out


def load_runtime_model(cfg: Any, threads: int = 0) -> RuntimeModel:
    """The exported model that MODEL.BACKEND (onnxruntime|openvino) and MODEL.ONNX_PATH name, checked
    against `cfg` (DeployError naming every mismatch). With TEST.WEIGHT set, the file must have been
    exported from that checkpoint."""
    backend = str(cfg.MODEL.BACKEND).lower()
    if backend not in BACKENDS:
        raise ValueError(f"unknown MODEL.BACKEND {cfg.MODEL.BACKEND!r}; one of {', '.join(BACKENDS)}")
    if backend == "torch":
        raise ValueError("MODEL.BACKEND torch runs the PyTorch model: build it with reid_lite.build_model")
    if not cfg.MODEL.ONNX_PATH:
        raise DeployError(f"MODEL.BACKEND {backend} needs MODEL.ONNX_PATH (export one with tools/export.py)")
    meta = read_metadata(cfg.MODEL.ONNX_PATH)
    problems = config_mismatches(meta, cfg)
    if cfg.TEST.WEIGHT:
        weights = "sha256:" + sha256_file(cfg.TEST.WEIGHT)
        if meta["fingerprint"]["weights"] != weights:
            problems.append(f"TEST.WEIGHT {cfg.TEST.WEIGHT} is not the checkpoint the file was exported from "
                            f"({meta['fingerprint']['weights']})")
    if problems:
        raise DeployError(f"{cfg.MODEL.ONNX_PATH} does not match the config: " + "; ".join(problems))
    return open_runtime(backend, cfg.MODEL.ONNX_PATH, threads)
