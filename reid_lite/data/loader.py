"""Image dataset that survives unreadable files, its batch format, and the train/test loaders."""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .datasets import Record, ReIDDataset
from .sampler import TrainBatchSampler
from .transforms import build_transforms

__all__ = [
    "Batch",
    "ImageDataset",
    "MAX_CROP_ASPECT",
    "MIN_CROP_ASPECT",
    "MIN_CROP_SIDE",
    "IMAGE_READ_ERRORS",
    "CropShapeError",
    "ImageReadWarning",
    "ReIDCollate",
    "Sample",
    "build_test_loader",
    "build_train_loader",
    "check_crop_shape",
    "read_image",
    "to_rgb",
]

#: What `read_image` raises for a missing, truncated, corrupt or oversized file (PNG reports some corruption
#: as SyntaxError) or one that breaks the crop rule (CropShapeError, a ValueError). Anything else is a bug
#: and must propagate.
IMAGE_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class ImageReadWarning(UserWarning):
    """An image could not be read and was dropped from its batch."""


#: The crop rule every reader applies (datasets, gallery build/add, search, HTTP uploads): a person crop
#: has both sides of at least MIN_CROP_SIDE pixels and a height / width ratio within
#: [MIN_CROP_ASPECT, MAX_CROP_ASPECT]. Market-1501 crops are 128x64 (ratio 2); a standing person is 1.5-4,
#: a sitting or cycling one about 1. Outside these bounds the resize to INPUT.SIZE_TEST stretches a few
#: pixels (or a horizontal strip) into a 256x128 input, and the feature describes no person.
MIN_CROP_SIDE = 8
MIN_CROP_ASPECT = 0.25  # 4 times wider than tall
MAX_CROP_ASPECT = 8.0  # 8 times taller than wide


class CropShapeError(ValueError):
    """An image too small or too elongated to be a person crop (see MIN_CROP_SIDE, *_CROP_ASPECT)."""


def check_crop_shape(width: int, height: int, what: str = "image") -> None:
    """Raise CropShapeError when a `width` x `height` image breaks the crop rule (MIN_CROP_SIDE pixels per side,
    height / width within [MIN_CROP_ASPECT, MAX_CROP_ASPECT]); `what` names the image in the message."""
    if min(width, height) < MIN_CROP_SIDE:
        raise CropShapeError(f"{what} is {width}x{height} pixels (width x height): too small for a person crop, "
                             f"both sides must be at least {MIN_CROP_SIDE} pixels")
    aspect = height / width
    if not MIN_CROP_ASPECT <= aspect <= MAX_CROP_ASPECT:
        raise CropShapeError(f"{what} is {width}x{height} pixels (width x height): height / width {aspect:.3g} "
                             f"is outside a person crop's [{MIN_CROP_ASPECT:g}, {MAX_CROP_ASPECT:g}]")


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB copy of a decoded PIL image of any mode.

    High-bit-depth images are scaled, not clipped: PIL's `convert("RGB")` maps a 16-bit grayscale PNG
    (mode I;16 / I) to white, since it clips values above 255. 16-bit values are divided by 257 (65535 ->
    255); 32-bit integer (I) images are taken as 16-bit, which is what PNG and TIFF decode to. Float (F)
    images are taken as [0, 1] when their maximum is at most 1, else as [0, 255]. Palette images pass
    through RGBA (PIL warns for a palette with transparency otherwise); alpha is dropped.
    """
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        gray = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        scale = 255.0 if arr.size and arr.max() <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("P", "PA"):
        img = img.convert("RGBA")
    return img.convert("RGB") if img.mode != "RGB" else img.copy()


def read_image(path: str) -> Image.Image:
    """Open and fully decode `path` as 8-bit RGB (`to_rgb`: 16-bit, grayscale, RGBA, palette, CMYK ... are
    converted), after checking the crop rule (`check_crop_shape`).

    Raises OSError (or another PIL error) when the file is missing, truncated or corrupt, and
    CropShapeError (a ValueError) for an image too small or too elongated to be a person crop;
    decoding happens here, not lazily, so a truncated JPEG fails in this call.
    """
    with Image.open(path) as img:
        check_crop_shape(img.width, img.height, f"{path}")
        img.load()
        return to_rgb(img)


class Sample(NamedTuple):
    """One item of `ImageDataset`; `image` is None when the file could not be read."""

    image: Any
    pid: int
    camid: int
    viewid: int
    path: str
    index: int


class ImageDataset(Dataset):
    """Records `(path, pid, camid, viewid)` -> `Sample`; unreadable images give `image=None`.

    `transform` maps a PIL RGB image to a tensor (e.g. `build_transforms(cfg, False)`); with
    None the sample carries the PIL image. A failed read warns once per file
    (`ImageReadWarning`) and the collate function drops the sample, reporting its path.
    """

    def __init__(self, records: Sequence[Record], transform: Callable[[Image.Image], Any] | None = None) -> None:
        self.records = list(records)
        self.transform = transform
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: int | tuple[int, int]) -> Sample:
        """`item` is a record index, or `(index, seed)`: the transform's random draws then come from `seed`
        (torch and Python generators seeded for this call and restored after), as `TrainBatchSampler` yields."""
        index, seed = item if isinstance(item, tuple) else (item, None)
        path, pid, camid, viewid = self.records[index]
        try:
            img = read_image(path)
        except IMAGE_READ_ERRORS as err:
            if path not in self._warned:
                self._warned.add(path)
                warnings.warn(f"cannot read image {path} ({type(err).__name__}: {err}); skipped",
                              ImageReadWarning, stacklevel=2)
            return Sample(None, pid, camid, viewid, path, index)
        if self.transform is not None:
            img = self.transform(img) if seed is None else _seeded(self.transform, img, seed)
        return Sample(img, pid, camid, viewid, path, index)


def _seeded(transform: Callable[[Image.Image], Any], img: Image.Image, seed: int) -> Any:
    """`transform(img)` with torch's CPU generator and Python's `random` (timm's RandomErasing) seeded by
    `seed`, both restored afterwards so that the caller's random streams do not move."""
    # The CPU generator directly: torch.manual_seed / fork_rng also seed every accelerator and cost
    # milliseconds per call, which per sample would rival the image decoding.
    gen = torch.default_generator
    torch_state, py_state = gen.get_state(), random.getstate()
    try:
        gen.manual_seed(seed)
        random.seed(seed)
        return transform(img)
    finally:
        gen.set_state(torch_state)
        random.setstate(py_state)


@dataclass
class Batch:
    """A collated batch of readable images plus the paths that failed.

    images: (B, 3, H, W) float; pids, camids, viewids: (B,) int64; indices: (B,) int64, each
    image's position in the dataset's records (in a test loader, `indices < num_query` marks
    the queries even when reads fail); paths: the B image paths;
    failed: paths dropped because they could not be read (B + len(failed) = samples asked for).
    When every image failed, B = 0: `images` is an empty (0, 3, H, W) tensor (H = W = 0 when the
    collate does not know the size) and the id tensors are empty; callers just skip it.
    """

    images: torch.Tensor
    pids: torch.Tensor
    camids: torch.Tensor
    viewids: torch.Tensor
    indices: torch.Tensor
    paths: list[str]
    failed: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Copy of the batch with its tensors on `device`."""
        return Batch(*(t.to(device, non_blocking=non_blocking)
                       for t in (self.images, self.pids, self.camids, self.viewids, self.indices)),
                     paths=self.paths, failed=self.failed)

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True)."""
        tensors = (self.images, self.pids, self.camids, self.viewids, self.indices)
        return Batch(*(t.pin_memory() for t in tensors),
                     paths=self.paths, failed=self.failed)


class ReIDCollate:
    """Collate `Sample`s into a `Batch`, dropping (and listing) unreadable ones.

    `image_size` (H, W) shapes the empty `images` tensor of an all-failed batch. A class rather
    than a closure so that DataLoader workers can pickle it.
    """

    def __init__(self, image_size: Sequence[int] | None = None) -> None:
        self.image_size = tuple(int(s) for s in image_size) if image_size is not None else (0, 0)

    def __call__(self, samples: Sequence[Sample]) -> Batch:
        ok = [s for s in samples if s.image is not None]
        failed = [s.path for s in samples if s.image is None]
        if ok:
            images = torch.stack([s.image for s in ok])
        else:
            images = torch.empty((0, 3, *self.image_size), dtype=torch.float32)

        def ids(attr: str) -> torch.Tensor:
            return torch.tensor([getattr(s, attr) for s in ok], dtype=torch.long)

        return Batch(images, ids("pid"), ids("camid"), ids("viewid"), ids("index"), [s.path for s in ok],
                     failed)


def build_test_loader(cfg: Any, dataset: ReIDDataset, transform: Callable[[Image.Image], Any] | None = None,
                      span: tuple[int, int] | None = None) -> tuple[DataLoader, int]:
    """Loader over `dataset.query + dataset.gallery` (in that order) and the number of queries.

    Uses TEST.IMS_PER_BATCH, DATALOADER.NUM_WORKERS, no shuffling, pinned memory when CUDA is
    available, and `build_transforms(cfg, is_train=False)` unless `transform` is given. Items
    are `Batch`es; samples with `Batch.indices < num_query` are queries (robust to dropped,
    unreadable images, which are listed in `Batch.failed`). `span=(lo, hi)` loads only
    `records[lo:hi]` (one process's share; `Batch.indices` are then relative to `lo`).
    """
    records = list(dataset.query) + list(dataset.gallery)
    if span is not None:
        records = records[span[0]:span[1]]
    loader = DataLoader(
        ImageDataset(records, transform or build_transforms(cfg, is_train=False)),
        batch_size=cfg.TEST.IMS_PER_BATCH,
        shuffle=False,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        pin_memory=torch.cuda.is_available(),
        collate_fn=ReIDCollate(cfg.INPUT.SIZE_TEST),
    )
    return loader, len(dataset.query)


def build_train_loader(cfg: Any, dataset: ReIDDataset, transform: Callable[[Image.Image], Any] | None = None,
                       seed: int | None = None, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Training loader over `dataset.train`, as TransReID builds it, for one of `world_size` processes.

    DATALOADER.SAMPLER containing 'triplet' (e.g. 'softmax_triplet') -> P x K identity batches of
    SOLVER.IMS_PER_BATCH images, DATALOADER.NUM_INSTANCE per identity; 'softmax' -> plain shuffling.
    SOLVER.IMS_PER_BATCH is the global batch: each process loads its `1 / world_size` share
    (`TrainBatchSampler`). The order and every sample's augmentations are seeded from `seed` (default
    SOLVER.SEED) and the epoch (`loader.batch_sampler.set_epoch(epoch)`; the first pass is epoch 1), so
    they do not depend on the number of processes or workers. Incomplete last batches are dropped.
    """
    if not dataset.train:
        raise ValueError(f"{dataset.name} has no training images")
    seed = cfg.SOLVER.SEED if seed is None else seed
    batch_size = cfg.SOLVER.IMS_PER_BATCH
    sampler_name = cfg.DATALOADER.SAMPLER
    if "triplet" in sampler_name:
        num_instances = int(cfg.DATALOADER.NUM_INSTANCE)
    elif sampler_name == "softmax":
        num_instances = None
    else:
        raise ValueError(f"unsupported DATALOADER.SAMPLER {sampler_name!r}: use 'softmax' or 'softmax_triplet'")
    batch_sampler = TrainBatchSampler(dataset.train, batch_size, num_instances, seed, rank, world_size)
    identity = batch_sampler.identity
    if identity is not None and len(identity.pids) < identity.num_pids_per_batch:
        raise ValueError(
            f"P x K sampling needs at least {identity.num_pids_per_batch} training identities "
            f"(SOLVER.IMS_PER_BATCH / DATALOADER.NUM_INSTANCE), the dataset has {len(identity.pids)}")
    if batch_sampler.batches_in_epoch() == 0:
        raise ValueError(f"{dataset.name}: {len(dataset.train)} training images make no complete batch of "
                         f"SOLVER.IMS_PER_BATCH {batch_size}")
    workers = int(cfg.DATALOADER.NUM_WORKERS)
    return DataLoader(
        ImageDataset(dataset.train, transform or build_transforms(cfg, is_train=True)),
        batch_sampler=batch_sampler,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        collate_fn=ReIDCollate(cfg.INPUT.SIZE_TRAIN),
        persistent_workers=workers > 0,
        # Its own generator: creating an iterator then never draws from torch's global RNG (a resumed run
        # creates one more iterator than an uninterrupted run, and must not shift the model's random stream).
        generator=torch.Generator().manual_seed(int(seed)),
    )
