"""Shared fixtures: tiny model configs (the ViT-B shape only where a test needs it)."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import torch
from extras import pytest_sessionfinish, pytest_terminal_summary  # noqa: F401 (pytest hooks for CI)

import reid_lite.cli
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


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A tiny synthetic dataset at low resolution (fast to render and to train on): 8 training identities
    over 3 cameras, 2 images per identity and camera, 4 test identities."""
    from reid_lite.data.synthetic import generate_reid_dataset

    root = tmp_path_factory.mktemp("data")
    generate_reid_dataset(root, num_train_ids=8, num_test_ids=4, num_cameras=3, images_per_id_per_camera=2,
                          size=(64, 32), num_distractors=2, progress=False)
    return root


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine they spin-wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_train_cfg(root: Path, out: Path, epochs: int = 2, *opts):
    """A frozen training config: 3 blocks of width 32 at 64x32 (stride 16: 4x2 patches), JPM, SIE, P x K
    batches of 4 identities x 2 images on `tiny_data`, CPU; `opts` are extra KEY VALUE overrides."""
    cfg = get_cfg()
    cfg.merge_from_list([
        "MODEL.EMBED_DIM", 32, "MODEL.DEPTH", 3, "MODEL.NUM_HEADS", 2, "MODEL.JPM", True, "MODEL.SIE_CAMERA", True,
        "MODEL.PRETRAIN_CHOICE", "none", "MODEL.DROP_PATH", 0.0, "MODEL.STRIDE_SIZE", [16, 16],
        "MODEL.DEVICE", "cpu", "INPUT.SIZE_TRAIN", [64, 32], "INPUT.SIZE_TEST", [64, 32], "INPUT.RE_PROB", 0.0,
        "DATASETS.NAMES", "market1501", "DATASETS.ROOT_DIR", str(root / "synthetic"),
        "DATALOADER.SAMPLER", "softmax_triplet", "DATALOADER.NUM_INSTANCE", 2, "DATALOADER.NUM_WORKERS", 0,
        "SOLVER.OPTIMIZER_NAME", "AdamW", "SOLVER.BASE_LR", 1e-3, "SOLVER.IMS_PER_BATCH", 8,
        "SOLVER.MAX_EPOCHS", epochs, "SOLVER.WARMUP_EPOCHS", 0, "SOLVER.CHECKPOINT_PERIOD", 1,
        "SOLVER.LOG_PERIOD", 2, "MERGE.METHOD", "stm", "MERGE.LAYERS", [1], "MERGE.R", 2, "OUTPUT_DIR", str(out),
        *opts,
    ])
    cfg.freeze()
    return cfg


TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str) -> ModuleType:
    """Import tools/<name>.py (tools/ is not a package) under its own name: "test" would shadow the stdlib."""
    spec = importlib.util.spec_from_file_location(f"reid_lite_tools_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in a tool look their module up while it is executed
    spec.loader.exec_module(module)
    return module


def small_tool_yaml(root: Path, depth: int, layers: list[int], out: Path | None = None) -> str:
    """A YAML config for the tools' end-to-end tests: a width-64 TransReID at 64x32, STM r=2 in `layers`."""
    text = f"""
MODEL:
  PRETRAIN_CHOICE: 'none'
  EMBED_DIM: 64
  DEPTH: {depth}
  NUM_HEADS: 4
  STRIDE_SIZE: [16, 16]
  SIE_CAMERA: True
  JPM: True
  DEVICE: 'cpu'
INPUT:
  SIZE_TRAIN: [64, 32]
  SIZE_TEST: [64, 32]
DATASETS:
  NAMES: 'market1501'
  ROOT_DIR: '{root}'
DATALOADER:
  NUM_WORKERS: 0
TEST:
  IMS_PER_BATCH: 8
MERGE:
  METHOD: 'stm'
  R: 2
  LAYERS: {list(layers)}
"""
    return text + (f"OUTPUT_DIR: '{out}'\n" if out is not None else "")


@pytest.fixture(autouse=True, scope="session")
def system_malloc_in_the_test_process():
    """The tools run in-process here, and their malloc setting (`reid_lite.cli.set_malloc`) is process-wide and
    never undone: keep it out of the test process, so that no test depends on which tool ran first. The setting
    itself is tested in a child process (tests/test_cli_args.py)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reid_lite.cli, "retain_freed_memory", lambda: False)
        yield
