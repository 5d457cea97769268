"""One-process TransReID training, following the official recipe (`processor/processor.py:do_train`).

    cfg = load_cfg("configs/demo_synthetic.yml")
    result = train(cfg)                      # dataset, model, loss, optimiser, schedule, loop
    result.final_checkpoint                  # OUTPUT_DIR/<MODEL.NAME>_<last epoch>.pth

Pieces, usable on their own: `make_optimizer` (per-parameter lr / weight decay as the official
`make_optimizer`), `create_scheduler` (timm's CosineLRScheduler exactly as the official
`create_scheduler`), `make_loss` (in `losses.py`), `do_train` (the epoch loop: the scheduler steps at
the start of each epoch, logs every SOLVER.LOG_PERIOD iterations, checkpoints every
SOLVER.CHECKPOINT_PERIOD epochs as a plain `model.state_dict()` in the official key layout).

Token merging is a test-time method: the model is always trained with MERGE.METHOD 'none'.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.scheduler.cosine_lr import CosineLRScheduler
from torch import nn

from ..data import ReIDDataset, build_dataset_from_cfg, build_train_loader, sie_counts
from ..models import build_model
from ..utils.device import resolve_device
from .losses import LossFn, make_loss

logger = logging.getLogger("reid_lite.train")

__all__ = [
    "TrainResult",
    "create_scheduler",
    "do_train",
    "make_optimizer",
    "prepare_dataset",
    "save_state_dict",
    "set_seed",
    "sie_counts",
    "train",
    "training_cfg",
]



@dataclass
class TrainResult:
    """What `do_train` / `train` produced."""

    final_checkpoint: Path
    checkpoints: list[Path] = field(default_factory=list)
    #: One dict per epoch: epoch, loss, acc, lr, seconds, images.
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    #: The trained model (on the training device, in train mode).
    model: nn.Module | None = None


# ------------------------------------------------------------------------------ setup


def set_seed(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA), as the official `set_seed`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def training_cfg(cfg: Any) -> Any:
    """A copy of `cfg` with MERGE.METHOD 'none': merging is applied at inference only, never in training."""
    out = cfg.clone()
    out.defrost()
    if str(out.MERGE.METHOD).lower() != "none":
        logger.info("MERGE.METHOD %r is a test-time method: training without token merging", out.MERGE.METHOD)
    out.MERGE.METHOD = "none"
    out.MERGE.TARGET_GFLOPS = 0.0
    out.MERGE.TRACE_SOURCE = False
    out.freeze()
    return out


def make_optimizer(cfg: Any, model: nn.Module) -> torch.optim.Optimizer:
    """The official `make_optimizer`: one parameter group per trainable parameter.

    Weights get SOLVER.BASE_LR and SOLVER.WEIGHT_DECAY; biases BASE_LR * BIAS_LR_FACTOR and
    WEIGHT_DECAY_BIAS; with SOLVER.LARGE_FC_LR the classifiers get twice BASE_LR. SOLVER.OPTIMIZER_NAME
    'SGD' uses SOLVER.MOMENTUM; any other name is looked up in `torch.optim` ('Adam', 'AdamW', ...).
    """
    s = cfg.SOLVER
    params: list[dict[str, Any]] = []
    for key, value in model.named_parameters():
        if not value.requires_grad:
            continue
        lr, weight_decay = s.BASE_LR, s.WEIGHT_DECAY
        if "bias" in key:
            lr, weight_decay = s.BASE_LR * s.BIAS_LR_FACTOR, s.WEIGHT_DECAY_BIAS
        if s.LARGE_FC_LR and ("classifier" in key or "arcface" in key):
            lr = s.BASE_LR * 2
        params.append({"params": [value], "lr": lr, "weight_decay": weight_decay})
    name = s.OPTIMIZER_NAME
    if name == "SGD":
        return torch.optim.SGD(params, lr=s.BASE_LR, momentum=s.MOMENTUM)
    optim_cls = getattr(torch.optim, name, None)
    if not (isinstance(optim_cls, type) and issubclass(optim_cls, torch.optim.Optimizer)):
        raise ValueError(f"unknown SOLVER.OPTIMIZER_NAME {name!r}: use 'SGD', 'Adam', 'AdamW' or another torch.optim")
    return optim_cls(params, lr=s.BASE_LR)


def create_scheduler(cfg: Any, optimizer: torch.optim.Optimizer) -> CosineLRScheduler:
    """The official `create_scheduler`: cosine over MAX_EPOCHS with a linear warmup, stepped per epoch.

    lr_min = 0.002 * BASE_LR, warmup from 0.01 * BASE_LR over WARMUP_EPOCHS; each parameter group decays
    from its own initial lr (so the bias and classifier factors are kept).
    """
    s = cfg.SOLVER
    return CosineLRScheduler(
        optimizer,
        t_initial=s.MAX_EPOCHS,
        lr_min=0.002 * s.BASE_LR,
        cycle_mul=1.0,
        cycle_decay=0.1,
        warmup_lr_init=0.01 * s.BASE_LR,
        warmup_t=s.WARMUP_EPOCHS,
        cycle_limit=1,
        t_in_epochs=True,
        noise_range_t=None,
        noise_pct=0.67,
        noise_std=1.0,
        noise_seed=42,
    )


def prepare_dataset(cfg: Any) -> ReIDDataset:
    """Build the training dataset the config names (`build_dataset_from_cfg`).

    The registered `synthetic` dataset generates itself, deterministically, when missing; any other
    missing dataset raises the data package's `DatasetLayoutError` (nothing is downloaded).
    """
    return build_dataset_from_cfg(cfg)


def save_state_dict(model: nn.Module | Mapping[str, torch.Tensor], path: str | Path, half: bool = False) -> Path:
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


# ------------------------------------------------------------------------------ loop


class _Meter:
    """Running weighted average (the official AverageMeter)."""

    def __init__(self) -> None:
        self.sum, self.count = 0.0, 0.0

    def update(self, value: float, n: float = 1.0) -> None:
        self.sum += value * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.sum / self.count if self.count else float("nan")


def _base_lr(optimizer: torch.optim.Optimizer, base: float) -> float:
    """Current lr of a group that started at BASE_LR (group 0 may be a bias with a factor)."""
    for group in optimizer.param_groups:
        if abs(group.get("initial_lr", group["lr"]) - base) <= 1e-12 * max(1.0, base):
            return group["lr"]
    return optimizer.param_groups[0]["lr"]


def do_train(
    cfg: Any,
    model: nn.Module,
    train_loader: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    scheduler: CosineLRScheduler,
    loss_fn: LossFn,
    device: torch.device | str = "cpu",
    output_dir: str | Path | None = None,
    epoch_callback: Callable[[int, nn.Module], None] | None = None,
) -> TrainResult:
    """Run SOLVER.MAX_EPOCHS epochs of the official loop and return what was saved.

    Each epoch first calls `scheduler.step(epoch)` (1-based, so epoch 1 already has a warmup lr), then
    iterates the loader (`reid_lite.data.Batch`es): forward with camera/view labels, `loss_fn(score,
    feat, pids)`, backward, step. On CUDA it uses fp16 autocast with a GradScaler, as the official code;
    on the CPU plain fp32. Accuracy is the global classifier's top-1 on the batch. Checkpoints go to
    `output_dir` (default OUTPUT_DIR) as `<MODEL.NAME>_<epoch>.pth` every CHECKPOINT_PERIOD epochs and
    after the last epoch. `epoch_callback(epoch, model)` runs after each epoch (e.g. evaluation).
    """
    dev = torch.device(device)
    out_dir = Path(output_dir if output_dir is not None else cfg.OUTPUT_DIR)
    epochs = int(cfg.SOLVER.MAX_EPOCHS)
    if epochs < 1:
        raise ValueError(f"SOLVER.MAX_EPOCHS must be >= 1, got {epochs}")
    log_period = max(1, int(cfg.SOLVER.LOG_PERIOD))
    ckpt_period = max(1, int(cfg.SOLVER.CHECKPOINT_PERIOD))
    use_amp = dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    model.to(dev)
    result = TrainResult(final_checkpoint=out_dir / f"{cfg.MODEL.NAME}_{epochs}.pth")
    n_iters = len(train_loader) if hasattr(train_loader, "__len__") else 0
    start = time.perf_counter()
    logger.info("start training: %d epochs, %s iterations per epoch, device %s", epochs, n_iters or "?", dev)
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        loss_meter, acc_meter, images = _Meter(), _Meter(), 0
        scheduler.step(epoch)
        model.train()
        for n_iter, batch in enumerate(train_loader):
            if len(batch) == 0:  # every image of the batch was unreadable (already warned by the loader)
                continue
            img = batch.images.to(dev, non_blocking=True)
            target = batch.pids.to(dev)
            cams, views = batch.camids.to(dev), batch.viewids.to(dev)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=use_amp):
                score, feat = model(img, target, cam_label=cams, view_label=views)
                loss = loss_fn(score, feat, target)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            logits = score[0] if isinstance(score, (list, tuple)) else score
            acc = (logits.argmax(1) == target).float().mean().item()
            loss_meter.update(loss.item(), img.shape[0])
            acc_meter.update(acc, 1)
            images += img.shape[0]
            if (n_iter + 1) % log_period == 0:
                logger.info("Epoch[%d] Iteration[%d/%s] Loss: %.3f, Acc: %.3f, Base Lr: %.2e", epoch, n_iter + 1,
                            n_iters or "?", loss_meter.avg, acc_meter.avg, _base_lr(optimizer, cfg.SOLVER.BASE_LR))
        seconds = time.perf_counter() - t0
        lr = _base_lr(optimizer, cfg.SOLVER.BASE_LR)
        result.history.append({"epoch": epoch, "loss": loss_meter.avg, "acc": acc_meter.avg, "lr": lr,
                               "seconds": seconds, "images": images})
        logger.info("Epoch %d done: loss %.3f, acc %.3f, lr %.2e, %.1f s (%.1f img/s)", epoch, loss_meter.avg,
                    acc_meter.avg, lr, seconds, images / max(seconds, 1e-9))
        if epoch % ckpt_period == 0 or epoch == epochs:
            path = save_state_dict(model, out_dir / f"{cfg.MODEL.NAME}_{epoch}.pth")
            result.checkpoints.append(path)
            logger.info("saved %s", path)
        if epoch_callback is not None:
            epoch_callback(epoch, model)
    result.seconds = time.perf_counter() - start
    result.model = model
    logger.info("training done in %.1f min", result.seconds / 60)
    return result


# ------------------------------------------------------------------------------ all together


def train(cfg: Any, dataset: ReIDDataset | None = None, device: torch.device | str | None = None,
          epoch_callback: Callable[[int, nn.Module], None] | None = None) -> TrainResult:
    """Train TransReID as the config describes and return the checkpoints written to OUTPUT_DIR.

    Seeds with SOLVER.SEED, builds the dataset (`prepare_dataset`, unless given), the model with
    `num_classes` = training identities and `camera_num` = training cameras (used when MODEL.SIE_CAMERA;
    see `sie_counts`), MERGE.METHOD forced to 'none', the loss, optimiser and
    cosine schedule, then runs `do_train`. The config used is written to OUTPUT_DIR/config.yaml.
    """
    cfg = training_cfg(cfg)
    set_seed(int(cfg.SOLVER.SEED))
    dev = resolve_device(device if device is not None else cfg.MODEL.DEVICE, cfg.MODEL.DEVICE_ID)
    if dataset is None:
        dataset = prepare_dataset(cfg)
    logger.info("\n%s", dataset.statistics_table())
    out_dir = Path(cfg.OUTPUT_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(cfg.dump())
    loader = build_train_loader(cfg, dataset)
    num_classes = dataset.num_train_pids
    camera_num, view_num = sie_counts(dataset)
    model = build_model(cfg, num_classes, camera_num, view_num)
    logger.info("model: %s, %d identities, %d cameras, %.2f M parameters", cfg.MODEL.TRANSFORMER_TYPE, num_classes,
                camera_num, sum(p.numel() for p in model.parameters()) / 1e6)
    loss_fn = make_loss(cfg, num_classes)
    optimizer = make_optimizer(cfg, model)
    scheduler = create_scheduler(cfg, optimizer)
    return do_train(cfg, model, loader, optimizer, scheduler, loss_fn, dev, out_dir, epoch_callback)
