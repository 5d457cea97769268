"""yacs configuration: the official TransReID keys plus a MERGE section for token reduction.

`get_cfg()` returns a fresh copy of the defaults. YAML files and command-line `KEY VALUE`
overrides are merged with `load_cfg`; an unknown key is an error that names it (yacs' own check).
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from yacs.config import CfgNode as CN

from .merging import load_plugins, merge_section

_C = CN()

# ----------------------------------------------------------------------------- MODEL
_C.MODEL = CN()
_C.MODEL.DEVICE = "cuda"  # falls back to cpu with a message when CUDA is absent
_C.MODEL.DEVICE_ID = "0"
_C.MODEL.NAME = "transformer"
_C.MODEL.LAST_STRIDE = 1
_C.MODEL.PRETRAIN_PATH = ""
# 'imagenet': initialise the backbone from a local timm-format ViT file at PRETRAIN_PATH;
# 'self': load a full TransReID state dict; 'none': random initialisation.
_C.MODEL.PRETRAIN_CHOICE = "imagenet"
_C.MODEL.NECK = "bnneck"
_C.MODEL.IF_WITH_CENTER = "no"
_C.MODEL.ID_LOSS_TYPE = "softmax"
_C.MODEL.ID_LOSS_WEIGHT = 1.0
_C.MODEL.TRIPLET_LOSS_WEIGHT = 1.0
_C.MODEL.METRIC_LOSS_TYPE = "triplet"
_C.MODEL.DIST_TRAIN = False
_C.MODEL.NO_MARGIN = False
_C.MODEL.IF_LABELSMOOTH = "on"
_C.MODEL.COS_LAYER = False
_C.MODEL.DROP_PATH = 0.1
_C.MODEL.DROP_OUT = 0.0
_C.MODEL.ATT_DROP_RATE = 0.0
_C.MODEL.TRANSFORMER_TYPE = "vit_base_patch16_224_TransReID"
_C.MODEL.STRIDE_SIZE = [16, 16]
_C.MODEL.JPM = False
_C.MODEL.SHIFT_NUM = 5
_C.MODEL.SHUFFLE_GROUP = 2
_C.MODEL.DEVIDE_LENGTH = 4
_C.MODEL.RE_ARRANGE = True
_C.MODEL.SIE_COE = 3.0
_C.MODEL.SIE_CAMERA = False
_C.MODEL.SIE_VIEW = False
# Size overrides for small test/demo models (0 keeps the TRANSFORMER_TYPE's value).
_C.MODEL.EMBED_DIM = 0
_C.MODEL.DEPTH = 0
_C.MODEL.NUM_HEADS = 0
# Allow full unpickling of a checkpoint that weights_only loading refuses. Only for files you trust.
_C.MODEL.TRUST_CHECKPOINT = False
# Inference backend: torch (the PyTorch model) | onnxruntime | openvino (the exported file at ONNX_PATH,
# made by tools/export.py; it carries its weights and merging schedule).
_C.MODEL.BACKEND = "torch"
_C.MODEL.ONNX_PATH = ""
# Distillation while training (engine/teacher.py): a frozen re-identification model, an OpenVINO IR (.xml) or
# ONNX file, whose embeddings the student learns: TEACHER_LOSS similarity (pairwise cosines in a batch) | feature
# (each image's, through a learned projection) | both, times TEACHER_WEIGHT; TEACHER_INPUT: bgr255 (Open Model
# Zoo) | rgb255 | rgb01.
_C.MODEL.TEACHER = ""
_C.MODEL.TEACHER_WEIGHT = 1.0
_C.MODEL.TEACHER_INPUT = "bgr255"
_C.MODEL.TEACHER_LOSS = "similarity"

# ----------------------------------------------------------------------------- INPUT
_C.INPUT = CN()
_C.INPUT.SIZE_TRAIN = [384, 128]
_C.INPUT.SIZE_TEST = [384, 128]
_C.INPUT.PROB = 0.5
_C.INPUT.RE_PROB = 0.5
_C.INPUT.PIXEL_MEAN = [0.485, 0.456, 0.406]
_C.INPUT.PIXEL_STD = [0.229, 0.224, 0.225]
_C.INPUT.PADDING = 10

# ----------------------------------------------------------------------------- DATASETS
_C.DATASETS = CN()
_C.DATASETS.NAMES = "market1501"
_C.DATASETS.ROOT_DIR = "datasets"
# 'synthetic' is generated on first use under the default ROOT_DIR only; True generates it under any
# ROOT_DIR (elsewhere a missing dataset is an error naming the folder, so a mistyped path creates nothing).
_C.DATASETS.GENERATE = False
# Generic crop folders: file-name pattern with named groups `pid` (optional) and `camid`.
_C.DATASETS.FOLDER_PATTERN = r"(?P<pid>-?\d+)_c(?P<camid>\d+)"

# ----------------------------------------------------------------------------- DATALOADER
_C.DATALOADER = CN()
_C.DATALOADER.NUM_WORKERS = 2
_C.DATALOADER.SAMPLER = "softmax"
_C.DATALOADER.NUM_INSTANCE = 16

# ----------------------------------------------------------------------------- SOLVER
_C.SOLVER = CN()
_C.SOLVER.OPTIMIZER_NAME = "Adam"
_C.SOLVER.MAX_EPOCHS = 100
_C.SOLVER.BASE_LR = 3e-4
_C.SOLVER.LARGE_FC_LR = False
_C.SOLVER.BIAS_LR_FACTOR = 1
_C.SOLVER.SEED = 1234
_C.SOLVER.MOMENTUM = 0.9
_C.SOLVER.MARGIN = 0.3
_C.SOLVER.CENTER_LR = 0.5
_C.SOLVER.CENTER_LOSS_WEIGHT = 0.0005
_C.SOLVER.WEIGHT_DECAY = 0.0005
_C.SOLVER.WEIGHT_DECAY_BIAS = 0.0005
_C.SOLVER.GAMMA = 0.1
_C.SOLVER.STEPS = (40, 70)
_C.SOLVER.WARMUP_FACTOR = 0.01
_C.SOLVER.WARMUP_EPOCHS = 5
_C.SOLVER.WARMUP_METHOD = "linear"
_C.SOLVER.COSINE_MARGIN = 0.5
_C.SOLVER.COSINE_SCALE = 30
_C.SOLVER.CHECKPOINT_PERIOD = 10
_C.SOLVER.LOG_PERIOD = 100
_C.SOLVER.EVAL_PERIOD = 10
_C.SOLVER.IMS_PER_BATCH = 64  # the global batch: split evenly over torchrun's processes
# reid_lite additions
_C.SOLVER.SCHEDULER = "cosine"  # cosine (the official schedule) | multistep (STEPS, GAMMA)
_C.SOLVER.AMP = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | fp16 (with a GradScaler) | bf16
_C.SOLVER.TRAIN_WITH_MERGING = False  # keep MERGE.METHOD on while training (default: merge at test time only)

# ----------------------------------------------------------------------------- TEST
_C.TEST = CN()
_C.TEST.IMS_PER_BATCH = 128
_C.TEST.RE_RANKING = False
_C.TEST.WEIGHT = ""
_C.TEST.NECK_FEAT = "after"
_C.TEST.FEAT_NORM = "yes"
_C.TEST.DIST_MAT = "dist_mat.npy"
_C.TEST.EVAL = False
# reid_lite additions
_C.TEST.FLIP = False  # average the features of the image and its horizontal flip
_C.TEST.AMP = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | fp16 | bf16
_C.TEST.QUERY_CHUNK = 1024  # queries searched at once, bounds memory for large galleries

# ----------------------------------------------------------------------------- MERGE
# Token reduction inside the backbone's blocks: the section is the merging package's (its own keys in
# reid_lite.merging.settings, each registered method's node MERGE.<NAME> from the registry), filled in by get_cfg.
_C.MERGE = CN()

_C.OUTPUT_DIR = "output"

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def get_cfg() -> CN:
    """Return a fresh, mutable copy of the default configuration (with every registered method's node)."""
    cfg = _C.clone()
    cfg.MERGE = merge_section()
    return cfg


def config_plugins(config_file: str | Path | None = None, opts: Sequence[str] = ()) -> list[str]:
    """MERGE.PLUGINS as a YAML file and `KEY VALUE` overrides set it (the last setting wins), unvalidated.

    Read before the config itself, so that the plugins can register their nodes first.
    """
    plugins: Any = []
    if config_file:
        with open(resolve_config_path(config_file)) as f:
            data = yaml.safe_load(f) or {}
        plugins = (data.get("MERGE") or {}).get("PLUGINS", []) if isinstance(data, dict) else []
    for key, value in zip(list(opts)[::2], list(opts)[1::2]):
        if key == "MERGE.PLUGINS":
            plugins = _decode_list(value)
    if isinstance(plugins, str):
        plugins = [plugins]
    if not isinstance(plugins, (list, tuple)):
        raise ValueError(f"MERGE.PLUGINS must be a list of .py files or module names, got {plugins!r}")
    return [str(p) for p in plugins]


def _decode_list(value: Any) -> Any:
    if isinstance(value, str) and value.strip().startswith(("[", "(")):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"MERGE.PLUGINS: cannot read {value!r} as a list") from None
    return value


def resolve_config_path(path: str | Path) -> Path:
    """Find a config file: the path as given, else the same name inside the project's `configs/`."""
    p = Path(path)
    if p.is_file():
        return p
    candidate = CONFIG_DIR / p.name
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(f"config file not found: {path} (also looked for {candidate})")


def load_cfg(config_file: str | Path | None = None, opts: Sequence[str] = ()) -> CN:
    """Defaults, then `config_file`, then `KEY VALUE` pairs from `opts`; returns a frozen config.

    The plugins of MERGE.PLUGINS are imported first, so their methods' nodes are known. Raises KeyError
    naming the key when the file or `opts` contains a key the defaults lack.
    """
    plugins = load_plugins(config_plugins(config_file, opts))  # before the keys their nodes define
    cfg = get_cfg()
    if config_file:
        with open(resolve_config_path(config_file), encoding="utf-8") as fh:
            file_cfg = CN.load_cfg(fh)
        if "MODEL" in file_cfg and "DEVICE_ID" in file_cfg.MODEL:  # `DEVICE_ID: 0` or `0,1` in YAML: keep the text
            file_cfg.MODEL.DEVICE_ID = repr(str(file_cfg.MODEL.DEVICE_ID))  # yacs literal-evals it again
        cfg.merge_from_other_cfg(file_cfg)
    if opts:
        if len(opts) % 2:
            raise ValueError(f"overrides must be KEY VALUE pairs, got an odd count: {list(opts)}")
        try:
            # MERGE.PLUGINS as read above: one bare path is accepted for a list of one.
            opts = [v for k, val in zip(opts[::2], opts[1::2]) for v in (k, plugins if k == "MERGE.PLUGINS" else val)]
            # `MODEL.DEVICE_ID 1` would parse as an int against a str default: keep ids as the text given.
            opts = [repr(str(v)) if i % 2 and opts[i - 1] == "MODEL.DEVICE_ID" else v for i, v in enumerate(opts)]
            cfg.merge_from_list(opts)
        except AssertionError as e:  # yacs asserts on unknown keys from a list; make it a KeyError
            raise KeyError(str(e)) from None
    cfg.MERGE.PLUGINS = plugins  # resolved: absolute paths, so a stored config finds them from anywhere
    cfg.freeze()
    return cfg
