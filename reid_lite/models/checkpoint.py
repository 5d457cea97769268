"""Checkpoint loading beside the model (as timm keeps its filters): official TransReID state dicts and
ImageNet ViT weights in timm's naming. Files load with `torch.load(weights_only=True)`; a file that needs
arbitrary unpickling is refused unless the caller trusts it explicitly.
"""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded: unsafe, missing, or not matching the model."""


def read_state_dict(path: str | Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from `path` (unwrapping 'model' / 'state_dict' and a 'module.' prefix).

    Uses `weights_only=True`; with `trust=True` falls back to full unpickling (only for files you trust).
    Raises `CheckpointError` with one line saying what is wrong: a missing path, a directory, an empty
    file, a file that is no PyTorch checkpoint at all (text, YAML, an image), or one holding objects that
    weights-only loading refuses (only then is MODEL.TRUST_CHECKPOINT suggested).
    """
    p = Path(path)
    check_checkpoint_file(p)
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = _blocked_global(e)
        if blocked:
            # torch blocks modules such as os, subprocess and sys outright: no checkpoint needs them, and a file
            # that names one is built to run code when loaded. Refused even with MODEL.TRUST_CHECKPOINT.
            raise CheckpointError(f"{p} was refused as unsafe: loading it would call {blocked} (code execution, "
                                  "not weights); it is not loaded, even with MODEL.TRUST_CHECKPOINT") from None
        if not _is_forbidden_global(e):
            raise CheckpointError(f"{p} is not a readable PyTorch checkpoint ({_unpickling_reason(e)})") from None
        if not trust:
            raise CheckpointError(
                f"{p} was refused as unsafe: it contains objects that weights-only loading refuses "
                f"({_unpickling_reason(e)}). If you trust "
                "this file, set MODEL.TRUST_CHECKPOINT True (it will be unpickled, which can run code)."
            ) from None
        obj = torch.load(p, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError) as e:
        reason = str(e).split(". ")[0] or type(e).__name__
        raise CheckpointError(f"{p} is not a readable PyTorch checkpoint (truncated or damaged?): {reason}") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{p} does not hold a state dict of tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def check_checkpoint_file(path: str | Path) -> None:
    """Raise `CheckpointError` unless `path` is a non-empty file in one of torch.save's formats.

    torch.save writes a zip archive (the default since PyTorch 1.6) or, in the legacy format, a pickle
    that starts with the PROTO opcode (0x80). Anything else (a YAML config, a text file, an image) is
    said to be what it is instead of surfacing as an unpickling error.
    """
    p = Path(path)
    if p.is_dir():
        inside = sorted(str(f) for f in p.glob("*.pth"))[:3]
        hint = f", e.g. {', '.join(inside)}" if inside else ""
        raise CheckpointError(f"{p} is a directory, not a checkpoint file: give the path of a .pth file{hint}")
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p} (set the path in the config, e.g. TEST.WEIGHT)")
    size = p.stat().st_size
    if size == 0:
        raise CheckpointError(f"{p} is empty (0 bytes): not a checkpoint (an interrupted save or copy?)")
    with open(p, "rb") as fh:
        head = fh.read(512)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return
    kind = "a text file" if _looks_like_text(head) else "not in torch.save's format"
    raise CheckpointError(f"{p} is not a PyTorch checkpoint ({kind}, {size} bytes): give a .pth file saved "
                          "with torch.save (TEST.WEIGHT, --weights), not a config or other file")


def _looks_like_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\x00" not in head


def _blocked_global(err: pickle.UnpicklingError) -> str:
    """The function a weights-only load refused because its module is blocked (e.g. 'posix.system'), or ''."""
    match = re.search(r"unsupported GLOBAL (\S+) whose module \S+ is blocked", str(err))
    return match.group(1) if match else ""


def _is_forbidden_global(err: pickle.UnpicklingError) -> bool:
    """Whether weights-only loading refused a class or function the file names (the only case in which
    full unpickling would help), as opposed to a stream that is not a pickle at all."""
    return "Unsupported global" in str(err) or "not an allowed global" in str(err)


def _unpickling_reason(err: pickle.UnpicklingError) -> str:
    """The informative part of torch's long weights-only message (e.g. 'Unsupported global: GLOBAL x.Y ...')."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    text = " ".join(text.split())
    return text.split(". ")[0][:200] or type(err).__name__


def _numpy_scalar_globals() -> list:
    """What unpickling plain numpy scalars needs. Training loops (torchreid's among them) store metrics
    such as `rank1` as numpy scalars beside the weights; rebuilding a numeric scalar from its dtype and
    bytes runs no code, so allowing these keeps the load weights-only."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    kinds = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
             np.float16, np.float32, np.float64)
    return [core.multiarray.scalar, np.dtype, *{type(np.dtype(k)) for k in kinds}]


def sie_table_cameras(state: dict[str, torch.Tensor], view_num: int = 0) -> int:
    """Cameras of the camera SIE table in a TransReID state dict (0 when it has none).

    The table (`base.sie_embed`, or `sie_embed` in a bare backbone) has one row per camera, or
    camera x view rows when both SIE kinds are on; `view_num` > 1 says the latter.
    """
    table = state.get("base.sie_embed", state.get("sie_embed"))
    if table is None:
        return 0
    rows = int(table.shape[0])
    return rows // view_num if view_num > 1 else rows


def transreid_filter(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapt an official TransReID state dict: the official ViT keeps an unused ImageNet head
    (`base.fc`, never called in forward) that has no counterpart here; dropping it changes nothing."""
    return {k: v for k, v in state.items() if not k.startswith("base.fc.")}


def check_and_load(module: nn.Module, state: dict[str, torch.Tensor], source: str, strict: bool = True) -> None:
    """Load `state` into `module`, raising one error that lists every missing, unexpected and
    mis-shaped key (a strict load) instead of stopping at the first."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state)) if strict else []
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in state.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or shapes:
        lines = [f"{source} does not match the model:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                more = " ..." if len(items) > 20 else ""
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + more)
        raise CheckpointError("\n".join(lines))
    module.load_state_dict(state, strict=strict)


def load_transreid_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "state dict",
                         ignore_classifier: bool = False) -> None:
    """Load an official-layout TransReID state dict strictly (see `load_transreid_checkpoint`). Learned
    merging weights (DTEM's embedding) follow `reid_lite.merging.learned.resolve_learned_state`: a model
    whose embedding is pending needs them in `state`."""
    from ..merging.learned import mark_loaded, resolve_learned_state

    state, learned = resolve_learned_state(model, transreid_filter(state), source)
    if ignore_classifier:
        state = {k: v for k, v in state.items() if not k.startswith("classifier")}
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("classifier")})
    check_and_load(model, state, source)
    if learned:
        mark_loaded(model)
    from ..merging.budget import refresh_budget

    refresh_budget(model)  # an image-dependent budget was solved on the previous weights


def load_transreid_checkpoint(model: nn.Module, path: str | Path, trust: bool = False,
                              ignore_classifier: bool = False) -> None:
    """Load an official TransReID checkpoint (keys `base.*`, `b1.*`, `b2.*`, `bottleneck*`, `classifier*`)
    strictly. `ignore_classifier` drops the identity classifiers, for evaluating on other identities."""
    load_transreid_state(model, read_state_dict(path, trust), str(path), ignore_classifier)


def resize_pos_embed(posemb: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resample a (1, 1+G*G, D) position embedding to `grid` (rows, cols) as the official code does
    (bilinear, align_corners=False), keeping the class token's entry."""
    tok, old = posemb[:, :1], posemb[0, 1:]
    gs = int(math.sqrt(len(old)))
    if gs * gs != len(old):
        raise CheckpointError(f"cannot resize a position embedding of {len(old)} patches (not a square grid)")
    old = old.reshape(1, gs, gs, -1).permute(0, 3, 1, 2)
    new = F.interpolate(old, size=grid, mode="bilinear").permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
    return torch.cat([tok, new], dim=1)


def imagenet_filter(state: dict[str, torch.Tensor], backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Adapt a timm-format ImageNet ViT/DeiT state dict to a TransReID backbone (the official `load_param`):
    drop the classification heads and distillation token, reshape a linear patch projection, resample
    `pos_embed` to the backbone's patch grid."""
    out = {}
    for k, v in state.items():
        if "head" in k or "dist" in k:
            continue
        if k == "patch_embed.proj.weight" and v.dim() < 4:
            v = v.reshape(backbone.patch_embed.proj.weight.shape)
        elif k == "pos_embed" and v.shape != backbone.pos_embed.shape:
            if "dist_token" in state:
                v = torch.cat([v[:, :1], v[:, 2:]], dim=1)  # distilled models carry a second prefix token
            v = resize_pos_embed(v, backbone.patch_embed.grid_size)
        out[k] = v
    return out


def load_imagenet_backbone(backbone: nn.Module, path: str | Path, trust: bool = False) -> None:
    """Initialise a TransReID backbone from an ImageNet ViT file; the SIE table stays freshly initialised."""
    state = imagenet_filter(read_state_dict(path, trust), backbone)
    own = backbone.state_dict()
    # ImageNet files have no SIE table and (for JPM) the backbone keeps its own final norm.
    for k in own:
        if k not in state and k.startswith("sie_embed"):
            state[k] = own[k]
    check_and_load(backbone, state, str(path))
