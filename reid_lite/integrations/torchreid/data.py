"""reid_lite's dataset readers as torchreid image datasets, and the data-manager keywords a model needs."""

from __future__ import annotations

from typing import Any

from torch import nn

from ...data.datasets import build_dataset
from .layout import OWNED_MARKER, torchreid_modules
from .model import unwrap_model


def torchreid_data_kwargs(model: nn.Module) -> dict[str, Any]:
    """`ImageDataManager` keywords matching the model's input: height, width, norm_mean, norm_std.

    TransReID's configs normalise with mean = std = 0.5, not torchreid's ImageNet default; the model's
    position embedding fixes the input size.
    """
    cfg = unwrap_model(model).cfg
    h, w = cfg.INPUT.SIZE_TEST
    return dict(height=int(h), width=int(w), norm_mean=list(cfg.INPUT.PIXEL_MEAN), norm_std=list(cfg.INPUT.PIXEL_STD))


def register_dataset(name: str, reid_lite_dataset: str = "market1501", **dataset_kwargs: Any) -> str:
    """Make one of reid_lite's dataset readers a torchreid image dataset: `ImageDataManager(root=..., sources=name)`.

    `reid_lite_dataset` is a `reid_lite.data.build_dataset` name ('market1501', 'msmt17', 'dukemtmcreid',
    'folder', ...) and `dataset_kwargs` go to it. The reader takes `root` as the dataset folder or its parent,
    never downloads, and gives 0-based camera ids as torchreid does. Idempotent for our own names. Returns `name`.
    """
    tr = torchreid_modules()
    base = tr.data.ImageDataset

    class ReidLiteImageDataset(base):  # type: ignore[misc, valid-type]
        def __init__(self, root: str = "", **kwargs: Any) -> None:
            ds = build_dataset(reid_lite_dataset, root or ".", **dataset_kwargs)
            # torchreid's records are (path, pid, camid); reid_lite adds a view id torchreid has no use for.
            train, query, gallery = ([(p, pid, cam) for p, pid, cam, _ in split]
                                     for split in (ds.train, ds.query, ds.gallery))
            super().__init__(train, query, gallery, **kwargs)

    ReidLiteImageDataset.__name__ = ReidLiteImageDataset.__qualname__ = f"ReidLite[{name}]"
    setattr(ReidLiteImageDataset, OWNED_MARKER, reid_lite_dataset)
    registry = getattr(tr.data.datasets, "__image_datasets")
    if name in registry:
        if not hasattr(registry[name], OWNED_MARKER):
            raise ValueError(f"torchreid already has an image dataset named {name!r}")
        registry[name] = ReidLiteImageDataset  # register_image_dataset refuses existing names
    else:
        tr.data.register_image_dataset(name, ReidLiteImageDataset)
    return name
