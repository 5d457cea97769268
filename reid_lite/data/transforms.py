"""Image transforms, as in the official TransReID (`datasets/make_dataloader.py`)."""

from __future__ import annotations

from typing import Any

import torchvision.transforms as T
from timm.data.random_erasing import RandomErasing

__all__ = ["build_transforms"]


def _size(value: Any) -> tuple[int, int]:
    size = tuple(int(v) for v in value)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"image size must be [height, width] with positive values, got {list(value)}")
    return size  # type: ignore[return-value]


def build_transforms(cfg: Any, is_train: bool) -> T.Compose:
    """TransReID's train or test transform from `cfg.INPUT`.

    Test: Resize(SIZE_TEST) with torchvision's default (bilinear, antialiased), ToTensor,
    Normalize(PIXEL_MEAN, PIXEL_STD).

    Train: Resize(SIZE_TRAIN, bicubic), RandomHorizontalFlip(PROB), Pad(PADDING),
    RandomCrop(SIZE_TRAIN), ToTensor, Normalize, then timm's RandomErasing(RE_PROB,
    mode='pixel', max_count=1): the line TransReID actually runs (its mean-filled
    RandomErasing is commented out there), i.e. erased pixels get normal noise, which matches
    the data distribution after normalisation.
    """
    mean, std = list(cfg.INPUT.PIXEL_MEAN), list(cfg.INPUT.PIXEL_STD)
    if not is_train:
        return T.Compose([
            T.Resize(_size(cfg.INPUT.SIZE_TEST)),
            T.ToTensor(),
            T.Normalize(mean=mean, std=std),
        ])
    size = _size(cfg.INPUT.SIZE_TRAIN)
    return T.Compose([
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(p=cfg.INPUT.PROB),
        T.Pad(cfg.INPUT.PADDING),
        T.RandomCrop(size),
        T.ToTensor(),
        T.Normalize(mean=mean, std=std),
        RandomErasing(probability=cfg.INPUT.RE_PROB, mode="pixel", max_count=1, device="cpu"),
    ])
