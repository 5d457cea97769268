"""Device selection and mixed-precision (autocast) contexts for inference."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch

logger = logging.getLogger(__name__)

__all__ = ["AMP_CHOICES", "amp_dtype", "autocast", "first_device_id", "launched_by_torchrun", "resolve_device"]

AMP_CHOICES = ("auto", "fp32", "fp16", "bf16")


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher) set WORLD_SIZE and RANK."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def resolve_device(cfg_device: str | torch.device | None = "cuda", device_id: str | int | None = None) -> torch.device:
    """The torch device for MODEL.DEVICE ('cuda', 'cuda:1', 'cpu', ...).

    A CUDA request on a machine without CUDA falls back to the CPU with a logged warning rather than
    failing, so that the same config runs on a laptop; `device_id` (MODEL.DEVICE_ID, e.g. '0' or '0,1')
    picks the GPU when the device string has no index (the first id when several are listed).
    """
    if isinstance(cfg_device, torch.device):
        dev = cfg_device
    else:
        name = (cfg_device or "cuda").strip().lower()
        if name == "gpu":
            name = "cuda"
        try:
            dev = torch.device(name)
        except RuntimeError as err:
            raise ValueError(f"unknown device {cfg_device!r} (use 'cuda', 'cuda:N' or 'cpu')") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            logger.warning("MODEL.DEVICE is %r but CUDA is not available: running on the CPU", str(cfg_device))
            return torch.device("cpu")
        first = first_device_id(device_id)
        if dev.index is None and first is not None:
            dev = torch.device("cuda", first)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"CUDA device {dev.index} requested, only {torch.cuda.device_count()} visible")
    return dev


def first_device_id(device_id: str | int | None) -> int | None:
    """The first GPU id of MODEL.DEVICE_ID: '0', '0,1', 1, or TransReID's "('0')"; None when it names none."""
    if device_id is None:
        return None
    first = str(device_id).strip("()'\" ").split(",")[0].strip("'\" ")
    return int(first) if first.isdigit() else None


def amp_dtype(device: torch.device, amp: str = "auto") -> torch.dtype | None:
    """The autocast dtype for TEST.AMP on `device`, or None for plain fp32.

    'auto' is bf16 on CUDA (same exponent range as fp32, so no overflow in attention logits and no
    loss scaling needed at inference) and fp32 on the CPU (CPU bf16 autocast is usually slower than
    fp32 without AMX, and would change the numbers of CPU reference runs).
    """
    amp = (amp or "auto").lower()
    if amp not in AMP_CHOICES:
        raise ValueError(f"TEST.AMP must be one of {AMP_CHOICES}, got {amp!r}")
    if amp == "fp32":
        return None
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.float16 if amp == "fp16" else torch.bfloat16


@contextlib.contextmanager
def autocast(device: torch.device, amp: str = "auto") -> Iterator[torch.dtype | None]:
    """`torch.autocast` for `device` and TEST.AMP, or a no-op for fp32; yields the dtype (or None)."""
    dtype = amp_dtype(device, amp)
    if dtype is None:
        yield None
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield dtype
