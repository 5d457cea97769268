"""Person detection with an SSD-style detector file (OpenVINO IR `.xml` + `.bin`, or ONNX), batched over frames.

The file's contract (Open Model Zoo's SSD detectors, e.g. pedestrian-detection-adas-0002): one input
`[N, 3, H, W]` taking BGR 0-255 pixels (no mean or scale: the model carries its own), one output
`[1, 1, R, 7]` of rows `[image_id, label, conf, x_min, y_min, x_max, y_max]` with the corners in [0, 1];
the rows after the first `image_id == -1` are padding. OpenVINO runs both formats (it reads ONNX too),
so there is one code path; a batch of N frames is one inference (the model is reshaped to batch N once;
a short last batch is padded with black frames whose rows are dropped).

A detector here is any callable `frames -> boxes`: a list of BGR frames in, one `(n, 5)` float32 array
`[x1, y1, x2, y2, conf]` in pixels per frame out. `SSDDetector` is the file-backed one; tests and
other models can pass their own callable to `reid_lite.video.ingest_video`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

__all__ = ["Detector", "DetectorError", "SSDDetector", "parse_ssd_output"]

#: frames (BGR uint8 HWC) -> per frame an (n, 5) float32 array [x1, y1, x2, y2, conf] in pixels.
Detector = Callable[[Sequence[np.ndarray]], list[np.ndarray]]


class DetectorError(ValueError):
    """A detector file that cannot be used: unreadable, or not of the documented SSD shape."""


def parse_ssd_output(out: np.ndarray, sizes: Sequence[tuple[int, int]], threshold: float,
                     labels: Sequence[int] | None = None) -> list[np.ndarray]:
    """Boxes per image from an SSD output `[..., 7]`: rows up to the first `image_id == -1`, confidence >=
    `threshold`, label in `labels` (all when None), corners scaled by each image's `(height, width)` of
    `sizes` and clipped to it. Returns one (n, 5) float32 `[x1, y1, x2, y2, conf]` array per image."""
    rows = np.asarray(out, dtype=np.float32).reshape(-1, 7)
    end = np.flatnonzero(rows[:, 0] == -1)
    if end.size:
        rows = rows[: end[0]]
    keep = rows[:, 2] >= threshold
    if labels is not None:
        keep &= np.isin(rows[:, 1].astype(np.int64), np.asarray(list(labels), dtype=np.int64))
    rows = rows[keep]
    ids = rows[:, 0].astype(np.int64)
    result = []
    for i, (h, w) in enumerate(sizes):
        r = rows[ids == i]
        scale = np.array([w, h, w, h], dtype=np.float32)
        boxes = np.clip(r[:, 3:7], 0.0, 1.0) * scale
        ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        result.append(np.concatenate([boxes[ok], r[ok, 2:3]], axis=1).astype(np.float32))
    return result


class SSDDetector:
    """An SSD-style detector file (OpenVINO IR `.xml` with its `.bin`, or `.onnx`) run with OpenVINO on the CPU.

        det = SSDDetector("pedestrian-detection-adas-0002.xml", threshold=0.6, batch_size=4)
        boxes = det([frame1, frame2])   # [(n1, 5), (n2, 5)] float32 [x1, y1, x2, y2, conf] in pixels

    `labels`: class ids to keep (None: all; single-class person detectors need none). `threads`: CPU
    inference threads (None: OpenVINO's default, all cores). Raises FileNotFoundError for a missing file
    and `DetectorError` for one OpenVINO cannot read or that is not of the documented shape.
    """

    def __init__(self, path: str | os.PathLike, threshold: float = 0.5, batch_size: int = 4,
                 labels: Sequence[int] | None = None, threads: int | None = None) -> None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"detector not found: {p}")
        if p.suffix.lower() not in (".xml", ".onnx"):
            raise DetectorError(f"detector {p}: expected an OpenVINO IR (.xml with its .bin) or an ONNX file (.onnx)")
        if p.suffix.lower() == ".xml" and not p.with_suffix(".bin").exists():
            raise FileNotFoundError(f"detector weights not found: {p.with_suffix('.bin')} (beside {p.name})")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"detector threshold must be in [0, 1], got {threshold}")
        if batch_size < 1:
            raise ValueError(f"detector batch size must be >= 1, got {batch_size}")
        try:
            import openvino as ov
        except ImportError as err:  # pragma: no cover - the video extra installs it
            raise ImportError("the detector needs OpenVINO: pip install 'reid_lite[video]'") from err
        core = ov.Core()
        try:
            model = core.read_model(str(p))
        except Exception as err:  # OpenVINO raises RuntimeError subclasses with long C++ texts
            raise DetectorError(f"cannot read detector {p}: {str(err).strip().splitlines()[0][:300]}") from None
        if len(model.inputs) != 1 or len(model.outputs) < 1:
            raise DetectorError(f"detector {p}: expected one image input and an SSD output, got "
                                f"{len(model.inputs)} inputs and {len(model.outputs)} outputs")
        shape = model.inputs[0].get_partial_shape()
        if shape.rank.is_dynamic or shape.rank.get_length() != 4 or shape[1].is_dynamic or shape[1].get_length() != 3 \
                or shape[2].is_dynamic or shape[3].is_dynamic:
            raise DetectorError(f"detector {p}: expected a static [N, 3, H, W] input, got {shape}")
        out_shape = model.outputs[0].get_partial_shape()
        if out_shape.rank.is_static and (out_shape[-1].is_dynamic or out_shape[-1].get_length() != 7):
            raise DetectorError(f"detector {p}: expected SSD rows of 7 values [image_id, label, conf, x_min, y_min, "
                                f"x_max, y_max], got output shape {out_shape}")
        self.path = str(p)
        self.height, self.width = shape[2].get_length(), shape[3].get_length()
        self.threshold = float(threshold)
        self.labels = None if labels is None else [int(v) for v in labels]
        config = {"INFERENCE_NUM_THREADS": int(threads)} if threads else {}
        self.batch_size = int(batch_size)
        if self.batch_size > 1:
            try:
                model.reshape({model.inputs[0]: ov.PartialShape([self.batch_size, 3, self.height, self.width])})
            except Exception:  # a model that cannot take another batch: one frame per inference
                self.batch_size = 1
        try:
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as err:
            raise DetectorError(f"cannot compile detector {p}: {str(err).strip().splitlines()[0][:300]}") from None
        self.request = self.compiled.create_infer_request()

    def preprocess(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        """(batch_size, 3, H, W) float32 BGR 0-255: each frame resized to the model's input; a short list is
        padded with black frames."""
        import cv2

        x = np.zeros((self.batch_size, 3, self.height, self.width), dtype=np.float32)
        for i, f in enumerate(frames):
            x[i] = cv2.resize(f, (self.width, self.height), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1)
        return x

    def __call__(self, frames: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Boxes per frame: (n, 5) float32 `[x1, y1, x2, y2, conf]` in the frame's pixels, conf >= threshold."""
        result: list[np.ndarray] = []
        for s in range(0, len(frames), self.batch_size):
            chunk = frames[s:s + self.batch_size]
            out = self.request.infer({0: self.preprocess(chunk)})
            rows = next(iter(out.values()))
            result += parse_ssd_output(rows, [f.shape[:2] for f in chunk], self.threshold, self.labels)
        return result
