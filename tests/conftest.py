"""Shared fixtures: tiny model configs (the ViT-B shape only where a test needs it)."""

from __future__ import annotations

import warnings

import pytest
import torch
from extras import pytest_sessionfinish, pytest_terminal_summary  # noqa: F401 (pytest hooks for CI)

from reid_lite import get_cfg

# fvcore traces through the deprecated torch.jit; the warning says nothing about our code.
warnings.filterwarnings("ignore", message=".*torch.jit.*", category=FutureWarning)


def tiny_cfg(jpm: bool = True, depth: int = 4, **merge):
    """A small TransReID at the paper's geometry (256x128, stride 12: 21x10 patches), random init."""
    cfg = get_cfg()
    cfg.merge_from_list([
        "MODEL.EMBED_DIM", 48, "MODEL.DEPTH", depth, "MODEL.NUM_HEADS", 4,
        "INPUT.SIZE_TRAIN", [256, 128], "INPUT.SIZE_TEST", [256, 128], "MODEL.STRIDE_SIZE", [12, 12],
        "MODEL.SIE_CAMERA", True, "MODEL.JPM", jpm, "MODEL.PRETRAIN_CHOICE", "none", "MODEL.DROP_PATH", 0.0,
    ])
    cfg.MERGE.LAYERS = list(range(1, depth))
    for k, v in merge.items():
        node, key = cfg.MERGE, k.upper()
        if "__" in k:
            sub, key = k.upper().split("__")
            node = cfg.MERGE[sub]
        node[key] = v
    return cfg


def vit_base_cfg(**opts):
    """The paper's model: ViT-B/16, 256x128, stride 12, SIE camera, JPM."""
    cfg = get_cfg()
    cfg.merge_from_list([
        "INPUT.SIZE_TRAIN", [256, 128], "INPUT.SIZE_TEST", [256, 128], "MODEL.STRIDE_SIZE", [12, 12],
        "MODEL.SIE_CAMERA", True, "MODEL.JPM", True, "MODEL.PRETRAIN_CHOICE", "none",
    ])
    for k, v in opts.items():
        cfg.merge_from_list([k, v])
    return cfg


@pytest.fixture
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 3, 256, 128, generator=g)


@pytest.fixture
def cams() -> torch.Tensor:
    return torch.tensor([0, 1, 2, 0, 1, 2])
