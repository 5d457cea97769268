"""Per-epoch learning-rate schedules: TransReID's cosine (timm's formula) or a multi-step decay, with warm-up.

    scheduler = create_scheduler(cfg, optimizer)
    scheduler.step(epoch)                       # at the start of each (1-based) epoch, as the official loop does
    scheduler.step_within(epoch, i / n_iters)   # before each step of a warm-up epoch (per-step warm-up)

The learning rate is a pure function of the training progress `t` (epochs completed, 0-based: epoch e
starts at t = e - 1) and the config, so the scheduler's state is just the last epoch it applied (a plain
dict: a resumed run gets the same rates).

Two departures from the official loop, which calls timm's scheduler with the 1-based epoch: there,
WARMUP_EPOCHS 1 gives no warm-up at all (t = 1 is already past it) and the last epoch runs at `lr_min`
(t = MAX_EPOCHS is past the cosine), a sixteenth of a 16-epoch schedule wasted. Counting from 0 the first
epoch is warm-up when WARMUP_EPOCHS >= 1 and the last runs at the cosine's last step above `lr_min`.
Over the official 120 epochs the two differ by one epoch's shift.
"""

from __future__ import annotations

import bisect
import math
from typing import Any

import torch

from ..config import SCHEDULERS, WARMUP_METHODS

__all__ = ["EpochLRScheduler", "create_scheduler"]

LR_MIN_FACTOR = 0.002  # the official create_scheduler: lr_min = 0.002 * BASE_LR


class EpochLRScheduler:
    """Sets every parameter group's lr for an epoch; groups keep their own initial lr (bias/classifier factors).

    `t` is the training progress in epochs, 0-based (epoch e runs from t = e - 1; fractional within warm-up).
    cosine (the official `create_scheduler`, timm's CosineLRScheduler with one cycle): after warm-up,
    `lr_min + (lr0 - lr_min) (1 + cos(pi t / T)) / 2` with T = MAX_EPOCHS, lr_min = 0.002 BASE_LR, and
    `lr_min` from t = T on. Warm-up over t < WARMUP_EPOCHS starts at
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

    def lr_at(self, t: float) -> list[float]:
        """Each group's lr at training progress `t` (epochs completed; epoch e starts at t = e - 1)."""
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
        """Apply the learning rates of (1-based) `epoch`'s start."""
        self._apply(epoch - 1)
        self.last_epoch = int(epoch)

    def in_warmup(self, epoch: int) -> bool:
        """Whether (1-based) `epoch` lies in the warm-up, where the rate changes every step."""
        return epoch - 1 < self.warmup_epochs

    def step_within(self, epoch: int, fraction: float) -> None:
        """Apply the learning rates at `fraction` (in [0, 1)) of (1-based) `epoch`: the per-step warm-up."""
        self._apply(epoch - 1 + float(fraction))

    def _apply(self, t: float) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.lr_at(t)):
            group["lr"] = lr

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
