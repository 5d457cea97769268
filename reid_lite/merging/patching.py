"""ToMe-shaped use of the library: patch a model in place, then turn its knob.

    import timm
    from reid_lite import merging

    vit = timm.create_model("vit_small_patch16_224")
    merging.patch(vit, "stm", r=8)          # every block, as `tome.patch.timm(vit); vit.r = 8` does
    vit.r = 16                              # r changes afterwards, as with ToMe
    merging.retune(vit, stm_alpha=0.2)      # any other option of the method (its budget knob included)

Works on timm `VisionTransformer`s (their plain `Block`s; an attention mask passes through) and on
reid_lite's `TransReID`. The options are `merge_cfg`'s keywords; the MERGE section they make is
`model.merge_section`, the same section a configuration file gives, so a patched model equals the one the
config path builds.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from yacs.config import CfgNode

from .attach import apply_merging, merge_cfg, reducible_depth
from .knobs import set_overrides
from .registry import option_key
from .timm_vit import check_timm_vit

__all__ = ["patch", "retune"]


class _Retunable:
    """Mixed into a patched model's class: `model.r` reads and sets MERGE.R of `model.merge_section`."""

    @property
    def r(self) -> int:
        return int(self.merge_section.R)

    @r.setter
    def r(self, value: int) -> None:
        retune(self, r=int(value))


_RETUNABLE_CLASSES: dict[type, type] = {}


def _retunable(model: nn.Module) -> None:
    cls = type(model)
    if issubclass(cls, _Retunable):
        return
    if cls not in _RETUNABLE_CLASSES:
        _RETUNABLE_CLASSES[cls] = type(cls.__name__, (_Retunable, cls), {"__module__": cls.__module__})
    model.__class__ = _RETUNABLE_CLASSES[cls]


def check_patchable(model: nn.Module) -> None:
    """Raise TypeError unless `model` is a reid_lite TransReID or a timm ViT of plain blocks (see `check_timm_vit`)."""
    if hasattr(model, "set_reducers") and hasattr(model, "reducible_blocks"):
        return
    if not isinstance(getattr(model, "blocks", None), nn.Sequential) or not hasattr(model, "patch_embed"):
        raise TypeError(f"reid_lite.merging.patch takes a reid_lite TransReID or a timm VisionTransformer, "
                        f"not a {type(model).__name__}")
    check_timm_vit(model)


def patch(model: nn.Module, method: str = "tome", r: int = 8, layers: list[int] | None = None,
          **options: Any) -> nn.Module:
    """Make `model` reduce tokens with `method` (a registered name) and return it (patched in place).

    `r`: tokens removed per reducing block (methods that merge by bipartite matching). `layers`: the 1-based
    blocks that reduce; None means every block of a timm ViT (as ToMe's timm patch does) and every reducible
    block of a TransReID (its trunk; JPM's branch block excluded). `options`: `merge_cfg`'s keywords
    (`prop_attn=False`, `stm_alpha=0.2`, `evit_keep_rate=0.7`, `plugins=[...]`). Afterwards `model.r = 16`
    or `retune(model, **options)` changes the reduction; `model.merge_section` is the MERGE section in use.
    Raises TypeError for another kind of model or block, ValueError (naming the largest allowed r) for a
    schedule that does not fit the model.
    """
    check_patchable(model)
    if "target_gflops" in options or "target_latency_ms" in options:
        raise ValueError("patch() takes a fixed setting; GFLOPs and latency budgets are solved by "
                         "reid_lite.compress (merge_with_budget, apply_latency_budget)")
    if layers is None:
        layers = list(range(1, reducible_depth(model) + 1))
    section = merge_cfg(method, r, layers=list(layers), **options)
    apply_merging(model, section)
    model.merge_section = section
    _retunable(model)
    return model


def retune(model: nn.Module, **options: Any) -> nn.Module:
    """Change the reduction of a model `patch` made: `merge_cfg`'s keywords (`r=16`, `layers=[1, 2]`,
    `evit_keep_rate=0.6`), applied to `model.merge_section`; returns `model`. A constant `r` clears a per-layer
    `r_list`. The section is changed only when the new reduction builds (else its ValueError, model unchanged)."""
    section: CfgNode | None = getattr(model, "merge_section", None)
    if section is None:
        raise ValueError("retune() changes a model that reid_lite.merging.patch() patched; patch it first")
    new = section.clone()
    overrides = {}
    for name, value in options.items():
        node, key = option_key(new, name)
        overrides[key if node is new else f"{_node_name(new, node)}.{key}"] = value
    if "R" in overrides and "R_LIST" not in overrides:
        overrides["R_LIST"] = []
    set_overrides(new, overrides)
    apply_merging(model, new)
    model.merge_section = new
    return model


def _node_name(section: CfgNode, node: CfgNode) -> str:
    return next(name for name, value in section.items() if value is node)
