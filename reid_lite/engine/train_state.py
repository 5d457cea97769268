"""What training writes to disk: plain weights (`save_state_dict`) and the resumable training state, everything a
run needs to continue bit for bit; both load with weights_only=True.

OUTPUT_DIR/last_checkpoint.pth holds the model, optimiser, scheduler and GradScaler states, the position
(the epoch and the number of its global batches already trained; the sampler's order is a function of
the seed and the epoch, so the position is all it needs), the running epoch meters, the history, the best
evaluation so far, and the random states of torch (CPU and CUDA), numpy and Python, one set per process.
Random states are stored as tensors and plain lists, so no unpickling of arbitrary objects is needed.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["STATE_FILE", "STATE_VERSION", "capture_rng", "check_resume", "find_resume_state", "load_train_state",
           "restore_rng", "save_state_dict", "save_train_state"]

#: Config keys that fix the model's parameters: a state saved under other values cannot be loaded at all.
ARCHITECTURE_KEYS = ("MODEL.TRANSFORMER_TYPE", "MODEL.EMBED_DIM", "MODEL.DEPTH", "MODEL.NUM_HEADS",
                     "MODEL.STRIDE_SIZE", "MODEL.SIE_CAMERA", "MODEL.SIE_VIEW", "MODEL.JPM", "INPUT.SIZE_TRAIN",
                     "MERGE.METHOD")
#: Keys of the optimisation: a run resumed under other values is not the interrupted run (its schedule,
#: optimiser state and batches no longer fit), so they are refused unless forced (`--resume-force`).
TRAINING_KEYS = ("SOLVER.IMS_PER_BATCH", "SOLVER.BASE_LR", "SOLVER.OPTIMIZER_NAME", "DATALOADER.SAMPLER",
                 "DATALOADER.NUM_INSTANCE")

STATE_FILE = "last_checkpoint.pth"
STATE_VERSION = 1


def capture_rng() -> dict[str, Any]:
    """This process's random states as tensors and plain types (weights_only-loadable)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [int(version), list(mt), gauss],
        "numpy": [str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                  float(cached)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng`."""
    torch.set_rng_state(state["torch"])
    version, mt, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state_dict(model: nn.Module | dict[str, torch.Tensor], path: str | Path, half: bool = False) -> Path:
    """`torch.save(model.state_dict())` in the official key layout (loadable with weights_only=True).

    `model` may also be a state dict. `half` stores floating-point tensors as fp16 (half the size);
    `load_state_dict` casts them back to the model's dtype. Written to a temporary name and renamed, so a
    crash never leaves a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    items = model.state_dict() if isinstance(model, nn.Module) else model
    state = {k: (v.detach().to("cpu", torch.float16) if half and v.is_floating_point() else v.detach().cpu())
             for k, v in items.items()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def save_train_state(path: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` atomically (temporary name, then rename): a crash never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"version": STATE_VERSION, **state}, tmp)
    os.replace(tmp, path)
    return path


def load_train_state(path: str | Path) -> dict[str, Any]:
    """Read a training state with weights_only=True; a ValueError names the file when it is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable, truncated or foreign pickle: all mean "cannot resume from it"
        raise ValueError(f"cannot resume from {path}: {type(err).__name__}: {err}") from err
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION or "model" not in state:
        raise ValueError(f"cannot resume from {path}: not a reid_lite training state (version {STATE_VERSION})")
    return state


def find_resume_state(output_dir: str | Path) -> Path | None:
    """OUTPUT_DIR's resumable state file, or None when there is none."""
    path = Path(output_dir) / STATE_FILE
    return path if path.is_file() else None


def _value(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = node.get(part) if hasattr(node, "get") else None
    return list(node) if isinstance(node, (list, tuple)) else node


def check_resume(cfg: Any, state: dict[str, Any], path: str | Path, model_state: dict[str, torch.Tensor],
                 force: bool = False) -> list[str]:
    """Check that `state` (from `load_train_state`) continues the run `cfg` describes, before anything is loaded.

    Raises ValueError in one line: for a different architecture (ARCHITECTURE_KEYS of the saved config, or
    parameters whose names or shapes differ from `model_state`, the new model's), and for different
    TRAINING_KEYS unless `force`. Returns the forced differences (the caller logs them).
    """
    from yacs.config import CfgNode

    saved = CfgNode.load_cfg(state["config"]) if isinstance(state.get("config"), str) else None
    if saved is not None:
        arch = [f"{k} {_value(cfg, k)!r} (saved {_value(saved, k)!r})" for k in ARCHITECTURE_KEYS
                if _value(saved, k) is not None and _value(cfg, k) != _value(saved, k)]
        if arch:
            raise ValueError(f"cannot resume from {path}: it was saved by another architecture: {'; '.join(arch)}")
    own, theirs = model_state, state["model"]
    missing, unexpected = sorted(set(own) - set(theirs)), sorted(set(theirs) - set(own))
    shapes = [f"{k} {tuple(v.shape)} (saved {tuple(theirs[k].shape)})" for k, v in own.items()
              if k in theirs and tuple(v.shape) != tuple(theirs[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(shapes)} shape(s) differ, e.g. {shapes[0]}" if shapes else "",
                 f"{len(missing)} parameter(s) missing from it, e.g. {missing[0]}" if missing else "",
                 f"{len(unexpected)} unknown to this model, e.g. {unexpected[0]}" if unexpected else ""]
        raise ValueError(f"cannot resume from {path}: its model does not fit this config's (another architecture, "
                         f"dataset or camera count): {'; '.join(p for p in parts if p)}")
    if saved is None:
        return []
    changed = [f"{k} {_value(cfg, k)!r} (saved {_value(saved, k)!r})" for k in TRAINING_KEYS
               if _value(saved, k) is not None and _value(cfg, k) != _value(saved, k)]
    if changed and not force:
        raise ValueError(f"cannot resume from {path} with other training settings: {'; '.join(changed)}; restore "
                         "them, or pass --resume-force to continue with the new ones")
    return changed
