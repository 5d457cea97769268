"""The training loop (`do_train`): the official epoch loop plus resume, evaluation, AMP, DDP and logging.

One optimiser step per global batch. On several processes (torchrun) the model runs under
DistributedDataParallel and the loss sees the whole global batch (`distributed.gather_cat`), so the
trained weights do not depend on the process count beyond floating-point order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..utils.device import amp_dtype
from .distributed import DistContext, all_gather_objects, gather_cat, gather_labels
from .losses import LossFn
from .lr_scheduler import EpochLRScheduler
from .train_state import STATE_FILE, capture_rng, restore_rng, save_train_state

logger = logging.getLogger("reid_lite.train")

__all__ = ["EvaluateFn", "TrainResult", "do_train", "save_state_dict"]

#: `evaluate_fn(epoch, model) -> metrics` (at least 'mAP'), called on every process (extraction is shared).
EvaluateFn = Callable[[int, nn.Module], dict[str, float]]


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


def save_state_dict(model: nn.Module | dict[str, torch.Tensor], path: str | Path, half: bool = False) -> Path:
    """`torch.save(model.state_dict())` in the official key layout (loadable with weights_only=True).

    `model` may also be a state dict. `half` stores floating-point tensors as fp16 (half the size);
    `load_state_dict` casts them back to the model's dtype. Written to a temporary name and renamed, so a
    crash never leaves a partial file.
    """
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    items = model.state_dict() if isinstance(model, nn.Module) else model
    state = {k: (v.detach().to("cpu", torch.float16) if half and v.is_floating_point() else v.detach().cpu())
             for k, v in items.items()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def _base_lr(optimizer: torch.optim.Optimizer, base: float) -> float:
    """Current lr of a group that started at BASE_LR (group 0 may be a bias with a factor)."""
    for group in optimizer.param_groups:
        if abs(group.get("initial_lr", group["lr"]) - base) <= 1e-12 * max(1.0, base):
            return group["lr"]
    return optimizer.param_groups[0]["lr"]


class _Meters:
    """Per-epoch running sums kept on the device (reading them is the only host sync, at log time)."""

    def __init__(self, device: torch.device, sums: list[float] | None = None, images: int = 0) -> None:
        # loss * images, acc * images, images: float64 so that saving and restoring them is exact.
        self.sums = torch.tensor(sums or [0.0, 0.0, 0.0], dtype=torch.float64, device=device)
        self.images = images

    def update(self, loss: torch.Tensor, correct: torch.Tensor, n: int) -> None:
        n_t = torch.full((), float(n), dtype=torch.float64, device=loss.device)
        self.sums += torch.stack([loss.detach().double() * n_t, correct.detach().double(), n_t])
        self.images += n

    def averages(self) -> tuple[float, float]:
        loss, correct, n = self.sums.tolist()
        return (loss / n, correct / n) if n else (float("nan"), float("nan"))


def _tensorboard(out_dir: Path, purge_step: int) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=purge_step or None)


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
    """
    from tqdm.auto import tqdm

    ctx = ctx or DistContext(device=torch.device(device))
    dev = ctx.device if ctx.enabled else torch.device(device)
    out_dir = Path(output_dir if output_dir is not None else cfg.OUTPUT_DIR)
    epochs = int(cfg.SOLVER.MAX_EPOCHS)
    if epochs < 1:
        raise ValueError(f"SOLVER.MAX_EPOCHS must be >= 1, got {epochs}")
    log_period = max(1, int(cfg.SOLVER.LOG_PERIOD))
    ckpt_period, eval_period = int(cfg.SOLVER.CHECKPOINT_PERIOD), int(cfg.SOLVER.EVAL_PERIOD)
    dtype = amp_dtype(dev, str(cfg.SOLVER.AMP))
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
    model.to(dev)
    if dev.type == "cuda":  # before DDP: evaluation's channels-last conversion would re-allocate its buckets
        model.to(memory_format=torch.channels_last)
    net: nn.Module = model
    if ctx.enabled:
        # static_graph: with JPM the backbone's own last block and norm are never used (b1/b2 are their
        # copies); the used set is the same every step, so DDP can skip the per-step search for unused ones.
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                                  static_graph=True)
    batches = getattr(train_loader, "batch_sampler", None)
    if not hasattr(batches, "set_epoch"):
        batches = None
    name = cfg.MODEL.NAME
    result = TrainResult(final_checkpoint=out_dir / f"{name}_{epochs}.pth")
    epoch, start_batch, meter_state = 1, 0, None
    if distill is not None:
        distill.to(dev)
    if resume is not None:
        model.load_state_dict(resume["model"])
        if distill is not None and resume.get("distill"):
            distill.load_state_dict(resume["distill"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        epoch, start_batch = int(resume["epoch"]), int(resume["batch"])
        meter_state = resume["meters"]
        result.history, result.evals = list(resume["history"]), list(resume["evals"])
        result.best, result.global_step = resume["best"], int(resume["global_step"])
        result.checkpoints = [Path(p) for p in resume["checkpoints"]]
        rngs = resume["rng"]
        if len(rngs) == ctx.world_size:
            restore_rng(rngs[ctx.rank])
        else:
            logger.warning("resuming %d process(es) from a state of %d: model-side random draws (drop path) "
                           "restart from a new stream, so the run is not bit-identical", ctx.world_size, len(rngs))
        logger.info("resumed at epoch %d, batch %d (step %d)", epoch, start_batch, result.global_step)
    writer = _tensorboard(out_dir, result.global_step) if tensorboard and ctx.is_main else None
    steps_this_call = 0
    start = time.perf_counter()

    def save_state(at_epoch: int, at_batch: int, meters: _Meters) -> None:
        rngs = all_gather_objects(capture_rng())  # every process's streams, so each resumes its own
        if ctx.is_main:
            save_train_state(out_dir / STATE_FILE, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "distill": distill.state_dict() if distill is not None else {},
                "scaler": scaler.state_dict(), "epoch": at_epoch, "batch": at_batch,
                "meters": [*meters.sums.tolist(), meters.images], "history": result.history, "evals": result.evals,
                "best": result.best, "global_step": result.global_step, "rng": rngs, "world_size": ctx.world_size,
                "checkpoints": [str(p) for p in result.checkpoints], "config": cfg.dump()})
        ctx.barrier()

    if batches is None and start_batch:
        raise ValueError("resuming inside an epoch needs the loader of build_train_loader (a TrainBatchSampler)")
    logger.info("training epochs %d-%d on %d process(es), device %s, amp %s", epoch, epochs, ctx.world_size, dev,
                dtype or "fp32")
    while epoch <= epochs:
        t0 = time.perf_counter()
        meters = _Meters(dev, meter_state[:3], int(meter_state[3])) if meter_state else _Meters(dev)
        meter_state = None
        scheduler.step(epoch)
        if batches is not None:
            batches.set_epoch(epoch, start_batch)
            n_iters = batches.batches_in_epoch()
        else:
            n_iters = len(train_loader) if hasattr(train_loader, "__len__") else 0
        net.train()
        bar = tqdm(total=n_iters, initial=start_batch, desc=f"epoch {epoch}/{epochs}", unit="batch",
                   disable=not (progress and ctx.is_main), dynamic_ncols=True, leave=False)
        for n_iter, batch in enumerate(train_loader, start=start_batch):
            if batch.failed and ctx.enabled:
                raise RuntimeError(f"unreadable training image(s) {batch.failed[:3]}: multi-process training needs "
                                   "every image of a global batch; remove or fix them")
            if len(batch) == 0:  # every image of the batch was unreadable (already warned by the loader)
                continue
            img = batch.images.to(dev, non_blocking=True)
            target = batch.pids.to(dev, non_blocking=True)
            cams, views = batch.camids.to(dev, non_blocking=True), batch.viewids.to(dev, non_blocking=True)
            if scheduler.in_warmup(epoch):
                scheduler.step_within(epoch, n_iter / max(n_iters, 1))
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                score, feat = net(img, target, cam_label=cams, view_label=views)
            # The loss on the global batch, in fp32: hard mining and softmax are precision-sensitive.
            score, feat, target = gather_cat(score), gather_cat(feat), gather_labels(target)
            score = [s.float() for s in score] if isinstance(score, list) else score.float()
            feat = [f.float() for f in feat] if isinstance(feat, list) else feat.float()
            loss = loss_fn(score, feat, target)
            if distill is not None:
                loss = loss + distill(feat, gather_labels(batch.indices.to(dev, non_blocking=True)))
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            logits = score[0] if isinstance(score, list) else score
            meters.update(loss, (logits.argmax(1) == target).sum(), int(target.shape[0]))
            result.global_step += 1
            steps_this_call += 1
            bar.update(1)
            if (n_iter + 1) % log_period == 0:
                avg_loss, avg_acc = meters.averages()
                lr = _base_lr(optimizer, cfg.SOLVER.BASE_LR)
                logger.info("Epoch[%d] Iteration[%d/%d] Loss: %.3f, Acc: %.3f, Base Lr: %.2e", epoch, n_iter + 1,
                            n_iters, avg_loss, avg_acc, lr)
                bar.set_postfix(loss=f"{avg_loss:.3f}", acc=f"{avg_acc:.3f}")
                if writer is not None:
                    writer.add_scalar("train/loss", avg_loss, result.global_step)
                    writer.add_scalar("train/acc", avg_acc, result.global_step)
                    writer.add_scalar("train/lr", lr, result.global_step)
            stop = 0 < stop_after_steps <= steps_this_call
            if stop or (state_every_steps > 0 and result.global_step % state_every_steps == 0):
                save_state(epoch, n_iter + 1, meters)
            if stop:
                bar.close()
                result.stopped = True
                result.seconds = time.perf_counter() - start
                result.model = model
                logger.info("stopped after %d step(s) at epoch %d, batch %d: resume with --resume", steps_this_call,
                            epoch, n_iter + 1)
                if writer is not None:
                    writer.close()
                return result
        bar.close()
        seconds = time.perf_counter() - t0
        avg_loss, avg_acc = meters.averages()
        lr = _base_lr(optimizer, cfg.SOLVER.BASE_LR)
        result.history.append({"epoch": epoch, "loss": avg_loss, "acc": avg_acc, "lr": lr, "seconds": seconds,
                               "images": meters.images})
        logger.info("Epoch %d done: loss %.3f, acc %.3f, lr %.2e, %.1f s (%.1f img/s)", epoch, avg_loss, avg_acc, lr,
                    seconds, meters.images / max(seconds, 1e-9))
        if writer is not None:
            writer.add_scalar("epoch/loss", avg_loss, epoch)
            writer.add_scalar("epoch/acc", avg_acc, epoch)
        if ctx.is_main and ((ckpt_period > 0 and epoch % ckpt_period == 0) or epoch == epochs):
            path = save_state_dict(model, out_dir / f"{name}_{epoch}.pth")
            result.checkpoints.append(path)
            logger.info("saved %s", path)
        if evaluate_fn is not None and eval_period > 0 and (epoch % eval_period == 0 or epoch == epochs):
            metrics = {"epoch": epoch, **evaluate_fn(epoch, model)}
            result.evals.append(metrics)
            logger.info("Validation epoch %d: mAP %.1f%%, Rank-1 %.1f%%", epoch, 100 * metrics["mAP"],
                        100 * metrics.get("rank1", float("nan")))
            if writer is not None:
                for key in ("mAP", "rank1", "rank5", "rank10", "mINP"):
                    if key in metrics:
                        writer.add_scalar(f"eval/{key}", metrics[key], epoch)
            if result.best is None or metrics["mAP"] > result.best["mAP"]:
                result.best = metrics
                if ctx.is_main:
                    save_state_dict(model, out_dir / f"{name}_best.pth")
                    logger.info("new best mAP %.1f%% at epoch %d: %s", 100 * metrics["mAP"], epoch,
                                out_dir / f"{name}_best.pth")
        if epoch_callback is not None:
            epoch_callback(epoch, model)
        epoch, start_batch = epoch + 1, 0
        save_state(epoch, 0, _Meters(dev))
    result.seconds = time.perf_counter() - start
    result.model = model
    if writer is not None:
        writer.close()
    logger.info("training done in %.1f min", result.seconds / 60)
    return result
