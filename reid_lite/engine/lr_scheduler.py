"""Per-epoch learning-rate schedules: TransReID's cosine (timm's formula) or a multi-step decay, with warm-up.

    scheduler = create_scheduler(cfg, optimizer)
    scheduler.step(epoch)        # at the start of each (1-based) epoch, as the official loop does

The learning rate is a pure function of the epoch and the config, so the scheduler's state is just the
last epoch it applied (a plain dict: a resumed run gets the same rates).
"""

from __future__ import annotations

import bisect
import math
from typing import Any

import torch

__all__ = ["SCHEDULERS", "WARMUP_METHODS", "EpochLRScheduler", "create_scheduler"]

SCHEDULERS = ("cosine", "multistep")
WARMUP_METHODS = ("linear", "constant")
LR_MIN_FACTOR = 0.002  # the official create_scheduler: lr_min = 0.002 * BASE_LR


class EpochLRScheduler:
    """Sets every parameter group's lr for an epoch; groups keep their own initial lr (bias/classifier factors).

    cosine (the official `create_scheduler`, timm's CosineLRScheduler with one cycle): after warm-up,
    `lr_min + (lr0 - lr_min) (1 + cos(pi t / T)) / 2` with T = MAX_EPOCHS, lr_min = 0.002 BASE_LR, and
    `lr_min` from t = T on. Warm-up over the first WARMUP_EPOCHS epochs starts at
    `warmup_lr_init = WARMUP_FACTOR * BASE_LR` (the same value for every group, as timm): 'linear' rises
    from it to each group's lr, 'constant' stays at it.
    multistep (reid-strong-baseline's WarmupMultiStepLR): `lr0 * GAMMA ** (number of STEPS <= t)`,
    times the warm-up factor: 'constant' WARMUP_FACTOR, 'linear' `WARMUP_FACTOR (1 - a) + a`, a = t / WARMUP_EPOCHS.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str, max_epochs: int, base_lr: float,
                 warmup_epochs: int = 0, warmup_factor: float = 0.01, warmup_method: str = "linear",
                 steps: tuple[int, ...] = (), gamma: float = 0.1) -> None:
        if kind not in SCHEDULERS:
            raise ValueError(f"SOLVER.SCHEDULER must be one of {SCHEDULERS}, got {kind!r}")
        if warmup_method not in WARMUP_METHODS:
            raise ValueError(f"SOLVER.WARMUP_METHOD must be one of {WARMUP_METHODS}, got {warmup_method!r}")
        if list(steps) != sorted(steps):
            raise ValueError(f"SOLVER.STEPS must be increasing, got {list(steps)}")
        self.optimizer = optimizer
        self.kind, self.max_epochs, self.base_lr = kind, int(max_epochs), float(base_lr)
        self.warmup_epochs, self.warmup_factor = int(warmup_epochs), float(warmup_factor)
        self.warmup_method = warmup_method
        self.steps, self.gamma = tuple(int(s) for s in steps), float(gamma)
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_values = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = -1

    def lr_at(self, epoch: int) -> list[float]:
        """Each group's lr at `epoch`."""
        t = epoch
        if self.kind == "multistep":
            if t < self.warmup_epochs:
                a = t / self.warmup_epochs
                factor = self.warmup_factor if self.warmup_method == "constant" else self.warmup_factor * (1 - a) + a
            else:
                factor = 1.0
            decay = self.gamma ** bisect.bisect_right(self.steps, t)
            return [v * factor * decay for v in self.base_values]
        init = self.warmup_factor * self.base_lr
        if t < self.warmup_epochs:
            if self.warmup_method == "constant":
                return [init for _ in self.base_values]
            return [init + t * (v - init) / self.warmup_epochs for v in self.base_values]
        lr_min = LR_MIN_FACTOR * self.base_lr
        if t >= self.max_epochs:
            return [lr_min for _ in self.base_values]
        return [lr_min + 0.5 * (v - lr_min) * (1 + math.cos(math.pi * t / self.max_epochs)) for v in self.base_values]

    def step(self, epoch: int) -> None:
        """Apply `epoch`'s learning rates."""
        for group, lr in zip(self.optimizer.param_groups, self.lr_at(epoch)):
            group["lr"] = lr
        self.last_epoch = int(epoch)

    def state_dict(self) -> dict[str, int]:
        """`{'last_epoch': e}`: everything else comes from the config."""
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the last applied epoch (and its learning rates)."""
        if state.get("last_epoch", -1) >= 0:
            self.step(int(state["last_epoch"]))


def create_scheduler(cfg: Any, optimizer: torch.optim.Optimizer) -> EpochLRScheduler:
    """The schedule SOLVER.SCHEDULER names ('cosine', the official one, or 'multistep' with STEPS/GAMMA),
    with SOLVER.WARMUP_EPOCHS / WARMUP_FACTOR / WARMUP_METHOD over SOLVER.MAX_EPOCHS."""
    s = cfg.SOLVER
    return EpochLRScheduler(optimizer, str(s.SCHEDULER).lower(), s.MAX_EPOCHS, s.BASE_LR, s.WARMUP_EPOCHS,
                            s.WARMUP_FACTOR, str(s.WARMUP_METHOD).lower(), tuple(s.STEPS), s.GAMMA)
