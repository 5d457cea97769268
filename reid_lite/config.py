"""yacs configuration: the official TransReID keys plus a MERGE section for token reduction.

`get_cfg()` returns a fresh copy of the defaults. YAML files and command-line `KEY VALUE`
overrides are merged with `load_cfg`; an unknown key is an error that names it (yacs' own check).
`validate(cfg)` checks the values (`training=True`: every key training reads), in one place.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from torch import nn
from yacs.config import CfgNode as CN

from .merging import load_plugins, merge_section
from .utils.device import AMP_CHOICES, launched_by_torchrun

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
# Official keys that nothing here reads: kept because official YAML files, the shipped configs (TEST.EVAL) and
# the configs stored in galleries set them, and yacs refuses a key the defaults lack.
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

#: SOLVER.SCHEDULER and SOLVER.WARMUP_METHOD values (engine/lr_scheduler.py).
SCHEDULERS = ("cosine", "multistep")
WARMUP_METHODS = ("linear", "constant")
#: MODEL.TEACHER_INPUT: what the teacher's input tensor holds. 'bgr255' is Open Model Zoo's convention
#: (BGR, 0-255, no mean or scale); 'rgb255' the same in RGB order; 'rgb01' RGB scaled to [0, 1].
TEACHER_INPUTS = ("bgr255", "rgb255", "rgb01")
#: MODEL.TEACHER_LOSS: 'similarity' (pairwise cosines, no parameters), 'feature' (each image's embedding through a
#: learned linear projection, cosine to the teacher's) or 'both' (their sum).
TEACHER_LOSSES = ("similarity", "feature", "both")

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


def load_config_plugins(config_file: str | Path | None = None, opts: Sequence[str] = ()) -> list[str]:
    """Import the plugins MERGE.PLUGINS names in a config file and overrides (`config_plugins`), so that their
    methods and nodes are known before the config is read; returns the entries resolved."""
    return load_plugins(config_plugins(config_file, opts))


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
    plugins = load_config_plugins(config_file, opts)  # before the keys their nodes define
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


def validate(cfg: CN, training: bool = False) -> None:
    """Refuse, with a ValueError in one line that names the key, a configuration the run cannot honour.

    Testing (`training` False): INPUT.SIZE_TEST must equal INPUT.SIZE_TRAIN (`check_input_size`). Training: every
    key training reads (`check_training_keys`); the test size is checked against the model when it evaluates.
    Called before any data is read, by the tools and by `reid_lite.engine.trainer.train`; checks that need a
    model (its patch grid, its SIE table) run where the model is built.
    """
    if training:
        check_training_keys(cfg)
    else:
        check_input_size(cfg)


def check_input_size(cfg: CN, model: nn.Module | None = None) -> None:
    """Raise ValueError when INPUT.SIZE_TEST differs from the image size the model is built for
    (`model`'s patch embedding, or INPUT.SIZE_TRAIN, from which `build_model` sizes it).

    TransReID's position embedding has one entry per patch of that size's grid, so test images of another
    size cannot be embedded (the official code, too, uses one size for both); checked before any image is
    read instead of failing in the first forward.
    """
    embed = getattr(getattr(model, "base", None), "patch_embed", None)
    if model is not None and embed is None:
        return  # not a TransReID: nothing known about its input size
    built = tuple(embed.img_size) if embed is not None else tuple(int(v) for v in cfg.INPUT.SIZE_TRAIN)
    test = tuple(int(v) for v in cfg.INPUT.SIZE_TEST)
    if built != test:
        raise ValueError(f"INPUT.SIZE_TEST {list(test)} differs from INPUT.SIZE_TRAIN {list(built)}, the size "
                         f"the model (its position embedding) is built for: set both to the checkpoint's "
                         f"training size, e.g. INPUT.SIZE_TEST '{list(built)}'")


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def check_training_keys(cfg: CN) -> None:
    """Refuse, with a ValueError that names the key, every official key whose setting training would not honour.

    Honoured elsewhere: SOLVER.* schedule, optimiser, batch, periods and seed keys, MODEL.* model and loss
    keys. Refused here: center loss (MODEL.IF_WITH_CENTER, and SOLVER.CENTER_LR / CENTER_LOSS_WEIGHT
    changed from their defaults), arcface/cosface heads (MODEL.ID_LOSS_TYPE, MODEL.COS_LAYER,
    SOLVER.COSINE_MARGIN / COSINE_SCALE changed), MODEL.NECK other than 'bnneck', MODEL.LAST_STRIDE other
    than 1 (a ResNet key with no meaning for a ViT), SOLVER.STEPS / GAMMA changed while SOLVER.SCHEDULER
    is 'cosine' (they drive only 'multistep'), MODEL.DIST_TRAIN without torchrun, several
    MODEL.DEVICE_IDs in one process (use torchrun), unknown SCHEDULER / WARMUP_METHOD / AMP values, a
    missing MODEL.TEACHER file and bad teacher settings, DTEM's embedding-only training without MERGE.METHOD dtem.
    """
    m, s, d = cfg.MODEL, cfg.SOLVER, get_cfg()

    def refuse(msg: str) -> None:
        raise ValueError(msg)

    if str(m.IF_WITH_CENTER).lower() not in ("no", "false"):
        refuse("center loss (MODEL.IF_WITH_CENTER) is not supported; set it to 'no'")
    for key in ("CENTER_LR", "CENTER_LOSS_WEIGHT"):
        if s[key] != d.SOLVER[key]:
            refuse(f"SOLVER.{key} configures the center loss, which is not supported; leave it at {d.SOLVER[key]}")
    if m.ID_LOSS_TYPE != "softmax":
        refuse(f"MODEL.ID_LOSS_TYPE {m.ID_LOSS_TYPE!r} is not supported; use 'softmax'")
    if m.COS_LAYER:
        refuse("MODEL.COS_LAYER (a cosine classifier) is not supported; set it to False")
    for key in ("COSINE_MARGIN", "COSINE_SCALE"):
        if s[key] != d.SOLVER[key]:
            refuse(f"SOLVER.{key} configures arcface/cosface heads, which are not supported; "
                   f"leave it at {d.SOLVER[key]}")
    if m.METRIC_LOSS_TYPE != "triplet":
        refuse(f"MODEL.METRIC_LOSS_TYPE {m.METRIC_LOSS_TYPE!r} is not supported; use 'triplet'")
    if m.NECK != "bnneck":
        refuse(f"MODEL.NECK {m.NECK!r} is not supported; TransReID uses 'bnneck'")
    if int(m.LAST_STRIDE) != 1:
        refuse(f"MODEL.LAST_STRIDE {m.LAST_STRIDE} has no meaning for a ViT backbone; leave it at 1")
    scheduler = str(s.SCHEDULER).lower()
    if scheduler not in SCHEDULERS:
        refuse(f"SOLVER.SCHEDULER must be one of {SCHEDULERS}, got {s.SCHEDULER!r}")
    if scheduler == "cosine":
        for key in ("STEPS", "GAMMA"):
            if _as_tuple(s[key]) != _as_tuple(d.SOLVER[key]):
                refuse(f"SOLVER.{key} applies to SOLVER.SCHEDULER 'multistep' only; set SCHEDULER multistep "
                       "or leave it at its default")
    if str(s.WARMUP_METHOD).lower() not in WARMUP_METHODS:
        refuse(f"SOLVER.WARMUP_METHOD must be one of {WARMUP_METHODS}, got {s.WARMUP_METHOD!r}")
    if str(s.AMP).lower() not in AMP_CHOICES:
        refuse(f"SOLVER.AMP must be one of {AMP_CHOICES}, got {s.AMP!r}")
    if m.DIST_TRAIN and not launched_by_torchrun():
        refuse("MODEL.DIST_TRAIN is set but the process was not started by torchrun: "
               "run `torchrun --nproc_per_node N tools/train.py ...` (multi-process is then automatic)")
    if len([x for x in str(m.DEVICE_ID).split(",") if x.strip()]) > 1 and not launched_by_torchrun():
        refuse(f"MODEL.DEVICE_ID {m.DEVICE_ID!r} lists several GPUs: one process trains on one GPU; "
               "run `torchrun --nproc_per_node N tools/train.py ...` to use N")
    if int(s.IMS_PER_BATCH) < 1:
        refuse(f"SOLVER.IMS_PER_BATCH must be >= 1, got {s.IMS_PER_BATCH}")
    if m.TEACHER:
        if not Path(m.TEACHER).is_file():
            refuse(f"MODEL.TEACHER: no such file: {m.TEACHER}")
        if m.TEACHER_INPUT not in TEACHER_INPUTS:
            refuse(f"MODEL.TEACHER_INPUT must be one of {TEACHER_INPUTS}, got {m.TEACHER_INPUT!r}")
        if m.TEACHER_LOSS not in TEACHER_LOSSES:
            refuse(f"MODEL.TEACHER_LOSS must be one of {TEACHER_LOSSES}, got {m.TEACHER_LOSS!r}")
        if not float(m.TEACHER_WEIGHT) > 0:
            refuse(f"MODEL.TEACHER_WEIGHT must be > 0, got {m.TEACHER_WEIGHT}")
    if cfg.MERGE.DTEM.TRAIN_EMBEDDING_ONLY and str(cfg.MERGE.METHOD).lower() != "dtem":
        refuse(f"MERGE.DTEM.TRAIN_EMBEDDING_ONLY trains DTEM's embedding: set MERGE.METHOD dtem (got "
               f"{cfg.MERGE.METHOD!r})")
