"""Multi-process training and evaluation with PyTorch's own engine (torchrun + DistributedDataParallel).

    torchrun --nproc_per_node 4 tools/train.py --config configs/msmt17_base.yml

`init_distributed` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and joins the process
group: nccl on CUDA (process r uses cuda:LOCAL_RANK), gloo on the CPU. Without torchrun it returns a
one-process context and nothing below communicates.

Results do not depend on the number of processes beyond floating-point order, because each piece sees
the global batch: the sampler gives every process a slice of the same global P x K batch
(`TrainBatchSampler`), the losses run on the scores and features gathered from all processes
(`gather_cat`, with autograd), the BNNeck normalises with the global batch's statistics
(`GlobalBatchNorm1d`), and DDP averages the gradients. Each process's gradient is then W times its
share of the global loss's gradient (all processes compute the same loss, and the gather's backward sums
what they send back), so DDP's average is exactly the one-process gradient.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import Tensor, nn

from ..data import ReIDDataset, build_test_loader
from ..utils.device import launched_by_torchrun
from .extractor import Features, extract_features

logger = logging.getLogger(__name__)


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous block of a sorted list of `n` items that `rank` of `world` processes handles."""
    return rank * n // world, (rank + 1) * n // world

# The autograd collectives below are deprecated in favour of a private module (_functional_collectives);
# they remain the public way to all-gather with a gradient, so the per-call notice is not shown.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_\w+ is deprecated",
                        category=FutureWarning)

__all__ = [
    "DistContext",
    "GlobalBatchNorm1d",
    "all_gather_objects",
    "broadcast_object",
    "convert_batchnorm",
    "extract_test_features",
    "gather_cat",
    "gather_labels",
    "init_distributed",
    "shard_bounds",
    "shutdown_distributed",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank, world size, local rank and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        """True when several processes train together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, logs and TensorBoard files."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every process (no-op in one process)."""
        if self.enabled:
            dist.barrier()


def init_distributed(device: torch.device) -> DistContext:
    """Join torchrun's process group (nccl on CUDA, gloo on the CPU) and return this process's context.

    `device` is the configured training device: with CUDA each process takes cuda:LOCAL_RANK. Without
    torchrun's environment, or with WORLD_SIZE 1, no group is created and the context is one process.
    """
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        return DistContext(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device)
    logger.info("process %d of %d on %s (%s)", ctx.rank, ctx.world_size, device, dist.get_backend())
    return ctx


def shutdown_distributed() -> None:
    """Leave the process group, if one was joined (call once at the end of a torchrun script)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather_cat(x: Tensor | Sequence[Tensor]) -> Tensor | list[Tensor]:
    """Concatenate, in rank order, every process's `x` (or each tensor of a list), keeping the autograd
    graph: the backward sums, on each process, the gradients all processes computed for its rows.

    Every process must pass the same shapes (the sampler's equal local batches guarantee it).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x if isinstance(x, Tensor) else list(x)
    if isinstance(x, Tensor):
        return torch.cat(dist_nn.all_gather(x), dim=0)
    return [torch.cat(dist_nn.all_gather(t), dim=0) for t in x]


def gather_labels(x: Tensor) -> Tensor:
    """All processes' integer labels in rank order (no gradient)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's picklable `obj`, in rank order (`[obj]` in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj` on every process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the global batch (all processes together).

    Works on gloo as well as nccl (torch's SyncBatchNorm refuses CPU tensors). The sums travel through an
    autograd all-reduce, so the gradient through the statistics is the global batch's. Evaluation, and
    training in one process, are plain BatchNorm1d. State dict keys are BatchNorm1d's.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        xf = x.float()
        count = torch.full((1,), float(xf.shape[0]), device=xf.device)
        stats = dist_nn.all_reduce(torch.cat([xf.sum(0), (xf * xf).sum(0), count]))
        d = xf.shape[1]
        n = stats[-1]
        mean = stats[:d] / n
        var = (stats[d:2 * d] / n - mean * mean).clamp_min(0.0)  # biased, as BatchNorm normalises with
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.item()
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)  # unbiased, as torch
        return y.to(x.dtype)


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d of `module` (the BNNecks) by a `GlobalBatchNorm1d` with the same state."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            new = GlobalBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats, device=child.weight.device if child.affine else None)
            new.load_state_dict(child.state_dict())
            if child.affine:
                new.weight.requires_grad_(child.weight.requires_grad)
                new.bias.requires_grad_(child.bias.requires_grad)
            setattr(module, name, new)
        else:
            convert_batchnorm(child)
    return module


def extract_test_features(cfg: Any, model: nn.Module, dataset: ReIDDataset, ctx: DistContext,
                          progress: bool = False) -> tuple[Features, int]:
    """Features of `dataset.query + dataset.gallery` (that order) and the number of queries, on every process.

    Process r embeds the contiguous block `shard_bounds(N, r, W)` of the records; the blocks are gathered
    in rank order, which is the one-process order, with `indices` shifted to global record positions.
    TEST.AMP, TEST.FLIP and TEST.FEAT_NORM apply, as in `evaluate`.
    """
    records = list(dataset.query) + list(dataset.gallery)
    lo, hi = shard_bounds(len(records), ctx.rank, ctx.world_size)
    loader, num_query = build_test_loader(cfg, dataset, span=(lo, hi))
    feats = extract_features(model, loader, device=ctx.device, amp=cfg.TEST.AMP, flip=bool(cfg.TEST.FLIP),
                             feat_norm=str(cfg.TEST.FEAT_NORM).lower() == "yes", progress=progress and ctx.is_main,
                             desc="extract")
    feats.indices = feats.indices + lo
    if not ctx.enabled:
        return feats, num_query
    parts: list[Features] = all_gather_objects(feats)
    merged = Features(
        torch.cat([p.feats for p in parts]),
        *(np.concatenate([getattr(p, k) for p in parts]) for k in ("pids", "camids", "viewids", "indices")),
        paths=[x for p in parts for x in p.paths], failed=[x for p in parts for x in p.failed],
        seconds=max(p.seconds for p in parts), model_seconds=max(p.model_seconds for p in parts),
        device=feats.device)
    return merged, num_query
