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

import contextlib
import functools
import importlib
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn
from yacs.config import CfgNode

from ..config import CONFIG_DIR, config_plugins, load_cfg
from ..merging import get_method, load_plugins, method_names, option_key, option_names
from ..models import TransReID
from ..models import build_model as _build_reid_model
from ..models.checkpoint import (
    CheckpointError,
    load_transreid_state,
    read_state_dict,
    sie_table_cameras,
    transreid_filter,
)

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install -e .[torchreid]"


def model_names() -> dict[str, str]:
    """torchreid model name -> MERGE.METHOD, for every registered method ('none' is `transreid_base`)."""
    return {f"transreid_{'base' if m == 'none' else m}": m for m in method_names()}


def default_config(method: str) -> str:
    """The config a method's model starts from: configs/market1501_<method>.yml, else market1501_base.yml."""
    name = f"market1501_{'base' if method == 'none' else method}.yml"
    return name if (CONFIG_DIR / name).is_file() else "market1501_base.yml"

# Camera count of each published dataset, the SIE table size when neither `camera_num=` nor a checkpoint
# says otherwise (DATASETS.NAMES of the config in use).
_DATASET_CAMERAS = {"market1501": 6, "msmt17": 15, "dukemtmcreid": 8}
_LOSSES = ("softmax", "triplet")
_JPM_LOSSES = ("official", "equal", "global")
_SUBMODULES = ("models", "utils", "metrics", "data", "engine", "losses", "optim")
_OWNED = "_reid_lite_model"  # attribute marking the factory functions (and datasets) registered by us


# ----------------------------------------------------------------------------------------- torchreid layout
def torchreid_modules() -> SimpleNamespace:
    """torchreid's submodules for whichever layout is installed.

    Returns a namespace with `models`, `utils`, `metrics`, `data`, `engine`, `losses`, `optim` and `layout`:
    'pypi' for the PyPI package 0.2.5 (code under `torchreid.reid.*`) or 'source' for a source install of
    deep-person-reid (`torchreid.models`, ...). Raises ImportError naming `pip install -e .[torchreid]` when
    torchreid (or one of its import-time dependencies, gdown and tensorboard) is missing.
    """
    try:
        importlib.import_module("torchreid")
    except ImportError as e:
        raise ImportError(f"the torchreid adapter needs torchreid (and gdown, tensorboard): {INSTALL_HINT} "
                          f"[{e.__class__.__name__}: {e}]") from e
    for layout, prefix in (("pypi", "torchreid.reid"), ("source", "torchreid")):
        try:
            mods = {name: importlib.import_module(f"{prefix}.{name}") for name in _SUBMODULES}
        except ModuleNotFoundError as e:
            # Only "this layout is absent" moves on; a missing dependency inside torchreid is reported as is.
            if e.name and e.name != "torchreid" and any(f"{prefix}.{n}" == e.name or prefix == e.name
                                                        for n in _SUBMODULES):
                continue
            raise ImportError(f"torchreid is installed but cannot be imported: {e}. Try {INSTALL_HINT}") from e
        return SimpleNamespace(layout=layout, **mods)
    raise ImportError(f"torchreid is installed but has neither torchreid.reid.models (PyPI 0.2.5) nor "
                      f"torchreid.models (source install); reinstall it: {INSTALL_HINT}")


def _model_factory(tr: SimpleNamespace) -> dict[str, Callable[..., nn.Module]]:
    # torchreid keeps its registry in a module-level dict; `build_model` reads it at call time.
    return getattr(tr.models, "__model_factory")


# ----------------------------------------------------------------------------------------- the model
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


def _unwrap(model: nn.Module) -> nn.Module:
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
    target = _unwrap(model)
    if not isinstance(target, TorchreidTransReID):
        raise TypeError("camera_ids() needs a model built by reid_lite.integrations.torchreid "
                        f"(got {type(target).__name__}); a plain TransReID takes cam_label= directly")
    previous = target._pending_camids
    target._pending_camids = torch.as_tensor(camids, dtype=torch.long).reshape(-1)
    try:
        yield model
    finally:
        target._pending_camids = previous


# ----------------------------------------------------------------------------------------- building
def _merge_option_key(cfg: CfgNode, name: str) -> tuple[CfgNode, str]:
    """MERGE node and key for a keyword option, with `merge_cfg`'s naming (`r`, `layers`, `stm_coords`...)."""
    try:
        return option_key(cfg.MERGE, name)
    except KeyError:
        raise TypeError(f"unknown option {name!r}: merging options are {option_names(cfg.MERGE)}; model options "
                        "are config_file, opts, camera_num, view_num, weights, pretrain_path, trust, "
                        "default_camera, jpm_loss") from None


def _coerce(current: Any, value: Any) -> Any:
    if isinstance(current, (list, tuple)):
        return list(value) if isinstance(value, (list, tuple)) else [value]
    if isinstance(current, bool):
        return bool(value)
    return type(current)(value)


def _camera_count(cfg: CfgNode, camera_num: int | None, state: Mapping[str, Tensor] | None) -> int:
    if not cfg.MODEL.SIE_CAMERA:
        return 0
    if camera_num is None and state is not None and not cfg.MODEL.SIE_VIEW:
        camera_num = sie_table_cameras(state)  # 0 without a table: trained without camera SIE
    if camera_num is None:
        camera_num = _DATASET_CAMERAS.get(str(cfg.DATASETS.NAMES).lower(), 0)
    # One camera carries no side information, and TransReID creates no table for it (but would index one).
    return camera_num if camera_num > 1 else 0


def _load_weights(model: TransReID, state: Mapping[str, Tensor], source: str) -> None:
    own = model.state_dict()
    differ = any(k in own and own[k].shape != v.shape for k, v in state.items() if k.startswith("classifier"))
    if differ:
        # Another identity count (FeatureExtractor builds with num_classes=1, fine-tuning on a new dataset):
        # the classifiers do not take part in the features, keep the fresh ones.
        logger.info("%s: classifier shapes differ from num_classes=%d, keeping the model's classifiers",
                    source, model.num_classes)
    load_transreid_state(model, dict(state), source, ignore_classifier=differ)


def _read_weights(weights: str | Path | Mapping[str, Tensor], trust: bool) -> dict[str, Tensor]:
    if isinstance(weights, Mapping):
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in weights.items()}
    else:
        state = read_state_dict(weights, trust)
    return transreid_filter(state)


def build_transreid(
    num_classes: int | None,
    loss: str = "softmax",
    pretrained: bool = False,
    use_gpu: bool = True,
    *,
    method: str = "stm",
    config_file: str | Path | None = None,
    opts: Sequence[Any] = (),
    camera_num: int | None = None,
    view_num: int = 0,
    weights: str | Path | Mapping[str, Tensor] | None = None,
    pretrain_path: str | Path | None = None,
    trust: bool = False,
    default_camera: int | None = 0,
    jpm_loss: str = "official",
    **merge_options: Any,
) -> TorchreidTransReID:
    """Build TransReID with token merging as a torchreid model (the body of every registered factory).

    Args:
        num_classes: training identities (classifier rows); None takes the count from `weights` (1 without).
            `loss`: 'softmax' or 'triplet' (train outputs).
        pretrained: True requires local weights (`weights`, `pretrain_path` or the config's
            MODEL.PRETRAIN_PATH) and raises otherwise; nothing is ever downloaded. `use_gpu`: ignored (torchreid
            moves the model itself).
        method: MERGE.METHOD, any registered method ('none', 'tome', 'evit', 'stm', or one from a file listed
            in `opts`' MERGE.PLUGINS); it overrides the config file's.
        config_file: one of our yml configs (a bare name is looked up in `configs/`); default
            `market1501_<method>.yml` (else `market1501_base.yml`), the paper's setting. `opts`:
            `[KEY, VALUE, ...]` overrides on top.
        camera_num: SIE camera table size; default: the checkpoint's table, else the config dataset's camera
            count (Market 6, MSMT17 15, Duke 8). Below 2 disables camera SIE. `view_num`: SIE views.
        weights: a TransReID checkpoint (path or state dict) loaded strictly, classifiers excepted when
            `num_classes` differs. `pretrain_path`: a timm-format ImageNet ViT file for the backbone.
        trust: allow full unpickling of a checkpoint that weights-only loading refuses (trusted files only).
        default_camera: camera id SIE uses when none is given; None makes a missing camera an error.
        jpm_loss: 'official', 'equal' or 'global': how JPM's five branches map to torchreid's losses.
        **merge_options: MERGE keys by lower-case name, as `merge_cfg` takes them: `r`, `layers`, `r_list`,
            `target_gflops`, `prop_attn`, `stm_coords`, `stm_entropy`, `evit_keep_rate`, ...
    """
    if loss not in _LOSSES:
        raise ValueError(f"loss must be one of {_LOSSES}, got {loss!r}")
    if jpm_loss not in _JPM_LOSSES:
        raise ValueError(f"jpm_loss must be one of {_JPM_LOSSES}, got {jpm_loss!r}")
    load_plugins(config_plugins(config_file, list(opts)))  # a plugin's method must be known to be checked
    method = get_method(method).name
    cfg = load_cfg(config_file or default_config(method), list(opts)).clone()
    cfg.defrost()
    if "MERGE.METHOD" in list(opts)[::2] and cfg.MERGE.METHOD.lower() != method:
        raise ValueError(f"opts set MERGE.METHOD {cfg.MERGE.METHOD!r} but this model's method is {method!r}")
    cfg.MERGE.METHOD = method
    for name, value in merge_options.items():
        node, key = _merge_option_key(cfg, name)
        node[key] = _coerce(node[key], value)
    if pretrain_path:
        cfg.MODEL.PRETRAIN_CHOICE, cfg.MODEL.PRETRAIN_PATH = "imagenet", str(pretrain_path)
    if weights is not None:
        cfg.MODEL.PRETRAIN_CHOICE = "none"  # the full checkpoint replaces any backbone initialisation
    if pretrained and weights is None and not cfg.MODEL.PRETRAIN_PATH:
        raise CheckpointError("pretrained=True needs local weights: pass weights= (a TransReID checkpoint) or "
                              "pretrain_path= (a timm-format ImageNet ViT file); nothing is downloaded. For "
                              "torchreid's build_model/FeatureExtractor, bind them with register_model(..., "
                              "weights=...) or give FeatureExtractor a model_path.")
    cfg.MODEL.TRUST_CHECKPOINT = bool(trust or cfg.MODEL.TRUST_CHECKPOINT)
    state = _read_weights(weights, cfg.MODEL.TRUST_CHECKPOINT) if weights is not None else None
    cams = _camera_count(cfg, camera_num, state)
    if num_classes is None:
        num_classes = int(state["classifier.weight"].shape[0]) if state and "classifier.weight" in state else 1
    if default_camera is not None and cams and not 0 <= default_camera < cams:
        raise ValueError(f"default_camera {default_camera} is outside the SIE table (0..{cams - 1})")
    if not cams:
        cfg.MODEL.SIE_CAMERA = False  # as documented above: below 2 cameras this factory builds without SIE
    cfg.freeze()
    model = _build_reid_model(cfg, num_classes, cams, view_num)
    # Same parameters, new calling convention: switching the class keeps weights and merging in the one
    # builder (reid_lite.models.build_model) instead of duplicating it here.
    model.__class__ = TorchreidTransReID
    model._setup_torchreid(loss, jpm_loss, default_camera, cfg)
    if state is not None:
        _load_weights(model, state, str(weights) if not isinstance(weights, Mapping) else "weights")
    return model


def _factory(method: str, options: dict[str, Any], name: str) -> Callable[..., TorchreidTransReID]:
    def factory(num_classes: int, loss: str = "softmax", pretrained: bool = False, use_gpu: bool = True,
                **overrides: Any) -> TorchreidTransReID:
        return build_transreid(num_classes, loss, pretrained, use_gpu, method=method, **{**options, **overrides})

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"torchreid factory for {name!r}: build_transreid(method={method!r}, **{options!r})."
    setattr(factory, _OWNED, (method, dict(options)))
    return factory


def transreid_base(num_classes: int, loss: str = "softmax", pretrained: bool = False, use_gpu: bool = True,
                   **options: Any) -> TorchreidTransReID:
    """TransReID without token merging (20.41 GFLOPs at the paper's setting). Options: `build_transreid`."""
    return build_transreid(num_classes, loss, pretrained, use_gpu, method="none", **options)


def transreid_tome(num_classes: int, loss: str = "softmax", pretrained: bool = False, use_gpu: bool = True,
                   **options: Any) -> TorchreidTransReID:
    """TransReID + ToMe (r=8 in blocks 1-10 by default). Options: `build_transreid`."""
    return build_transreid(num_classes, loss, pretrained, use_gpu, method="tome", **options)


def transreid_evit(num_classes: int, loss: str = "softmax", pretrained: bool = False, use_gpu: bool = True,
                   **options: Any) -> TorchreidTransReID:
    """TransReID + EViT (keep rate 0.9 in blocks 4, 7, 10 by default). Options: `build_transreid`."""
    return build_transreid(num_classes, loss, pretrained, use_gpu, method="evit", **options)


def transreid_stm(num_classes: int, loss: str = "softmax", pretrained: bool = False, use_gpu: bool = True,
                  **options: Any) -> TorchreidTransReID:
    """TransReID + STM-ReID (r=8 in blocks 1-10 by default, 15.53 GFLOPs). Options: `build_transreid`."""
    return build_transreid(num_classes, loss, pretrained, use_gpu, method="stm", **options)


def register_model(name: str, method: str = "stm", *, overwrite: bool = False, **options: Any) -> str:
    """Register `name` in torchreid's model factory as our TransReID with `options` bound.

    `options` are `build_transreid`'s keywords (e.g. `r=12`, `stm_coords='tracked'`, `config_file=...`,
    `weights='model.pth'`, `camera_num=15`); torchreid's `build_model` then passes only `num_classes`,
    `loss`, `pretrained`, `use_gpu`. Re-registering one of our names replaces it; a name held by another
    model raises ValueError unless `overwrite`. Returns `name`.
    """
    method = get_method(method).name
    registry = _model_factory(torchreid_modules())
    current = registry.get(name)
    if current is not None and not hasattr(current, _OWNED) and not overwrite:
        raise ValueError(f"torchreid already has a model named {name!r}; choose another name or pass overwrite=True")
    registry[name] = _factory(method, options, name)
    return name


def register_models(**options: Any) -> list[str]:
    """Register `transreid_base` and `transreid_<method>` for every registered merging method in torchreid's
    model factory (idempotent; `options` are bound to all of them). Returns the names."""
    return [register_model(name, method, **options) for name, method in model_names().items()]


def _factory_options(name: str) -> tuple[str, dict[str, Any]] | None:
    """(method, bound options) of a model name registered by us, None for torchreid's own models."""
    factory = _model_factory(torchreid_modules()).get(name)
    return getattr(factory, _OWNED, None) if factory is not None else None


# ----------------------------------------------------------------------------------------- data
def torchreid_data_kwargs(model: nn.Module) -> dict[str, Any]:
    """`ImageDataManager` keywords matching the model's input: height, width, norm_mean, norm_std.

    TransReID's configs normalise with mean = std = 0.5, not torchreid's ImageNet default; the model's
    position embedding fixes the input size.
    """
    cfg = _unwrap(model).cfg
    h, w = cfg.INPUT.SIZE_TEST
    return dict(height=int(h), width=int(w), norm_mean=list(cfg.INPUT.PIXEL_MEAN), norm_std=list(cfg.INPUT.PIXEL_STD))


def register_dataset(name: str, reid_lite_dataset: str = "market1501", **dataset_kwargs: Any) -> str:
    """Make one of reid_lite's dataset readers a torchreid image dataset: `ImageDataManager(root=..., sources=name)`.

    `reid_lite_dataset` is a `reid_lite.data.build_dataset` name ('market1501', 'msmt17', 'dukemtmcreid',
    'folder', ...) and `dataset_kwargs` go to it. The reader takes `root` as the dataset folder or its parent,
    never downloads, and gives 0-based camera ids as torchreid does. Idempotent for our own names. Returns `name`.
    """
    tr = torchreid_modules()
    from ..data.datasets import build_dataset

    base = tr.data.ImageDataset

    class ReidLiteImageDataset(base):  # type: ignore[misc, valid-type]
        def __init__(self, root: str = "", **kwargs: Any) -> None:
            ds = build_dataset(reid_lite_dataset, root or ".", **dataset_kwargs)
            # torchreid's records are (path, pid, camid); reid_lite adds a view id torchreid has no use for.
            train, query, gallery = ([(p, pid, cam) for p, pid, cam, _ in split]
                                     for split in (ds.train, ds.query, ds.gallery))
            super().__init__(train, query, gallery, **kwargs)

    ReidLiteImageDataset.__name__ = ReidLiteImageDataset.__qualname__ = f"ReidLite[{name}]"
    setattr(ReidLiteImageDataset, _OWNED, reid_lite_dataset)
    registry = getattr(tr.data.datasets, "__image_datasets")
    if name in registry:
        if not hasattr(registry[name], _OWNED):
            raise ValueError(f"torchreid already has an image dataset named {name!r}")
        registry[name] = ReidLiteImageDataset  # register_image_dataset refuses existing names
    else:
        tr.data.register_image_dataset(name, ReidLiteImageDataset)
    return name


# ----------------------------------------------------------------------------------------- engines
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
        takes_cameras = isinstance(_unwrap(self.model), TransReID)  # type: ignore[attr-defined]
        if camids is None or len(camids) != input.shape[0] or not takes_cameras:
            return self.model(input)  # type: ignore[attr-defined]
        return self.model(input, cam_label=camids.to(input.device))  # type: ignore[attr-defined]

    def forward_backward(self, data: dict[str, Any]) -> dict[str, float]:
        model = self.model  # type: ignore[has-type]
        if not isinstance(_unwrap(model), TransReID):  # other torchreid models take no cameras
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
            owned = _factory_options(model_name)
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
            if camids is None or not isinstance(_unwrap(self.model), TorchreidTransReID):
                return super().__call__(input)
            with camera_ids(self.model, camids):
                return super().__call__(input)

    return FeatureExtractor


@functools.cache
def _lazy_class(name: str) -> type:
    tr = torchreid_modules()
    if name == "FeatureExtractor":
        return _make_feature_extractor(tr.utils.FeatureExtractor)
    base = {"CameraAwareSoftmaxEngine": tr.engine.ImageSoftmaxEngine,
            "CameraAwareTripletEngine": tr.engine.ImageTripletEngine}[name]
    return type(name, (CameraAwareEngineMixin, base), {"__module__": __name__, "__doc__": (
        f"torchreid's {base.__name__} that passes each batch's camera ids to the model (SIE).")})


_LAZY = ("FeatureExtractor", "CameraAwareSoftmaxEngine", "CameraAwareTripletEngine")


def __getattr__(name: str) -> Any:
    # Classes deriving from torchreid's are created on first access, so importing this module needs no torchreid.
    if name in _LAZY:
        return _lazy_class(name)
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
