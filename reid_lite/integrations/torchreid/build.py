"""Building our models for torchreid: `build_transreid`, the factory functions and their registration."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor
from yacs.config import CfgNode

from ...build import build_model as _build_reid_model
from ...compress.budget import refresh_budget
from ...config import CONFIG_DIR, load_cfg, load_config_plugins
from ...merging import get_method, method_names, option_key, option_names
from ...models import TransReID
from ...models.checkpoint import load_transreid_state, sie_table_cameras, transreid_filter
from ...utils.checkpoint_file import CheckpointError, read_state_dict
from .layout import OWNED_MARKER, model_factory, torchreid_modules
from .model import TorchreidTransReID

logger = logging.getLogger(__name__)

# Camera count of each published dataset, the SIE table size when neither `camera_num=` nor a checkpoint
# says otherwise (DATASETS.NAMES of the config in use).
_DATASET_CAMERAS = {"market1501": 6, "msmt17": 15, "dukemtmcreid": 8}
_LOSSES = ("softmax", "triplet")
_JPM_LOSSES = ("official", "equal", "global")


def model_names() -> dict[str, str]:
    """torchreid model name -> MERGE.METHOD, for every registered method ('none' is `transreid_base`)."""
    return {f"transreid_{'base' if m == 'none' else m}": m for m in method_names()}


def default_config(method: str) -> str:
    """The config a method's model starts from: configs/market1501_<method>.yml, else market1501_base.yml."""
    name = f"market1501_{'base' if method == 'none' else method}.yml"
    return name if (CONFIG_DIR / name).is_file() else "market1501_base.yml"


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
    refresh_budget(model)  # an image-dependent budget was solved on the previous weights


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
    load_config_plugins(config_file, list(opts))  # a plugin's method must be known to be checked
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
    setattr(factory, OWNED_MARKER, (method, dict(options)))
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
    registry = model_factory(torchreid_modules())
    current = registry.get(name)
    if current is not None and not hasattr(current, OWNED_MARKER) and not overwrite:
        raise ValueError(f"torchreid already has a model named {name!r}; choose another name or pass overwrite=True")
    registry[name] = _factory(method, options, name)
    return name


def register_models(**options: Any) -> list[str]:
    """Register `transreid_base` and `transreid_<method>` for every registered merging method in torchreid's
    model factory (idempotent; `options` are bound to all of them). Returns the names."""
    return [register_model(name, method, **options) for name, method in model_names().items()]


def factory_options(name: str) -> tuple[str, dict[str, Any]] | None:
    """(method, bound options) of a model name registered by us, None for torchreid's own models."""
    factory = model_factory(torchreid_modules()).get(name)
    return getattr(factory, OWNED_MARKER, None) if factory is not None else None
