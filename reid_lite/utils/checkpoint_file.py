"""Reading a checkpoint file safely: `torch.load(weights_only=True)`, one-line errors (`CheckpointError`) for
a missing, empty, foreign, damaged or unsafe file. Below the merging methods and the models, which both read
weights (DTEM's embedding, TransReID checkpoints)."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import torch


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
    core = getattr(np, "_core", None) or np.core
    kinds = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
             np.float16, np.float32, np.float64)
    return [core.multiarray.scalar, np.dtype, *{type(np.dtype(k)) for k in kinds}]
