"""A preprocessed batch of synthetic pedestrians: what an export's parity check and a GFLOPs budget's
calibration run on when no dataset is at hand. Kept apart from `synthetic.py`, which imports neither torch
nor the rest of the package (its generator workers and tests load it on its own)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from .synthetic import make_camera, make_identity, render_person
from .transforms import build_transforms

__all__ = ["synthetic_test_batch"]


def synthetic_test_batch(cfg: Any, count: int = 12, num_cameras: int = 1,
                         seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` preprocessed synthetic pedestrians (count/2 identities, two views each) and their cameras.

    Rendered at INPUT.SIZE_TEST and passed through the test transform, so an export's parity check and a
    budget's calibration need no dataset. Cameras cycle through 0..num_cameras-1 (several in one batch).
    """
    transform = build_transforms(cfg, is_train=False)
    size = tuple(int(s) for s in cfg.INPUT.SIZE_TEST)
    rng = np.random.default_rng(seed)
    images, cams = [], []
    for i in range(count):
        cam = i % max(1, num_cameras)
        person = make_identity(i // 2, seed=seed)
        arr = render_person(person, make_camera(cam + (i % 2) * 7, seed=seed), rng, size)
        images.append(transform(Image.fromarray(arr)))
        cams.append(cam)
    return torch.stack(images), torch.tensor(cams, dtype=torch.long)
