"""Our TransReID with torchreid's calling conventions, and camera ids for SIE where torchreid passes none."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from yacs.config import CfgNode

from ...models import TransReID


class TorchreidTransReID(TransReID):
    """`TransReID` with torchreid's calling conventions (same parameters and state-dict keys).

    `forward(x)` returns the feature in eval mode and, in train mode, the logits (loss 'softmax') or
    `(logits, features)` (loss 'triplet'), lists with JPM as `jpm_loss` says. Camera ids for SIE come from
    `cam_label=`, else from an enclosing `camera_ids(...)`, else `default_camera`. A model with view SIE
    (MODEL.SIE_VIEW) uses view 0 when no `view_label` is given: torchreid has no view labels.
    """

    loss: str
    jpm_loss: str
    default_camera: int | None
    cfg: CfgNode

    def _setup_torchreid(self, loss: str, jpm_loss: str, default_camera: int | None, cfg: CfgNode) -> None:
        self.loss, self.jpm_loss, self.default_camera, self.cfg = loss, jpm_loss, default_camera, cfg
        self._pending_camids: Tensor | None = None
        self._warned_default_camera = False

    @property
    def camera_num(self) -> int:
        """Rows of the SIE camera table (0: SIE does not use cameras)."""
        return self.base.cam_num

    def forward(self, x: Tensor, label: Tensor | None = None, cam_label: Any = None, view_label: Any = None):
        cam_label = self._cameras(x, cam_label)
        if self.base.view_num > 0 and view_label is None:
            view_label = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        out = super().forward(x, label, cam_label=cam_label, view_label=view_label)
        if not self.training:
            return out
        logits, feats = out
        if self.jpm:
            if self.jpm_loss == "official":
                # DeepSupervision averages the list: 4 copies of the global branch give it weight 1/2.
                logits, feats = [logits[0]] * 4 + logits[1:], [feats[0]] * 4 + feats[1:]
            elif self.jpm_loss == "global":
                logits, feats = logits[0], feats[0]
        return logits if self.loss == "softmax" else (logits, feats)

    def _cameras(self, x: Tensor, cam_label: Any) -> Tensor | None:
        if self.base.cam_num == 0:
            return None  # SIE without cameras: the ids would be ignored anyway
        if cam_label is None:
            cam_label = self._pending_camids
        if cam_label is None:
            if self.default_camera is None:
                raise ValueError("this model's SIE needs camera ids: call model(x, cam_label=...), use "
                                 "`with camera_ids(model, camids):`, or a CameraAware*Engine")
            if not self._warned_default_camera:
                warnings.warn(f"no camera ids given: SIE uses camera {self.default_camera} for every image, so "
                              "features differ from camera-aware ones (see reid_lite.integrations.torchreid."
                              "camera_ids)", UserWarning, stacklevel=3)
                self._warned_default_camera = True
            return torch.full((x.shape[0],), self.default_camera, dtype=torch.long, device=x.device)
        cams = torch.as_tensor(cam_label).to(device=x.device, dtype=torch.long).reshape(-1)
        if cams.numel() != x.shape[0]:
            raise ValueError(f"{cams.numel()} camera ids for a batch of {x.shape[0]} images")
        # Checked here because an out-of-range index on CUDA is an opaque device-side assert.
        lo, hi = int(cams.min()), int(cams.max())
        if lo < 0 or hi >= self.base.cam_num:
            raise ValueError(f"camera ids must be 0-based and < {self.base.cam_num} (the SIE table of this model); "
                             f"got ids in [{lo}, {hi}]. Build with camera_num= the dataset's camera count.")
        return cams


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DataParallel / DistributedDataParallel wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


@contextlib.contextmanager
def camera_ids(model: nn.Module, camids: Any) -> Iterator[nn.Module]:
    """Within the block, calls `model(x)` without `cam_label` use `camids` (0-based, one per image) for SIE.

    Works for code that calls the model itself, e.g. torchreid's stock `FeatureExtractor`::

        with camera_ids(extractor.model, [0, 3, 5]):
            feats = extractor(["a.jpg", "b.jpg", "c.jpg"])

    The ids apply to every call inside the block, and each call checks that the batch size matches. Not for a
    model wrapped in `nn.DataParallel` (each replica would see the whole list): pass `cam_label=` there.
    """
    target = unwrap_model(model)
    if not isinstance(target, TorchreidTransReID):
        raise TypeError("camera_ids() needs a model built by reid_lite.integrations.torchreid "
                        f"(got {type(target).__name__}); a plain TransReID takes cam_label= directly")
    previous = target._pending_camids
    target._pending_camids = torch.as_tensor(camids, dtype=torch.long).reshape(-1)
    try:
        yield model
    finally:
        target._pending_camids = previous
