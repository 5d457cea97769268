"""The dataset registry and the public face of the readers: `build_dataset(name, root)`.

The readers: published layouts in `published.py` (Market-1501, CUHK03 converted, DukeMTMC-reID,
MSMT17), a generic folder of camera crops in `folder.py`, the generated set in `synthetic.py`; the
record and base class in `base.py`.

Every dataset exposes `train`, `query` and `gallery` lists of records
`(img_path, pid, camid, viewid)`, as in TransReID: `camid` is 0-based (Market's `c1` -> 0) and
`viewid` is 0 for datasets without view labels. Train pids are relabelled to 0..P-1 (the
classifier needs contiguous labels); query/gallery pids keep their original values, because
evaluation only compares them with each other.

Nothing here downloads anything: a missing or malformed dataset raises `DatasetLayoutError`
naming the expected layout and the paths that were looked at. See `datasets/README.md`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .base import IMG_EXTENSIONS, DatasetLayoutError, Record, ReIDDataset, SidecarError, sie_counts
from .folder import FolderDataset, parse_timestamp
from .published import MSMT17, DukeMTMCreID, Market1501
from .synthetic import MARKER_NAME, generate_reid_dataset

__all__ = [
    "IMG_EXTENSIONS",
    "MSMT17",
    "DatasetLayoutError",
    "DukeMTMCreID",
    "FolderDataset",
    "Market1501",
    "ReIDDataset",
    "Record",
    "SidecarError",
    "available_datasets",
    "build_dataset",
    "build_dataset_from_cfg",
    "parse_timestamp",
    "register_dataset",
    "sie_counts",
]


_REGISTRY: dict[str, Callable[..., ReIDDataset]] = {}


def register_dataset(name: str, factory: Callable[..., ReIDDataset]) -> None:
    """Register `factory(root=..., **kwargs)` under `name` (case-insensitive) for `build_dataset`."""
    _REGISTRY[name.lower()] = factory


def available_datasets() -> list[str]:
    """Names accepted by `build_dataset`, aliases included."""
    return sorted(_REGISTRY)


def build_dataset(name: str, root: str | os.PathLike = "datasets", **kwargs: Any) -> ReIDDataset:
    """Build a dataset by name, e.g. `build_dataset('market1501', 'datasets')`.

    `kwargs` go to the dataset class (`dataset_dir`, `verbose`, MSMT17's `version`, the folder
    dataset's `pattern`/`sidecar`/...). `cuhk03` is CUHK03 converted to the Market-1501 layout,
    under `<root>/cuhk03/`. Raises KeyError for an unknown name, DatasetLayoutError for a missing
    or malformed dataset.
    """
    key = name.strip().lower()
    if key not in _REGISTRY:
        raise KeyError(f"unknown dataset {name!r}; available: {', '.join(available_datasets())}")
    return _REGISTRY[key](root=root, **kwargs)


def build_dataset_from_cfg(cfg: Any, **kwargs: Any) -> ReIDDataset:
    """`build_dataset(cfg.DATASETS.NAMES, cfg.DATASETS.ROOT_DIR)`, passing FOLDER_PATTERN to `folder` and
    DATASETS.GENERATE to `synthetic`."""
    name = cfg.DATASETS.NAMES
    if name.strip().lower() == "folder":
        kwargs.setdefault("pattern", cfg.DATASETS.FOLDER_PATTERN)
    if name.strip().lower() == "synthetic":
        kwargs.setdefault("generate", bool(cfg.DATASETS.GENERATE))
    return build_dataset(name, cfg.DATASETS.ROOT_DIR, **kwargs)


#: Where the synthetic dataset generates itself unasked: the default DATASETS.ROOT_DIR.
DEFAULT_ROOT = "datasets"


def synthetic_dataset(root: str | os.PathLike = DEFAULT_ROOT, dataset_dir: str = "synthetic", verbose: bool = False,
                      generate: bool = False, **generator_kwargs: Any) -> ReIDDataset:
    """reid_lite's procedurally generated pedestrians (Market-1501 layout under `<root>/<dataset_dir>`).

    A finished folder is read as it is, unless generator arguments are given (then they must match it). A
    missing one is generated deterministically (with a progress bar) when `root` is the default location
    (`datasets`, relative to the working directory) or when `generate` is true (DATASETS.GENERATE);
    anywhere else it is a `DatasetLayoutError` naming the folder, so a mistyped DATASETS.ROOT_DIR never
    fills a new folder with generated images.
    """
    target = Path(os.path.expanduser(os.fspath(root))).absolute() / dataset_dir
    default = Path(DEFAULT_ROOT).absolute()
    if not (target / MARKER_NAME).is_file() and not generate and target.parent.resolve() != default.resolve():
        raise DatasetLayoutError(
            f"no synthetic dataset at {target}: it is generated unasked only under the default DATASETS.ROOT_DIR "
            f"({default}); check DATASETS.ROOT_DIR, or set DATASETS.GENERATE True to generate it there")
    progress = generator_kwargs.pop("progress", True)
    # A finished folder is read as it is (e.g. a larger set from tools/make_synthetic.py); explicit generator
    # arguments are checked against the one there.
    if generator_kwargs or not (target / MARKER_NAME).is_file():
        generate_reid_dataset(root, name=dataset_dir, progress=progress, **generator_kwargs)
    return Market1501(root=root, dataset_dir=dataset_dir, verbose=verbose)


register_dataset("synthetic", synthetic_dataset)
for _name in ("market1501", "market", "market-1501"):
    register_dataset(_name, Market1501)
for _name in ("dukemtmcreid", "dukemtmc-reid", "dukemtmc", "duke"):
    register_dataset(_name, DukeMTMCreID)
register_dataset("msmt17", MSMT17)
register_dataset("msmt17_v1", functools.partial(MSMT17, version="V1"))
register_dataset("msmt17_v2", functools.partial(MSMT17, version="V2"))
register_dataset("cuhk03", functools.partial(Market1501, dataset_dir="cuhk03"))
register_dataset("folder", FolderDataset)
