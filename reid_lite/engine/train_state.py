"""Resumable training state: everything a run needs to continue bit for bit, loadable with weights_only=True.

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

__all__ = ["STATE_FILE", "STATE_VERSION", "capture_rng", "find_resume_state", "load_train_state", "restore_rng",
           "save_train_state"]

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
