"""The training loop (`do_train`): the official epoch loop, short, with hooks around it.

`TrainLoop` holds one run's state and runs its epochs and steps (schedule, sampler position, forward with
AMP, the loss on the global batch, the optimiser step, the epoch meters); everything around them, resume,
the training state, checkpoints, evaluation with the best epoch kept, TensorBoard, the progress bar and the
log, is a hook (`hooks.py`). One optimiser step per global batch. On several processes (torchrun) the model
runs under DistributedDataParallel and the loss sees the whole global batch (`distributed.gather_cat`), so the
trained weights do not depend on the process count beyond floating-point order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..utils.device import amp_dtype
from .distributed import DistContext, gather_cat, gather_labels
from .hooks import EvaluateFn, TrainHook, default_hooks
from .losses import LossFn
from .lr_scheduler import EpochLRScheduler
from .train_state import save_state_dict

logger = logging.getLogger("reid_lite.train")

__all__ = ["EpochMeters", "EvaluateFn", "TrainLoop", "TrainResult", "do_train", "save_state_dict"]


@dataclass
class TrainResult:
    """What `do_train` / `train` produced."""

    final_checkpoint: Path
    checkpoints: list[Path] = field(default_factory=list)
    #: One dict per epoch: epoch, loss, acc, lr, seconds, images.
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    #: The trained model (unwrapped from DDP, on the training device, in train mode).
    model: nn.Module | None = None
    #: One dict per evaluation: epoch plus the evaluator's metrics.
    evals: list[dict[str, float]] = field(default_factory=list)
    #: The evaluation with the highest mAP so far (its weights are `<MODEL.NAME>_best.pth`), or None.
    best: dict[str, float] | None = None
    #: True when the run stopped early (`stop_after_steps`) with a resumable state; False when it finished.
    stopped: bool = False
    global_step: int = 0


def base_lr(optimizer: torch.optim.Optimizer, base: float) -> float:
    """Current lr of a group that started at BASE_LR (group 0 may be a bias with a factor)."""
    for group in optimizer.param_groups:
        if abs(group.get("initial_lr", group["lr"]) - base) <= 1e-12 * max(1.0, base):
            return group["lr"]
    return optimizer.param_groups[0]["lr"]


class EpochMeters:
    """Per-epoch running sums kept on the device (reading them is the only host sync, at log time)."""

    def __init__(self, device: torch.device, sums: list[float] | None = None, images: int = 0) -> None:
        # loss * images, acc * images, images: float64 so that saving and restoring them is exact.
        self.sums = torch.tensor(sums or [0.0, 0.0, 0.0], dtype=torch.float64, device=device)
        self.images = images

    def update(self, loss: torch.Tensor, correct: torch.Tensor, n: int) -> None:
        """Add a batch of `n` images with mean `loss` and `correct` top-1 hits."""
        n_t = torch.full((), float(n), dtype=torch.float64, device=loss.device)
        self.sums += torch.stack([loss.detach().double() * n_t, correct.detach().double(), n_t])
        self.images += n

    def averages(self) -> tuple[float, float]:
        """Mean loss and accuracy so far (NaN before the first image)."""
        loss, correct, n = self.sums.tolist()
        return (loss / n, correct / n) if n else (float("nan"), float("nan"))

    def state(self) -> list[float]:
        """The sums and the image count, as the training state stores them."""
        return [*self.sums.tolist(), self.images]


class TrainLoop:
    """One training run: its state (model, optimiser, schedule, position, result) and the epoch/step loop.

    Built by `do_train`, which documents the behaviour; `hooks` run at the points `hooks.TrainHook` lists,
    in their order. Attributes the hooks read: `cfg`, `ctx`, `model`, `out_dir`, `epochs`, `epoch`,
    `start_batch`, `n_iter`, `n_iters`, `steps_this_call`, `stopping`, `step_stats`, `result`.
    """

    def __init__(self, cfg: Any, model: nn.Module, train_loader: Iterable[Any], optimizer: torch.optim.Optimizer,
                 scheduler: EpochLRScheduler, loss_fn: LossFn, ctx: DistContext, device: torch.device,
                 out_dir: Path, hooks: Sequence[TrainHook] = (), stop_after_steps: int = 0,
                 distill: nn.Module | None = None) -> None:
        self.cfg, self.ctx, self.device, self.out_dir = cfg, ctx, device, out_dir
        self.epochs = int(cfg.SOLVER.MAX_EPOCHS)
        if self.epochs < 1:
            raise ValueError(f"SOLVER.MAX_EPOCHS must be >= 1, got {self.epochs}")
        self.log_period = max(1, int(cfg.SOLVER.LOG_PERIOD))
        self.dtype = amp_dtype(device, str(cfg.SOLVER.AMP))
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.model, self.net = model, self.wrap(model)
        self.loader, self.optimizer, self.scheduler, self.loss_fn = train_loader, optimizer, scheduler, loss_fn
        batches = getattr(train_loader, "batch_sampler", None)
        self.batches = batches if hasattr(batches, "set_epoch") else None
        self.hooks, self.stop_after_steps = list(hooks), stop_after_steps
        self.result = TrainResult(final_checkpoint=out_dir / f"{cfg.MODEL.NAME}_{self.epochs}.pth")
        self.epoch, self.start_batch, self.n_iter, self.n_iters = 1, 0, 0, 0
        self.meters = EpochMeters(device)
        self.meter_state: list[float] | None = None  # a resumed epoch's meters, used by its first `begin_epoch`
        self.steps_this_call, self.stopping = 0, False
        self.step_stats: dict[str, float] | None = None
        self.epoch_start = self.start = 0.0
        self.distill = distill
        if distill is not None:
            distill.to(device)

    def wrap(self, model: nn.Module) -> nn.Module:
        """Move the model to the device; under torchrun, wrap it in DistributedDataParallel."""
        dev = self.device
        model.to(dev)
        if dev.type == "cuda":  # before DDP: evaluation's channels-last conversion would re-allocate its buckets
            model.to(memory_format=torch.channels_last)
        if not self.ctx.enabled:
            return model
        # static_graph: with JPM the backbone's own last block and norm are never used (b1/b2 are their
        # copies); the used set is the same every step, so DDP can skip the per-step search for unused ones.
        return nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                                   static_graph=True)

    def call(self, point: str) -> None:
        """Run every hook's method for `point` ('before_train', 'after_step', ...), in order."""
        for hook in self.hooks:
            getattr(hook, point)(self)

    def run(self) -> TrainResult:
        """Train the epochs not yet done (all of them, or from the resumed position) and return the result."""
        self.call("before_train")
        self.start = time.perf_counter()
        if self.batches is None and self.start_batch:
            raise ValueError("resuming inside an epoch needs the loader of build_train_loader (a TrainBatchSampler)")
        logger.info("training epochs %d-%d on %d process(es), device %s, amp %s", self.epoch, self.epochs,
                    self.ctx.world_size, self.device, self.dtype or "fp32")
        while self.epoch <= self.epochs:
            self.begin_epoch()
            for n_iter, batch in enumerate(self.loader, start=self.start_batch):
                self.n_iter = n_iter
                if not self.usable(batch):
                    continue
                self.step(batch)
                self.call("after_step")
                if self.stopping:
                    return self.finish()
            self.end_epoch()
        return self.finish()

    def begin_epoch(self) -> None:
        """Set the epoch's lr and sampler position, fresh (or resumed) meters, train mode."""
        self.epoch_start = time.perf_counter()
        state, self.meter_state = self.meter_state, None
        self.meters = EpochMeters(self.device, state[:3], int(state[3])) if state else EpochMeters(self.device)
        self.scheduler.step(self.epoch)
        if self.batches is not None:
            self.batches.set_epoch(self.epoch, self.start_batch)
            self.n_iters = self.batches.batches_in_epoch()
        else:
            self.n_iters = len(self.loader) if hasattr(self.loader, "__len__") else 0
        self.net.train()
        self.call("before_epoch")

    def usable(self, batch: Any) -> bool:
        """False for a batch whose every image was unreadable (the loader warned); refuses partial global
        batches under several processes."""
        if batch.failed and self.ctx.enabled:
            raise RuntimeError(f"unreadable training image(s) {batch.failed[:3]}: multi-process training needs "
                               "every image of a global batch; remove or fix them")
        return len(batch) > 0

    def step(self, batch: Any) -> None:
        """One optimiser step on a global batch; sets `stopping` and, at log steps, `step_stats`."""
        dev, epoch = self.device, self.epoch
        img = batch.images.to(dev, non_blocking=True)
        target = batch.pids.to(dev, non_blocking=True)
        cams, views = batch.camids.to(dev, non_blocking=True), batch.viewids.to(dev, non_blocking=True)
        if self.scheduler.in_warmup(epoch):
            self.scheduler.step_within(epoch, self.n_iter / max(self.n_iters, 1))
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=dev.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            score, feat = self.net(img, target, cam_label=cams, view_label=views)
        # The loss on the global batch, in fp32: hard mining and softmax are precision-sensitive.
        score, feat, target = gather_cat(score), gather_cat(feat), gather_labels(target)
        score = [s.float() for s in score] if isinstance(score, list) else score.float()
        feat = [f.float() for f in feat] if isinstance(feat, list) else feat.float()
        loss = self.loss_fn(score, feat, target)
        if self.distill is not None:  # a loss term: it needs the batch's record indices, gathered like the labels
            loss = loss + self.distill(feat, gather_labels(batch.indices.to(dev, non_blocking=True)))
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        logits = score[0] if isinstance(score, list) else score
        self.meters.update(loss, (logits.argmax(1) == target).sum(), int(target.shape[0]))
        self.result.global_step += 1
        self.steps_this_call += 1
        self.stopping = 0 < self.stop_after_steps <= self.steps_this_call
        self.step_stats = None
        if (self.n_iter + 1) % self.log_period == 0:
            avg_loss, avg_acc = self.meters.averages()
            self.step_stats = {"loss": avg_loss, "acc": avg_acc, "lr": base_lr(self.optimizer, self.cfg.SOLVER.BASE_LR)}

    def end_epoch(self) -> None:
        """Record the epoch's row in the history, run the epoch hooks, move to the next epoch."""
        seconds = time.perf_counter() - self.epoch_start
        avg_loss, avg_acc = self.meters.averages()
        self.result.history.append({"epoch": self.epoch, "loss": avg_loss, "acc": avg_acc,
                                    "lr": base_lr(self.optimizer, self.cfg.SOLVER.BASE_LR), "seconds": seconds,
                                    "images": self.meters.images})
        self.call("after_epoch")
        self.epoch, self.start_batch = self.epoch + 1, 0

    def finish(self) -> TrainResult:
        """Fill in the result's end (stopped early or not) and run the final hooks."""
        self.result.stopped = self.stopping
        self.result.seconds = time.perf_counter() - self.start
        self.result.model = self.model
        self.call("after_train")
        return self.result

    def state_dict(self, at_epoch: int, at_batch: int, rngs: list[dict[str, Any]],
                   fresh_epoch: bool = False) -> dict[str, Any]:
        """The resumable state at (`at_epoch`, `at_batch`) with every process's random streams `rngs`;
        `fresh_epoch`: the meters of an epoch not yet begun."""
        meters = EpochMeters(self.device) if fresh_epoch else self.meters
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "distill": self.distill.state_dict() if self.distill is not None else {},
                "scaler": self.scaler.state_dict(), "epoch": at_epoch, "batch": at_batch, "meters": meters.state(),
                "history": self.result.history, "evals": self.result.evals, "best": self.result.best,
                "global_step": self.result.global_step, "rng": rngs, "world_size": self.ctx.world_size,
                "checkpoints": [str(p) for p in self.result.checkpoints], "config": self.cfg.dump()}

    def load_state(self, state: dict[str, Any]) -> None:
        """Inverse of `state_dict` (the random streams excepted: `hooks.ResumeHook` restores them)."""
        self.model.load_state_dict(state["model"])
        if self.distill is not None and state.get("distill"):
            self.distill.load_state_dict(state["distill"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.start_batch = int(state["epoch"]), int(state["batch"])
        self.meter_state = state["meters"]
        self.result.history, self.result.evals = list(state["history"]), list(state["evals"])
        self.result.best, self.result.global_step = state["best"], int(state["global_step"])
        self.result.checkpoints = [Path(p) for p in state["checkpoints"]]


def do_train(
    cfg: Any,
    model: nn.Module,
    train_loader: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    scheduler: EpochLRScheduler,
    loss_fn: LossFn,
    device: torch.device | str = "cpu",
    output_dir: str | Path | None = None,
    epoch_callback: Callable[[int, nn.Module], None] | None = None,
    *,
    ctx: DistContext | None = None,
    evaluate_fn: EvaluateFn | None = None,
    resume: dict[str, Any] | None = None,
    stop_after_steps: int = 0,
    state_every_steps: int = 0,
    progress: bool = False,
    tensorboard: bool = True,
    distill: nn.Module | None = None,
    hooks: Sequence[TrainHook] = (),
) -> TrainResult:
    """Run the epochs of SOLVER.MAX_EPOCHS not yet done and return what was saved.

    Each epoch first calls `scheduler.step(epoch)` (1-based, so epoch 1 already has a warm-up lr), then
    trains on the loader's global batches (`reid_lite.data.Batch`es from `build_train_loader`, whose
    `TrainBatchSampler` is told the epoch; any other iterable of Batches is used as is, but cannot
    resume inside an epoch): forward with camera/view labels, `loss_fn(score, feat, pids)` on the batch
    gathered from all processes, backward, step. Autocast per SOLVER.AMP ('auto': bf16 on CUDA, fp32 on
    the CPU; fp16 uses a GradScaler). Accuracy is the global classifier's top-1.

    Written to `output_dir` (default OUTPUT_DIR) by rank 0: `<MODEL.NAME>_<epoch>.pth` every
    SOLVER.CHECKPOINT_PERIOD epochs and after the last (plain state dicts, official layout);
    `last_checkpoint.pth`, the resumable state, after every epoch, every `state_every_steps` steps and
    when stopping; `<MODEL.NAME>_best.pth` whenever an evaluation (every SOLVER.EVAL_PERIOD epochs and
    after the last, when `evaluate_fn` is given) beats the best mAP so far; TensorBoard scalars under
    `tensorboard/`. Logs every SOLVER.LOG_PERIOD iterations; `progress` shows a bar.

    `resume` is a state from `load_train_state`: training continues at its position with its random
    states, bit-identical to a run that was never interrupted (same process count). `stop_after_steps`
    > 0 stops after that many steps of this call, leaving a resumable state (preemptible jobs, tests).
    `distill(features, indices)`, when given (`teacher.Distillation`), adds a distillation term computed from the
    batch's features and its images' record indices; its parameters (a projection), when it has any, must be in
    `optimizer` and are saved in and restored from the training state.

    The learning rate is set per step during warm-up (`scheduler.step_within`): a one-epoch warm-up then
    ramps over that epoch's iterations instead of running the whole epoch at the initial rate.

    Everything but the steps is a hook (`hooks.default_hooks` builds them from these arguments); `hooks` adds
    the caller's own `TrainHook`s, run after `epoch_callback` and before the training state is saved.
    """
    ctx = ctx or DistContext(device=torch.device(device))
    out_dir = Path(output_dir if output_dir is not None else cfg.OUTPUT_DIR)
    hook_list = default_hooks(cfg, is_main=ctx.is_main, resume=resume, evaluate_fn=evaluate_fn,
                              epoch_callback=epoch_callback, state_every_steps=state_every_steps, progress=progress,
                              tensorboard=tensorboard, extra=hooks)
    loop = TrainLoop(cfg, model, train_loader, optimizer, scheduler, loss_fn, ctx,
                     ctx.device if ctx.enabled else torch.device(device), out_dir, hook_list,
                     stop_after_steps=stop_after_steps, distill=distill)
    return loop.run()
