"""torchreid (deep-person-reid) adapter: our TransReID + token merging as torchreid models.

Quick start (see docs/torchreid.md for the full guide)::

    from reid_lite.integrations.torchreid import register_models, torchreid_modules
    register_models()                                   # adds transreid_{base,tome,evit,stm,...}
    tr = torchreid_modules()                            # torchreid.models / .reid.models, either layout
    model = tr.models.build_model("transreid_stm", num_classes=751, loss="triplet", pretrained=False)

What this module decides, and why:

* **Names.** `transreid_base` (no merging) and `transreid_<method>` for every registered merging method
  (`transreid_tome`, `transreid_evit`, `transreid_stm`, and methods registered from your own files), each
  with the paper's setting (`configs/market1501_<method>.yml` where it exists, else `market1501_base.yml`
  with the method set: ViT-B/16, 256x128, stride 12, SIE camera, JPM).
  torchreid's `build_model` forwards only `num_classes, loss, pretrained, use_gpu`, so any other option
  (merging `r=...`, `stm_coords=...`, `config_file=`, `opts=`, `weights=`, `camera_num=`) is given either by
  calling the factory function here directly (`transreid_stm(751, r=12)`) or by registering a named
  variant with the options bound (`register_model("my_stm", "stm", r=12, weights="x.pth")`).
* **Outputs.** eval: the feature (B, D), D = 5 x 768 with JPM. train, loss='softmax': logits; 'triplet':
  (logits, features). With JPM, logits and features are *lists* that torchreid's `Engine.compute_loss`
  averages (`DeepSupervision`) and whose first entry its `accuracy` reads. `jpm_loss='official'` (default)
  returns `[global] * 4 + [local_1..4]`, so that average is exactly TransReID's `0.5 * global + 0.5 *
  mean(locals)`; 'equal' returns the five branches once (weight 1/5 each); 'global' returns the global
  branch's single tensors (the local heads get no gradient).
* **Cameras.** torchreid never passes camera ids to a model. SIE then uses `default_camera` (0) for every
  image, with a warning once per model: such features differ from camera-aware ones. Pass the cameras
  with `camera_ids(model, camids)`, `FeatureExtractor(...)(images, camids=...)`, or the engines
  `CameraAwareSoftmaxEngine` / `CameraAwareTripletEngine`, which forward `data['camid']` in training and
  evaluation. `default_camera=None` makes a missing camera an error instead.
* **Checkpoints.** `weights=` / `FeatureExtractor(model_path=...)` load strictly (every key must match,
  else one error listing them) with `torch.load(weights_only=True)`, infer the SIE camera count from the
  file, accept a `module.` prefix and torchreid's `{'state_dict': ...}` files, and drop only the classifiers
  when the class count differs (they do not affect features). torchreid's own `load_pretrained_weights`
  skips every key whose name or shape does not match with a print, e.g. the SIE table of a checkpoint
  trained on another camera count, which silently changes the features.
* **No downloads.** `pretrained=True` needs a local `weights=` (TransReID checkpoint) or `pretrain_path=`
  (timm-format ImageNet ViT) and raises otherwise.

torchreid is imported only when a function here needs it; a missing install says `pip install -e .[torchreid]`.
"""

from __future__ import annotations

from typing import Any

from .build import (
    build_transreid,
    default_config,
    model_names,
    register_model,
    register_models,
    transreid_base,
    transreid_evit,
    transreid_stm,
    transreid_tome,
)
from .data import register_dataset, torchreid_data_kwargs
from .engines import LAZY, CameraAwareEngineMixin, lazy_class
from .layout import INSTALL_HINT, torchreid_modules
from .model import TorchreidTransReID, camera_ids


def __getattr__(name: str) -> Any:
    # Classes deriving from torchreid's are created on first access, so importing this module needs no torchreid.
    if name in LAZY:
        return lazy_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "INSTALL_HINT",
    "CameraAwareEngineMixin",
    "CameraAwareSoftmaxEngine",  # noqa: F822 (created lazily by __getattr__)
    "CameraAwareTripletEngine",  # noqa: F822 (created lazily by __getattr__)
    "FeatureExtractor",  # noqa: F822 (created lazily by __getattr__)
    "TorchreidTransReID",
    "build_transreid",
    "camera_ids",
    "default_config",
    "model_names",
    "register_dataset",
    "register_model",
    "register_models",
    "torchreid_data_kwargs",
    "torchreid_modules",
    "transreid_base",
    "transreid_evit",
    "transreid_stm",
    "transreid_tome",
]
