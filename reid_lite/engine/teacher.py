"""Distillation from a frozen re-identification model (MODEL.TEACHER): its embeddings as training targets.

    teacher = TeacherModel("person-reid.xml")            # OpenVINO IR (.xml) or ONNX (.onnx)
    targets = teacher_targets(teacher, dataset.train)    # (N, D_t), L2-normalised, one row per training record
    distill = Distillation(targets, model.in_planes, cfg.MODEL.TEACHER_WEIGHT, cfg.MODEL.TEACHER_LOSS)
    loss = distill(feat, batch.indices)                  # added to the ID + triplet loss by the loop

The teacher runs once per training image, on the un-augmented crop, before training starts: its targets
are then a lookup, so distillation costs the training loop nothing. Augmentations are mild (flip, pad and
crop, erasing) and the teacher's embedding of a person barely moves under them, so the clean target
stands for the augmented view.

Two losses (`Distillation`), on the student's global feature before the BNNeck (the first of JPM's five), f:
relational, `w * mean_{i != j} (cos(f_i, f_j) - cos(t_i, t_j))^2` over a batch's pairs (similarity-preserving,
in the spirit of Tung & Mori 2019 and Park et al. 2019: no parameters, teaches which crops are near which),
and per image, `w * mean_i (1 - cos(P f_i, t_i))` through a learned projection P (FitNets-style), or both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ..config import TEACHER_INPUTS, TEACHER_LOSSES
from ..data.loader import read_image

__all__ = [
    "Distillation", "TeacherModel", "similarity_distillation", "teacher_targets",
]

logger = logging.getLogger("reid_lite.train")

class TeacherModel:
    """A frozen embedding model read from an OpenVINO IR (`.xml` + `.bin`) or an ONNX file.

    Its input is one image tensor (N, 3, H, W); H and W come from the file (or `size` when the file leaves
    them dynamic). Its first output is the embedding (N, D). `input_format` is one of TEACHER_INPUTS.
    ValueError for a missing or unreadable file, an unknown format or an input that is not an image batch.
    """

    def __init__(self, path: str | Path, input_format: str = "bgr255", size: Sequence[int] | None = None,
                 threads: int = 0) -> None:
        self.path = Path(path)
        if input_format not in TEACHER_INPUTS:
            raise ValueError(f"MODEL.TEACHER_INPUT must be one of {TEACHER_INPUTS}, got {input_format!r}")
        self.input_format = input_format
        if not self.path.is_file():
            raise ValueError(f"MODEL.TEACHER: no such file: {self.path}")
        suffix = self.path.suffix.lower()
        if suffix == ".xml":
            self._run, shape = self._openvino(threads)
        elif suffix == ".onnx":
            self._run, shape = self._onnxruntime(threads)
        else:
            raise ValueError(f"MODEL.TEACHER must be an OpenVINO IR (.xml) or an ONNX file (.onnx), got {self.path}")
        if len(shape) != 4 or shape[1] not in (3, None):
            raise ValueError(f"MODEL.TEACHER {self.path}: input shape {shape} is not an image batch (N, 3, H, W)")
        fixed = [int(s) if isinstance(s, int) and s > 0 else None for s in shape[2:]]
        if size is not None:
            fixed = [f or int(s) for f, s in zip(fixed, size)]
        if None in fixed:
            raise ValueError(f"MODEL.TEACHER {self.path}: dynamic input size {shape}; give the size it expects")
        self.size: tuple[int, int] = (fixed[0], fixed[1])

    def _openvino(self, threads: int) -> tuple[Callable[[np.ndarray], np.ndarray], list]:
        try:
            import openvino as ov
        except ImportError as err:
            raise ValueError("MODEL.TEACHER is an OpenVINO IR: pip install openvino (the 'export' extra)") from err
        core = ov.Core()
        try:
            model = core.read_model(str(self.path))
        except RuntimeError as err:
            raise ValueError(f"MODEL.TEACHER {self.path} is not a readable OpenVINO IR: {err}") from None
        if len(model.inputs) != 1:
            raise ValueError(f"MODEL.TEACHER {self.path} has {len(model.inputs)} inputs; one image input expected")
        shape = [d.get_length() if d.is_static else None for d in model.inputs[0].get_partial_shape()]
        model.reshape({model.inputs[0].get_any_name(): [-1, *shape[1:]]})
        config = {"INFERENCE_PRECISION_HINT": "f32"}  # its FP16 weights, computed in fp32
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        compiled = core.compile_model(model, "CPU", config)
        out = compiled.outputs[0]
        return (lambda x: np.asarray(compiled(x)[out])), shape

    def _onnxruntime(self, threads: int) -> tuple[Callable[[np.ndarray], np.ndarray], list]:
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise ValueError("MODEL.TEACHER is an ONNX file: pip install onnxruntime (the 'export' extra)") from err
        opts = ort.SessionOptions()
        if threads > 0:
            opts.intra_op_num_threads = int(threads)
        try:
            session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for unreadable files
            raise ValueError(f"MODEL.TEACHER {self.path} is not a readable ONNX model: {err}") from None
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"MODEL.TEACHER {self.path} has {len(inputs)} inputs; one image input expected")
        name = inputs[0].name
        return (lambda x: np.asarray(session.run(None, {name: x})[0])), list(inputs[0].shape)

    def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB PIL images -> the teacher's (N, 3, H, W) float32 input (bilinear resize to its size)."""
        h, w = self.size
        arr = np.stack([np.asarray(im.convert("RGB").resize((w, h), Image.BILINEAR), dtype=np.float32)
                        for im in images])
        if self.input_format == "bgr255":
            arr = arr[..., ::-1]
        elif self.input_format == "rgb01":
            arr = arr / 255.0
        return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))

    def __call__(self, images: Sequence[Image.Image]) -> Tensor:
        """L2-normalised embeddings (N, D) of RGB PIL images."""
        feats = torch.from_numpy(self._run(self.preprocess(images)).astype(np.float32)).flatten(1)
        return F.normalize(feats, dim=1)


def teacher_targets(teacher: TeacherModel, records: Sequence[Sequence], batch_size: int = 64,
                    progress: bool = False) -> Tensor:
    """The teacher's normalised embedding of every record's image (`records[i][0]` is its path), (N, D).

    An unreadable image keeps a zero row (the training loader drops such images, so it is never looked up);
    ValueError when no image is readable."""
    from tqdm.auto import tqdm

    paths = [str(r[0]) for r in records]
    table: Tensor | None = None
    for start in tqdm(range(0, len(paths), batch_size), desc="teacher targets", unit="batch", disable=not progress):
        images, rows = [], []
        for i in range(start, min(start + batch_size, len(paths))):
            try:
                images.append(read_image(paths[i]))
                rows.append(i)
            except (OSError, ValueError, SyntaxError, EOFError):
                logger.warning("teacher: cannot read %s; it gets no target", paths[i])
        if not images:
            continue
        feats = teacher(images)
        if table is None:
            table = torch.zeros(len(paths), feats.shape[1])
        table[rows] = feats
    if table is None:
        raise ValueError("MODEL.TEACHER: no training image could be read")
    return table



class Distillation(nn.Module):
    """`loss(features, indices)`: the teacher's embeddings of the batch's images (`targets[indices]`) taught to
    the student's training feature (or JPM's list: the first, global one), `weight` times

    * 'similarity': the mean squared difference between the student's and the teacher's pairwise cosine
      similarities over the batch's distinct pairs (scale-free, needs no parameters);
    * 'feature': the mean of `1 - cos(P f_i, t_i)` with P a learned linear map from the student's width to the
      teacher's (FitNets-style: a target per image, a much richer signal than the pairs' similarities, whose
      spread among different people is small); P trains with the model and is kept in the training state, not
      in the model's checkpoint (inference never uses it);
    * 'both': their sum.
    """

    def __init__(self, targets: Tensor, student_dim: int, weight: float = 1.0, kind: str = "similarity") -> None:
        super().__init__()
        if kind not in TEACHER_LOSSES:
            raise ValueError(f"MODEL.TEACHER_LOSS must be one of {TEACHER_LOSSES}, got {kind!r}")
        self.register_buffer("targets", targets.float(), persistent=False)
        self.weight, self.kind = float(weight), kind
        self.projection = nn.Linear(student_dim, targets.shape[1], bias=False) if kind != "similarity" else None

    def forward(self, features: Tensor | Sequence[Tensor], indices: Tensor) -> Tensor:
        f = (features if isinstance(features, Tensor) else features[0]).float()
        t = self.targets[indices.to(self.targets.device)].to(f.device)
        loss = f.new_zeros(())
        if self.kind in ("similarity", "both") and f.shape[0] > 1:
            s = F.normalize(f, dim=1)
            off_diagonal = ~torch.eye(f.shape[0], dtype=torch.bool, device=f.device)
            loss = loss + (s @ s.t() - t @ t.t())[off_diagonal].pow(2).mean()
        if self.projection is not None:
            loss = loss + (1 - F.cosine_similarity(self.projection(f), t, dim=1)).mean()
        return self.weight * loss


def similarity_distillation(targets: Tensor, weight: float = 1.0) -> Distillation:
    """The parameter-free 'similarity' distillation of `targets` (see `Distillation`)."""
    return Distillation(targets, 1, weight, "similarity")
