"""Datasets (Market-1501, MSMT17, DukeMTMC-reID, generic crop folders), transforms and loaders.

    dataset = build_dataset("market1501", root="datasets")
    loader, num_query = build_test_loader(cfg, dataset)
    for batch in loader:          # reid_lite.data.Batch
        batch.images, batch.pids, batch.camids, batch.failed

No dataset is downloaded; see datasets/README.md for the expected layouts.
"""

from .base import validation_split
from .datasets import (
    MSMT17,
    DatasetLayoutError,
    DukeMTMCreID,
    FolderDataset,
    Market1501,
    Record,
    ReIDDataset,
    SidecarError,
    available_datasets,
    build_dataset,
    build_dataset_from_cfg,
    register_dataset,
    sie_counts,
)
from .loader import (
    MAX_CROP_ASPECT,
    MIN_CROP_ASPECT,
    MIN_CROP_SIDE,
    Batch,
    CropShapeError,
    ImageDataset,
    ImageReadWarning,
    ReIDCollate,
    Sample,
    build_test_loader,
    build_train_loader,
    check_crop_shape,
    read_image,
    to_rgb,
)
from .sampler import RandomIdentitySampler, TrainBatchSampler
from .transforms import build_transforms

__all__ = [
    "MAX_CROP_ASPECT",
    "MIN_CROP_ASPECT",
    "MIN_CROP_SIDE",
    "MSMT17",
    "Batch",
    "CropShapeError",
    "DatasetLayoutError",
    "DukeMTMCreID",
    "FolderDataset",
    "ImageDataset",
    "ImageReadWarning",
    "Market1501",
    "RandomIdentitySampler",
    "ReIDCollate",
    "ReIDDataset",
    "validation_split",
    "Record",
    "Sample",
    "SidecarError",
    "TrainBatchSampler",
    "available_datasets",
    "build_dataset",
    "build_dataset_from_cfg",
    "build_test_loader",
    "build_train_loader",
    "build_transforms",
    "check_crop_shape",
    "read_image",
    "register_dataset",
    "sie_counts",
    "to_rgb",
]
