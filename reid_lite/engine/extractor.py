"""Feature extraction: a whole test loader (`extract_features`) or ad-hoc images (`FeatureExtractor`).

Both share one forward path (`_embed_batch`): autocast per TEST.AMP, camera/view ids to SIE when the
model has it, optional flip averaging, then L2 normalisation in float32. Features stay on the device
during a pass and are copied to the CPU once at the end, so the hot loop never waits for the GPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ..build import build_model, build_model_for_checkpoint, load_checkpoint
from ..data.loader import check_crop_shape, read_image, to_rgb
from ..data.transforms import build_transforms
from ..deploy import load_runtime_model
from ..models import check_input_size
from ..utils.device import autocast, resolve_device

logger = logging.getLogger(__name__)

__all__ = ["FeatureExtractor", "Features", "extract_features"]


@dataclass
class Features:
    """Features of the images a loader yielded, in loader order (unreadable images are left out).

    feats: (N, D) float32 on the CPU; pids/camids/viewids/indices: (N,) int64, `indices` being each
    image's position in the loader's records (for a test loader, `indices < num_query` are queries);
    paths: the N image paths; failed: paths that could not be read (skipped, not in `feats`);
    seconds: wall time of the whole pass (data loading included); model_seconds: time spent in the
    model's forward passes only; device: where the model ran.
    """

    feats: torch.Tensor
    pids: np.ndarray
    camids: np.ndarray
    viewids: np.ndarray
    indices: np.ndarray
    paths: list[str]
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    model_seconds: float = 0.0
    device: str = "cpu"

    def __len__(self) -> int:
        return int(self.feats.shape[0])

    @property
    def images_per_second(self) -> float:
        """Throughput of the whole pass (decoding, transfer and model), images per wall-clock second."""
        return len(self) / self.seconds if self.seconds > 0 else 0.0

    @property
    def model_images_per_second(self) -> float:
        """Throughput of the model alone (the paper's img/s), images per second of forward time."""
        return len(self) / self.model_seconds if self.model_seconds > 0 else 0.0

    def select(self, mask: np.ndarray) -> Features:
        """The subset where the boolean `mask` (N,) is true (e.g. `indices < num_query`); timings are kept."""
        mask = np.asarray(mask, dtype=bool)
        idx = torch.from_numpy(np.flatnonzero(mask))
        return Features(self.feats[idx], self.pids[mask], self.camids[mask], self.viewids[mask],
                        self.indices[mask], [p for p, m in zip(self.paths, mask) if m], list(self.failed),
                        self.seconds, self.model_seconds, self.device)


# ----------------------------------------------------------------------------- shared forward


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _sie_needs(model: nn.Module) -> tuple[int, int]:
    """(camera count, view count) of the model's side-information embedding; (0, 0) without SIE."""
    base = getattr(model, "base", model)  # a deployed RuntimeModel carries the counts itself
    return int(getattr(base, "cam_num", 0) or 0), int(getattr(base, "view_num", 0) or 0)


def prepare_model(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """Move `model` to `device` (None: where its parameters are), channels-last on CUDA, eval mode; returns
    the device."""
    dev = _model_device(model) if device is None else resolve_device(device)
    model.to(dev)
    if dev.type == "cuda":
        # The overlapping-patch conv is the only 4-D op; channels-last lets cuDNN skip a layout transpose.
        model.to(memory_format=torch.channels_last)
    model.eval()
    return dev


def _embed_batch(model: nn.Module, images: torch.Tensor, cams: torch.Tensor | None, views: torch.Tensor | None,
                 device: torch.device, amp: str, flip: bool, feat_norm: bool) -> torch.Tensor:
    """Features (B, D) float32 on `device` of a CPU (ideally pinned) batch of preprocessed images."""
    non_blocking = images.is_pinned() if device.type == "cuda" else False
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    x = images.to(device, non_blocking=non_blocking, memory_format=fmt)
    kwargs: dict[str, Any] = {}
    # Ids stay on the CPU: the model range-checks them there (no device sync) before moving them.
    if cams is not None:
        kwargs["cam_label"] = cams
    if views is not None:
        kwargs["view_label"] = views
    with autocast(device, amp):
        feat = model(x, **kwargs).float()
        if flip:
            # A second pass rather than one batch of 2B keeps peak memory at the unflipped batch's.
            feat = (feat + model(x.flip(3), **kwargs).float()) / 2
    if feat_norm:
        feat = F.normalize(feat.float(), dim=1)
    return feat.float()


def _ids_for_model(model: nn.Module, camids: torch.Tensor, viewids: torch.Tensor,
                   use_camera: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    cam_num, view_num = _sie_needs(model)
    cams = views = None
    if cam_num > 0:
        if not use_camera:
            raise ValueError("this model has a camera SIE, which needs camera ids (use_camera=True)")
        cams = camids
    if view_num > 0:
        views = viewids
    return cams, views


class _ModelTimer:
    """Forward-pass time without a host-device sync per batch.

    CUDA: a pair of events around each forward, recorded asynchronously and read after one
    `torch.cuda.synchronize` at the end. CPU: execution is synchronous, so perf_counter is exact.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.starts: list[torch.cuda.Event] = []
        self.ends: list[torch.cuda.Event] = []
        self.cpu_seconds = 0.0
        self._t0 = 0.0

    def _event(self) -> torch.cuda.Event:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def start(self) -> None:
        if self.cuda:
            self.starts.append(self._event())
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self.ends.append(self._event())
        else:
            self.cpu_seconds += time.perf_counter() - self._t0

    def total(self) -> float:
        """Seconds of model time; on CUDA this synchronises (call once, after the pass)."""
        if not self.cuda:
            return self.cpu_seconds
        torch.cuda.synchronize()
        return sum(a.elapsed_time(b) for a, b in zip(self.starts, self.ends)) / 1000.0


# ----------------------------------------------------------------------------- loader pass


def extract_features(model: nn.Module, loader: Iterable, device: torch.device | str | None = None,
                     amp: str = "auto", flip: bool = False, feat_norm: bool = True, use_camera: bool = True,
                     progress: bool = True, desc: str = "extract") -> Features:
    """Embed every image of `loader` (yielding `reid_lite.data.Batch`es) with `model` in eval mode.

    Args:
        model: a TransReID (or any module called as `model(images[, cam_label=, view_label=])` that
            returns (B, D) features in eval mode); moved to `device` and left in eval mode (a training loop
            calls `model.train()` again after evaluating).
        device: where to run; None keeps the model's current device. 'cuda' without CUDA falls back to
            the CPU with a logged message.
        amp: 'auto' (bf16 on CUDA, fp32 on CPU), 'fp32', 'fp16' or 'bf16'.
        flip: average each image's feature with its horizontal flip's.
        feat_norm: L2-normalise the (flip-averaged) features, as TransReID's evaluator does.
        use_camera: feed `Batch.camids` (and `viewids`) to the side-information embedding when the model
            has one; a model with a camera SIE cannot run without them.
        progress: show a tqdm progress bar (stderr).

    Unreadable images (`Batch.failed`) are skipped, listed in `Features.failed` and logged; they never
    stop the pass. Returns float32 CPU features in loader order.
    """
    # Outside inference mode: parameters moved to the GPU inside it would become inference tensors,
    # and a training loop that evaluates between epochs could no longer backpropagate through them.
    dev = prepare_model(model, device)
    with torch.inference_mode():
        return _extract(model, loader, dev, amp, flip, feat_norm, use_camera, progress, desc)


def _extract(model: nn.Module, loader: Iterable, dev: torch.device, amp: str, flip: bool, feat_norm: bool,
             use_camera: bool, progress: bool, desc: str) -> Features:
    timer = _ModelTimer(dev)
    chunks: list[torch.Tensor] = []
    pids: list[torch.Tensor] = []
    camids: list[torch.Tensor] = []
    viewids: list[torch.Tensor] = []
    indices: list[torch.Tensor] = []
    paths: list[str] = []
    failed: list[str] = []
    total = len(loader.dataset) if hasattr(loader, "dataset") else None  # type: ignore[attr-defined]
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for batch in loader:
            failed.extend(batch.failed)
            n = len(batch)
            if n:
                cams, views = _ids_for_model(model, batch.camids, batch.viewids, use_camera)
                timer.start()
                # Stays on the device: no .cpu() here, which would block on every batch.
                chunks.append(_embed_batch(model, batch.images, cams, views, dev, amp, flip, feat_norm))
                timer.stop()
                pids.append(batch.pids)
                camids.append(batch.camids)
                viewids.append(batch.viewids)
                indices.append(batch.indices)
                paths.extend(batch.paths)
            bar.update(n + len(batch.failed))
            if batch.failed:
                bar.set_postfix(skipped=len(failed))
        feats = torch.cat(chunks).cpu() if chunks else torch.empty(0, _feature_dim(model), dtype=torch.float32)
        model_seconds = timer.total()
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    if failed:
        logger.warning("%s: %d unreadable image(s) skipped, e.g. %s", desc, len(failed), failed[:3])

    def cat(xs: list[torch.Tensor]) -> np.ndarray:
        return torch.cat(xs).numpy().astype(np.int64) if xs else np.empty(0, dtype=np.int64)

    return Features(feats, cat(pids), cat(camids), cat(viewids), cat(indices), paths, failed,
                    seconds, model_seconds, str(dev))


def _feature_dim(model: nn.Module) -> int:
    return int(getattr(model, "feature_dim", 0) or 0)


# ----------------------------------------------------------------------------- ad-hoc images


def _check_finite(images: torch.Tensor) -> None:
    """Raise ValueError when a preprocessed image tensor holds NaN or inf.

    Checked where tensors enter the extractor (one pass over the input, before it reaches the device),
    not in the model's forward: there it would cost a host-device sync per batch. A NaN pixel spreads
    through attention to the whole feature, which would then be stored in a gallery.
    """
    if images.is_floating_point() and not bool(torch.isfinite(images).all()):
        bad = ~torch.isfinite(images.reshape(images.shape[0], -1) if images.dim() == 4 else images.reshape(1, -1))
        rows = torch.nonzero(bad.any(dim=1)).flatten().tolist()
        raise ValueError(f"image tensor has NaN or inf pixels (image(s) {rows[:5]} of the batch): preprocessed "
                         "inputs must be finite")


ImageInput = str | np.ndarray | Image.Image | torch.Tensor


class FeatureExtractor:
    """Embed images given as paths, HWC uint8 RGB numpy arrays, PIL images or tensors (torchreid-style).

        extractor = FeatureExtractor(cfg, weights="transreid_msmt17.pth")
        feats = extractor(["a.jpg", "b.jpg"], camids=[0, 3])   # (2, D) float32 on the CPU

    Paths, arrays and PIL images go through the test transform (`build_transforms(cfg, False)`), the
    same as the evaluation loader, so the features are identical to those of `extract_features`. Tensors are
    taken as already preprocessed (resized and normalised), CHW or BCHW, as torchreid does. The model
    is built from `cfg` (with the merging method cfg.MERGE describes) unless `model` is given, or read
    from MODEL.ONNX_PATH with MODEL.BACKEND onnxruntime|openvino (reid_lite.deploy); `weights`
    is a TransReID checkpoint loaded strictly, classifier excluded; a model built for it takes its SIE camera
    count from the checkpoint's table (`build_model_for_checkpoint`). TEST.AMP, TEST.FLIP and
    TEST.FEAT_NORM apply. A model with a camera SIE needs `camids` (0-based, one per image).
    """

    def __init__(self, cfg: Any, model: nn.Module | None = None, weights: str | None = None,
                 device: torch.device | str | None = None, num_classes: int = 1, camera_num: int = 0,
                 view_num: int = 0) -> None:
        self.cfg = cfg
        if model is None and str(cfg.MODEL.BACKEND).lower() != "torch":
            # The exported file carries its weights (load_runtime_model checks them against TEST.WEIGHT);
            # the runtimes run on the CPU, so the images stay there.
            model, weights, device = load_runtime_model(cfg), None, "cpu"
        if model is None and weights:
            # The SIE camera count comes from the checkpoint's table; camera_num only has to fit in it.
            model = build_model_for_checkpoint(cfg, weights, num_classes, camera_num, view_num)
        elif model is None:
            model = build_model(cfg, num_classes, camera_num, view_num)
        elif weights:
            load_checkpoint(model, weights, trust=cfg.MODEL.TRUST_CHECKPOINT, ignore_classifier=True)
        check_input_size(cfg, model)  # images are resized to INPUT.SIZE_TEST below
        self.model = model
        self.device = prepare_model(model, device if device is not None else cfg.MODEL.DEVICE)
        self.transform = build_transforms(cfg, is_train=False)
        self.amp = cfg.TEST.AMP
        self.flip = bool(cfg.TEST.FLIP)
        self.feat_norm = str(cfg.TEST.FEAT_NORM).lower() == "yes"
        self.batch_size = int(cfg.TEST.IMS_PER_BATCH)

    def _to_tensor(self, item: ImageInput) -> torch.Tensor:
        if isinstance(item, torch.Tensor):
            return item
        if isinstance(item, str):
            img = read_image(item)  # an unreadable path raises: dropping it would misalign the rows
        elif isinstance(item, np.ndarray):
            if item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8:
                raise ValueError(f"numpy images must be HWC uint8 RGB, got shape {item.shape} dtype {item.dtype}")
            check_crop_shape(item.shape[1], item.shape[0], "a numpy image")  # the crop rule of every reader
            img = Image.fromarray(item)
        elif isinstance(item, Image.Image):
            check_crop_shape(item.width, item.height, "a PIL image")
            img = to_rgb(item)  # 16-bit and palette images scaled to 8-bit RGB, as read_image does
        else:
            raise TypeError(f"unsupported image input {type(item).__name__}: use a path, array, PIL image or tensor")
        return self.transform(img)

    def _as_batch(self, inputs: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        if isinstance(inputs, torch.Tensor):
            if inputs.dim() not in (3, 4):
                raise ValueError(f"tensor inputs must be CHW or BCHW, got shape {tuple(inputs.shape)}")
            _check_finite(inputs)
            return inputs.unsqueeze(0) if inputs.dim() == 3 else inputs
        if isinstance(inputs, (str, np.ndarray, Image.Image)):
            if isinstance(inputs, np.ndarray) and inputs.ndim == 4:  # a stacked (B, H, W, 3) array
                inputs = list(inputs)
            else:
                inputs = [inputs]
        items = [self._to_tensor(x) for x in inputs]
        for t in items:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                _check_finite(t)  # a preprocessed tensor among the inputs; decoded images are always finite
        items = [t.squeeze(0) if t.dim() == 4 and t.shape[0] == 1 else t for t in items]
        return torch.stack(items) if items else torch.empty(0, 3, *self.cfg.INPUT.SIZE_TEST)

    @torch.inference_mode()
    def __call__(self, inputs: ImageInput | Sequence[ImageInput], camids: Sequence[int] | np.ndarray | None = None,
                 batch_size: int | None = None) -> torch.Tensor:
        """Features (N, D) float32 on the CPU, one row per input image, in input order.

        `camids` are 0-based camera ids (one per image, or a single int for all); required when the
        model has a camera SIE. View ids are taken as 0 when the model has a view SIE.
        """
        images = self._as_batch(inputs)
        n = images.shape[0]
        cam_num, view_num = _sie_needs(self.model)
        cam_t = None
        if camids is not None:
            cam_t = torch.as_tensor(np.asarray(camids, dtype=np.int64)).reshape(-1)
            if cam_t.numel() == 1 and n > 1:
                cam_t = cam_t.expand(n).clone()
            if cam_t.numel() != n:
                raise ValueError(f"got {cam_t.numel()} camera ids for {n} images")
        elif cam_num > 0:
            raise ValueError("this model has a camera SIE (MODEL.SIE_CAMERA): pass camids=, one 0-based id per image")
        if cam_t is None:
            cam_t = torch.zeros(n, dtype=torch.long)
        views_t = torch.zeros(n, dtype=torch.long)
        bs = int(batch_size or self.batch_size)
        pin = self.device.type == "cuda"
        out = []
        for s in range(0, n, bs):
            x = images[s:s + bs]
            cams, views = _ids_for_model(self.model, cam_t[s:s + bs], views_t[s:s + bs], True)
            if pin:
                x = x.pin_memory()
            out.append(_embed_batch(self.model, x, cams, views, self.device, self.amp, self.flip, self.feat_norm))
        if not out:
            return torch.empty(0, _feature_dim(self.model), dtype=torch.float32)
        return torch.cat(out).cpu()
