"""Shared by the server tests: a tiny gallery of synthetic crops with camera, timestamp and identity."""

from __future__ import annotations

from pathlib import Path

from reid_lite.config import load_cfg
from reid_lite.data.synthetic import generate_reid_dataset
from reid_lite.index.gallery import Gallery

TINY = ["MODEL.EMBED_DIM", "64", "MODEL.DEPTH", "3", "MODEL.NUM_HEADS", "4", "INPUT.SIZE_TEST", "[64, 32]",
        "INPUT.SIZE_TRAIN", "[64, 32]", "MODEL.STRIDE_SIZE", "[16, 16]", "MODEL.JPM", "True", "MERGE.METHOD", "stm",
        "MERGE.R", "2", "MERGE.LAYERS", "[1]", "MODEL.PRETRAIN_CHOICE", "none", "MODEL.DEVICE", "cpu",
        "MODEL.SIE_CAMERA", "True", "TEST.IMS_PER_BATCH", "8"]
#: Market-style names `0003_c1s1_000301_00.jpg`: the frame number is the crop's timestamp.
PATTERN = r"(?P<pid>-?\d+)_c(?P<camid>\d+)s\d+_(?P<timestamp>\d+)"


def make_crops(root: Path) -> Path:
    """Synthetic crops (3 cameras, 6 identities): <root>/bounding_box_test and <root>/query."""
    return generate_reid_dataset(root, num_train_ids=2, num_test_ids=6, num_cameras=3, images_per_id_per_camera=2,
                                 size=(64, 32), num_distractors=0, progress=False)


def build_gallery(path: Path, crops: Path) -> Gallery:
    """A gallery of <crops>/bounding_box_test, embedded with the tiny random-init model (SIE over 3 cameras)."""
    g, _ = Gallery.build(path, load_cfg(None, TINY), [crops / "bounding_box_test"], pattern=PATTERN, camera_num=3)
    return g
