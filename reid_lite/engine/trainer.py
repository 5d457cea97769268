"""TransReID training, following the official recipe (`processor/processor.py:do_train`), at scale.

    cfg = load_cfg("configs/demo_synthetic.yml")
    result = train(cfg)                      # dataset, model, loss, optimiser, schedule, loop
    result.final_checkpoint                  # OUTPUT_DIR/<MODEL.NAME>_<last epoch>.pth
    result = train(cfg, resume=True)         # continue from OUTPUT_DIR/last_checkpoint.pth

Pieces, usable on their own: `check_training_cfg` (`config.validate` for training: every official key honoured or
refused),
`make_optimizer` (per-parameter lr / weight decay as the official `make_optimizer`), `create_scheduler`
(`lr_scheduler.py`: the official cosine or a multi-step schedule), `make_loss` (`losses.py`), `do_train`
(`loop.py`: the epoch loop with AMP and DDP; resume, evaluation, TensorBoard and the rest are hooks,
`hooks.py`). Under torchrun, `train` joins the process group and trains with DistributedDataParallel
(`distributed.py`).

Token merging is a test-time method: the model is trained with MERGE.METHOD 'none' unless
SOLVER.TRAIN_WITH_MERGING is set. DTEM's modular training (MERGE.METHOD dtem with
MERGE.DTEM.TRAIN_EMBEDDING_ONLY) trains only its embedding, with soft merging, the rest frozen, and
writes the embedding alone to OUTPUT_DIR/dtem_embedding.pth.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..build import build_model
from ..config import validate
from ..data import ReIDDataset, build_dataset_from_cfg, build_train_loader, sie_counts
from ..merging import check_learned_ready, learned_state_dict
from ..merging.dtem import trains_embedding_only
from ..merging.learned import learned_reducers
from ..utils.device import resolve_device
from ..utils.files import sha256_file
from .distributed import (
    DistContext,
    broadcast_object,
    convert_batchnorm,
    extract_test_features,
    init_distributed,
)
from .evaluator import evaluate_features, split_query_gallery
from .loop import EvaluateFn, TrainResult, do_train
from .losses import make_loss
from .lr_scheduler import create_scheduler
from .teacher import Distillation, TeacherModel, teacher_targets
from .train_state import check_resume, find_resume_state, load_train_state, save_state_dict

logger = logging.getLogger("reid_lite.train")

#: The embedding-only file DTEM's modular training writes to OUTPUT_DIR (load it with MERGE.DTEM.WEIGHTS).
EMBEDDING_FILE = "dtem_embedding.pth"
#: MODEL.TEACHER's embeddings of the training images, cached in OUTPUT_DIR (a resumed run reuses them).
TEACHER_TARGETS_FILE = "teacher_targets.pt"

__all__ = [
    "TrainResult",
    "check_training_cfg",
    "create_scheduler",
    "distillation_targets",
    "do_train",
    "freeze_all_but_learned_reducers",
    "make_evaluator",
    "make_optimizer",
    "prepare_dataset",
    "save_state_dict",
    "set_seed",
    "sie_counts",
    "train",
    "training_cfg",
]


# ------------------------------------------------------------------------------ setup


def set_seed(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA), as the official `set_seed`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def check_training_cfg(cfg: Any) -> None:
    """`reid_lite.config.validate(cfg, training=True)`: every key training reads, refused by name (ValueError)."""
    validate(cfg, training=True)


def training_cfg(cfg: Any) -> Any:
    """A copy of `cfg` for training: MERGE.METHOD 'none' (merging is a test-time method) unless
    SOLVER.TRAIN_WITH_MERGING, which keeps MERGE.* on so that the model trains with its reducers, or DTEM's
    modular training (MERGE.DTEM.TRAIN_EMBEDDING_ONLY), which needs its reducers too."""
    out = cfg.clone()
    out.defrost()
    out.MERGE.TRACE_SOURCE = False
    if trains_embedding_only(out):
        logger.info("training DTEM's embedding only (MERGE.DTEM.TRAIN_EMBEDDING_ONLY): backbone and heads frozen, "
                    "soft merging")
        out.freeze()
        return out
    if out.SOLVER.TRAIN_WITH_MERGING:
        logger.info("training with token merging on (MERGE.METHOD %r)", out.MERGE.METHOD)
        out.freeze()
        return out
    if str(out.MERGE.METHOD).lower() != "none":
        logger.info("MERGE.METHOD %r is a test-time method: training without token merging", out.MERGE.METHOD)
    out.MERGE.METHOD = "none"
    out.MERGE.TARGET_GFLOPS = 0.0
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


def prepare_dataset(cfg: Any) -> ReIDDataset:
    """Build the training dataset the config names (`build_dataset_from_cfg`).

    The registered `synthetic` dataset generates itself, deterministically, when missing; any other
    missing dataset raises the data package's `DatasetLayoutError` (nothing is downloaded).
    """
    return build_dataset_from_cfg(cfg)




def distillation_targets(cfg: Any, dataset: ReIDDataset, output_dir: str | Path, write: bool = True,
                         progress: bool = False) -> torch.Tensor:
    """MODEL.TEACHER's normalised embeddings of `dataset.train`'s images (N, D_t), one row per record.

    Read from OUTPUT_DIR/teacher_targets.pt when it was made by the same teacher file for the same images,
    otherwise computed (`teacher_targets`) and, with `write`, cached there."""
    path = Path(output_dir) / TEACHER_TARGETS_FILE
    key = {"teacher_sha256": sha256_file(cfg.MODEL.TEACHER), "input": str(cfg.MODEL.TEACHER_INPUT),
           "paths": [str(r[0]) for r in dataset.train]}
    if path.is_file():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if all(cached.get(k) == v for k, v in key.items()):
            logger.info("teacher targets read from %s", path)
            return cached["targets"]
    teacher = TeacherModel(cfg.MODEL.TEACHER, str(cfg.MODEL.TEACHER_INPUT))
    logger.info("teacher %s: embedding %d training images once (input %dx%d, %s)", cfg.MODEL.TEACHER,
                len(dataset.train), *teacher.size, cfg.MODEL.TEACHER_INPUT)
    targets = teacher_targets(teacher, dataset.train, progress=progress)
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({**key, "targets": targets}, path)
    return targets


def make_evaluator(cfg: Any, dataset: ReIDDataset, ctx: DistContext, output_dir: str | Path | None = None,
                   save_features: bool = False, progress: bool = False) -> EvaluateFn:
    """`evaluate_fn(epoch, model)` for `do_train`: query/gallery retrieval metrics of `dataset`.

    Every process embeds its share of the test images (`extract_test_features`); rank 0 ranks them
    (TEST.RE_RANKING, TEST.QUERY_CHUNK) and every process gets the metrics: rank1, rank5, rank10, mAP,
    mINP, images_per_second. `save_features` also writes `features_<epoch>.pt` (query and gallery
    features, ids and cameras) to `output_dir`.
    """
    out_dir = Path(output_dir if output_dir is not None else cfg.OUTPUT_DIR)

    def evaluate_fn(epoch: int, model: nn.Module) -> dict[str, float]:
        feats, num_query = extract_test_features(cfg, model, dataset, ctx, progress=progress)
        metrics = None
        if ctx.is_main:
            query, gallery = split_query_gallery(feats, num_query)
            res = evaluate_features(query, gallery, re_rank=bool(cfg.TEST.RE_RANKING),
                                    query_chunk=int(cfg.TEST.QUERY_CHUNK))
            metrics = {k: float(res[k]) for k in ("rank1", "rank5", "rank10", "mAP", "mINP")}
            metrics["images_per_second"] = feats.images_per_second
            if save_features:
                torch.save({f"{part}_{key}": torch.as_tensor(getattr(f, key))
                            for part, f in (("query", query), ("gallery", gallery))
                            for key in ("feats", "pids", "camids", "indices")}, out_dir / f"features_{epoch}.pt")
        return broadcast_object(metrics)

    return evaluate_fn


def train(cfg: Any, dataset: ReIDDataset | None = None, device: torch.device | str | None = None,
          epoch_callback: Callable[[int, nn.Module], None] | None = None, *, resume: bool = False,
          resume_force: bool = False, stop_after_steps: int = 0, state_every_steps: int = 0, progress: bool = False,
          evaluate: bool = True, save_features: bool = False, tensorboard: bool = True) -> TrainResult:
    """Train TransReID as the config describes and return the checkpoints written to OUTPUT_DIR.

    Checks the config (`config.validate(cfg, training=True)`), joins torchrun's process group when launched by it, seeds
    with SOLVER.SEED, builds the dataset (`prepare_dataset`, unless given), the model with `num_classes` =
    training identities and `camera_num` = training cameras (used when MODEL.SIE_CAMERA; see
    `sie_counts`), the loss, optimiser and schedule, then runs `do_train`, evaluating on the dataset's
    query/gallery split every SOLVER.EVAL_PERIOD epochs when `evaluate`. `resume` continues from
    OUTPUT_DIR/last_checkpoint.pth (a fresh start when there is none); a state of another architecture is a
    ValueError, one with other batch size, learning rate, optimiser or sampler too unless `resume_force`
    (`check_resume`). The config used is written to
    OUTPUT_DIR/config.yaml. Other arguments: see `do_train` and `make_evaluator`.

    Several processes give the same weights as one (up to floating-point order) when the model draws no
    random numbers in training (MODEL.DROP_PATH, DROP_OUT, ATT_DROP_RATE 0): each process has its own
    random stream for those.
    """
    validate(cfg, training=True)
    cfg = training_cfg(cfg)
    dev = resolve_device(device if device is not None else cfg.MODEL.DEVICE, cfg.MODEL.DEVICE_ID)
    ctx = init_distributed(dev)
    seed = int(cfg.SOLVER.SEED)
    set_seed(seed)
    if dataset is None:
        dataset = prepare_dataset(cfg)
    out_dir = Path(cfg.OUTPUT_DIR)
    state_path = find_resume_state(out_dir) if resume else None
    state = load_train_state(state_path) if state_path is not None else None
    if resume and state is None:
        logger.info("--resume: no %s in %s, starting from scratch", "last_checkpoint.pth", out_dir)
    if ctx.is_main:
        logger.info("\n%s", dataset.statistics_table())
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(cfg.dump())
    loader = build_train_loader(cfg, dataset, rank=ctx.rank, world_size=ctx.world_size)
    num_classes = dataset.num_train_pids
    camera_num, view_num = sie_counts(dataset)
    model = build_model(cfg, num_classes, camera_num, view_num)
    if state is not None:  # before anything is loaded: load_state_dict would fail with a long RuntimeError
        for change in check_resume(cfg, state, state_path, model.state_dict(), force=resume_force):
            logger.warning("--resume-force: continuing with %s", change)
    if trains_embedding_only(cfg):
        if str(cfg.MODEL.PRETRAIN_CHOICE).lower() != "self":
            logger.warning("training DTEM's embedding on a backbone that is not a trained TransReID "
                           "(MODEL.PRETRAIN_CHOICE %r): set 'self' and MODEL.PRETRAIN_PATH", cfg.MODEL.PRETRAIN_CHOICE)
        freeze_all_but_learned_reducers(model)
    if ctx.enabled:
        convert_batchnorm(model)  # BNNeck statistics of the global batch
        set_seed(seed + ctx.rank)  # identical weights everywhere, then one random stream per process
    logger.info("model: %s, %d identities, %d cameras, %.2f M parameters", cfg.MODEL.TRANSFORMER_TYPE, num_classes,
                camera_num, sum(p.numel() for p in model.parameters()) / 1e6)
    loss_fn = make_loss(cfg, num_classes)
    distill = None
    if cfg.MODEL.TEACHER:
        targets = distillation_targets(cfg, dataset, out_dir, write=ctx.is_main, progress=progress)
        distill = Distillation(targets, model.in_planes, float(cfg.MODEL.TEACHER_WEIGHT), str(cfg.MODEL.TEACHER_LOSS))
    optimizer = make_optimizer(cfg, model)
    if distill is not None and distill.projection is not None:  # trains with the model, at BASE_LR, no decay
        optimizer.add_param_group({"params": list(distill.parameters()), "lr": cfg.SOLVER.BASE_LR, "weight_decay": 0.0})
    scheduler = create_scheduler(cfg, optimizer)
    evaluate_fn = (make_evaluator(cfg, dataset, ctx, out_dir, save_features, progress)
                   if evaluate and dataset.query and dataset.gallery else None)
    result = do_train(cfg, model, loader, optimizer, scheduler, loss_fn, ctx.device, out_dir, epoch_callback,
                      ctx=ctx, evaluate_fn=evaluate_fn, resume=state, stop_after_steps=stop_after_steps,
                      state_every_steps=state_every_steps, progress=progress, tensorboard=tensorboard,
                      distill=distill)
    if trains_embedding_only(cfg) and ctx.is_main and not result.stopped:
        path = save_state_dict(learned_state_dict(result.model), out_dir / EMBEDDING_FILE)
        logger.info("DTEM embedding written to %s (MERGE.DTEM.WEIGHTS)", path)
    return result


def freeze_all_but_learned_reducers(model: nn.Module) -> None:
    """DTEM's modular training: only the learned reducers' parameters train; every other parameter is frozen
    and every other module stays in eval mode while training (`TransReID.reducers_only`). ValueError when
    the model has no learned reducer or its embedding is pending (say MERGE.DTEM.FRESH or WEIGHTS)."""
    reducers = learned_reducers(model)
    if not reducers:
        raise ValueError("MERGE.DTEM.TRAIN_EMBEDDING_ONLY: the model has no DTEM reducers (MERGE.LAYERS empty?)")
    check_learned_ready(reducers)
    keep = {id(p) for r in reducers.values() for p in r.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    model.reducers_only = True
    model.train(model.training)
