"""torchreid engines and feature extractor that pass camera ids to our models (created lazily: importing the
adapter needs no torchreid)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...models import TransReID
from .build import build_transreid, factory_options, register_models
from .layout import torchreid_modules
from .model import TorchreidTransReID, camera_ids, unwrap_model


class _CameraCall:
    """Stands in for `engine.model` during one training step: calls the model with the batch's cameras as a
    keyword, which nn.DataParallel scatters along with the images."""

    def __init__(self, model: nn.Module, camids: Tensor) -> None:
        self.model, self.camids = model, camids

    def __call__(self, imgs: Tensor) -> Any:
        return self.model(imgs, cam_label=self.camids.to(imgs.device))

    def __getattr__(self, name: str) -> Any:
        if name == "model":  # not set yet (e.g. while copying): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)


class CameraAwareEngineMixin:
    """Passes each batch's `camid` to the model (SIE) in torchreid's training and evaluation loops.

    Put it before a torchreid engine class: `class MyEngine(CameraAwareEngineMixin, ImageSoftmaxEngine)`.
    `CameraAwareSoftmaxEngine` and `CameraAwareTripletEngine` in this module are exactly that.
    """

    _eval_camids: Tensor | None = None

    def parse_data_for_eval(self, data: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        imgs, pids, camids = super().parse_data_for_eval(data)  # type: ignore[misc]
        self._eval_camids = camids  # Engine._evaluate calls extract_features(imgs) right after this
        return imgs, pids, camids

    def extract_features(self, input: Tensor) -> Tensor:
        camids, self._eval_camids = self._eval_camids, None
        takes_cameras = isinstance(unwrap_model(self.model), TransReID)  # type: ignore[attr-defined]
        if camids is None or len(camids) != input.shape[0] or not takes_cameras:
            return self.model(input)  # type: ignore[attr-defined]
        return self.model(input, cam_label=camids.to(input.device))  # type: ignore[attr-defined]

    def forward_backward(self, data: dict[str, Any]) -> dict[str, float]:
        model = self.model  # type: ignore[has-type]
        if not isinstance(unwrap_model(model), TransReID):  # other torchreid models take no cameras
            return super().forward_backward(data)  # type: ignore[misc]
        self.model = _CameraCall(model, torch.as_tensor(data["camid"]))
        try:
            return super().forward_backward(data)  # type: ignore[misc]
        finally:
            self.model = model


# ----------------------------------------------------------------------------------------- feature extraction
def _make_feature_extractor(base: type) -> type:
    class FeatureExtractor(base):  # type: ignore[misc, valid-type]
        """torchreid's `FeatureExtractor` for our models, with strict, weights-only checkpoint loading and
        camera ids for SIE.

        Args:
            model_name: one of our registered names (or a variant from `register_model`); torchreid's own
                model names fall back to torchreid's extractor.
            model_path: a TransReID checkpoint (official layout, torchreid's `{'state_dict': ...}`, `module.`
                prefix accepted). Loaded strictly; the SIE camera count and class count come from the file.
            image_size, pixel_mean, pixel_std: default to the model config's INPUT (mean = std = 0.5 for the
                paper's configs); torchreid's defaults would be ImageNet statistics.
            device, verbose, pixel_norm: as in torchreid. `trust`: see `build_transreid`.
            **options: `build_transreid` keywords (merging options, `config_file`, `opts`, `camera_num`, ...).

        Call it as torchreid's: `extractor(paths | arrays | tensor, camids=None)`; `camids` (one per image)
        feed SIE, without them `default_camera` is used.
        """

        def __init__(self, model_name: str = "transreid_stm", model_path: str | Path = "",
                     image_size: Sequence[int] | None = None, pixel_mean: Sequence[float] | None = None,
                     pixel_std: Sequence[float] | None = None, pixel_norm: bool = True, device: str = "cuda",
                     verbose: bool = True, trust: bool = False, **options: Any) -> None:
            import torchvision.transforms as T

            register_models()
            owned = factory_options(model_name)
            if owned is None:
                if options:
                    raise TypeError(f"{model_name!r} is not a reid_lite model; options {sorted(options)} do not apply")
                kw = {k: v for k, v in dict(image_size=image_size, pixel_mean=pixel_mean, pixel_std=pixel_std)
                      .items() if v is not None}
                super().__init__(model_name=model_name, model_path=str(model_path), pixel_norm=pixel_norm,
                                 device=device, verbose=verbose, **kw)
                return
            method, bound = owned
            options = {**bound, **options}
            trust = bool(trust or options.pop("trust", False))
            weights = model_path or options.pop("weights", None)
            source = str(weights) if isinstance(weights, (str, Path)) else ("a state dict" if weights else "")
            pretrained = options.pop("pretrained", not weights)  # as torchreid: no model_path -> pretrained
            # num_classes=None: the checkpoint's class count, so that even the classifiers load strictly.
            model = build_transreid(None, "softmax", pretrained, method=method, weights=weights or None, trust=trust,
                                    **options)
            model.eval()
            cfg = model.cfg
            image_size = tuple(image_size or cfg.INPUT.SIZE_TEST)
            if verbose:
                print(f"Model: {model_name} ({method}, {sum(p.numel() for p in model.parameters()):,} params)"
                      + (f", weights from {source}" if source else ""))
            steps = [T.Resize(image_size), T.ToTensor()]  # torchreid's preprocessing, our statistics
            if pixel_norm:
                steps.append(T.Normalize(mean=list(pixel_mean or cfg.INPUT.PIXEL_MEAN),
                                         std=list(pixel_std or cfg.INPUT.PIXEL_STD)))
            self.model = model.to(torch.device(device))
            self.preprocess = T.Compose(steps)
            self.to_pil = T.ToPILImage()
            self.device = torch.device(device)

        def __call__(self, input: Any, camids: Any = None) -> Tensor:
            if camids is None or not isinstance(unwrap_model(self.model), TorchreidTransReID):
                return super().__call__(input)
            with camera_ids(self.model, camids):
                return super().__call__(input)

    return FeatureExtractor


@functools.cache
def lazy_class(name: str) -> type:
    """The class `name` of LAZY, derived from torchreid's (created on first use)."""
    tr = torchreid_modules()
    if name == "FeatureExtractor":
        return _make_feature_extractor(tr.utils.FeatureExtractor)
    base = {"CameraAwareSoftmaxEngine": tr.engine.ImageSoftmaxEngine,
            "CameraAwareTripletEngine": tr.engine.ImageTripletEngine}[name]
    return type(name, (CameraAwareEngineMixin, base), {"__module__": __name__, "__doc__": (
        f"torchreid's {base.__name__} that passes each batch's camera ids to the model (SIE).")})


LAZY = ("FeatureExtractor", "CameraAwareSoftmaxEngine", "CameraAwareTripletEngine")
