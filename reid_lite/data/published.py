"""The published ReID datasets in their own layouts: Market-1501 (and CUHK03 converted to it),
DukeMTMC-reID and MSMT17. Nothing is downloaded: a missing or malformed folder raises
`DatasetLayoutError` naming the expected layout and the paths looked at (see datasets/README.md).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, ClassVar

from .base import IMG_EXTENSIONS, DatasetLayoutError, Record, ReIDDataset, relabel_train


class _MarketLayout(ReIDDataset):
    """Market-1501 style: three folders of `<pid>_c<cam>...jpg` files."""

    #: Folder names accepted under `root`, in the order they are tried.
    dataset_dirs: tuple[str, ...] = ()
    subdirs = ("bounding_box_train", "query", "bounding_box_test")
    pattern = re.compile(r"([-\d]+)_c(\d+)")

    def __init__(self, root: str | os.PathLike = "datasets", dataset_dir: str | None = None,
                 verbose: bool = False, **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(f"{type(self).__name__}: unexpected arguments {sorted(kwargs)}")
        root = Path(os.path.expanduser(os.fspath(root))).absolute()
        names = (dataset_dir,) if dataset_dir else self.dataset_dirs
        # The root itself is accepted too, so a user can point straight at the dataset folder.
        candidates = [root / n for n in names] + [root]
        base = next((c for c in candidates if all((c / s).is_dir() for s in self.subdirs)), None)
        if base is None:
            for c in candidates:  # a dataset folder that is there but incomplete: name what is missing
                present = [s for s in self.subdirs if (c / s).is_dir()]
                if present:
                    missing = [s for s in self.subdirs if s not in present]
                    raise DatasetLayoutError(
                        f"{self.name} at {c} is incomplete: missing folder(s) {', '.join(missing)} "
                        f"(found {', '.join(present)}; expected {', '.join(self.subdirs)}). "
                        "See datasets/README.md.")
            layout = "{" + ",".join(self.subdirs) + "}"
            expected = " or ".join(f"{root / n}/{layout}" for n in names)
            looked = ", ".join(str(c) for c in candidates)
            raise DatasetLayoutError(
                f"{self.name} not found: expected {expected} (looked at: {looked}). "
                "Nothing is downloaded; see datasets/README.md.")
        self.dataset_dir = str(base)
        if dataset_dir:  # e.g. CUHK03 in Market layout: name the table after its folder
            self.name = f"{self.name}[{dataset_dir}]"
        train_dir, query_dir, gallery_dir = (base / s for s in self.subdirs)
        train = relabel_train(self._process_dir(train_dir))
        query = self._process_dir(query_dir)
        gallery = self._process_dir(gallery_dir)
        for split, records, folder in (("query", query, query_dir), ("gallery", gallery, gallery_dir)):
            if not records:
                raise DatasetLayoutError(f"{self.name}: no {split} images ({', '.join(sorted(IMG_EXTENSIONS))}, "
                                         f"any case) in {folder}")
        super().__init__(train, query, gallery, verbose=verbose)

    def _process_dir(self, folder: Path) -> list[Record]:
        records: list[Record] = []
        # Any case and every image extension, as reid-gallery reads a folder: a copy from a camera or
        # Windows may name its files .JPG, and glob("*.jpg") is case-sensitive on Linux.
        images = (p for p in folder.iterdir() if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
        for path in sorted(images):
            match = self.pattern.search(path.name)
            if match is None:
                raise DatasetLayoutError(
                    f"{self.name}: file name {path} does not match '<pid>_c<camera>...' "
                    f"(regex {self.pattern.pattern})")
            pid, cam = int(match.group(1)), int(match.group(2))
            if pid == -1:  # junk images, ignored by the Market-1501 protocol
                continue
            if cam < 1:
                raise DatasetLayoutError(f"{self.name}: camera numbers start at 1, got c{cam} in {path}")
            records.append((str(path), pid, cam - 1, 0))
        return records


class Market1501(_MarketLayout):
    """Market-1501 (`<root>/market1501/` or `<root>/Market-1501-v15.09.15/`).

    Junk images (pid -1) are skipped; distractors (pid 0) stay in the gallery, as in torchreid.
    `dataset_dir` selects another folder in the same layout (e.g. CUHK03 converted to it).
    """

    name = "Market1501"
    dataset_dirs = ("market1501", "Market-1501-v15.09.15", "Market-1501")


class DukeMTMCreID(_MarketLayout):
    """DukeMTMC-reID (`<root>/DukeMTMC-reID/`), Market-style folders and names."""

    name = "DukeMTMCreID"
    dataset_dirs = ("DukeMTMC-reID", "dukemtmc-reid", "dukemtmcreid")


# ------------------------------------------------------------------------------ MSMT17


class MSMT17(ReIDDataset):
    """MSMT17 V1 or V2, read from the official list files.

    Accepted roots: `<root>/MSMT17_V1/`, `<root>/MSMT17_V2/`, the same under `<root>/msmt17/`, or
    `<root>/msmt17/` (`<root>/MSMT17/`) holding the folders directly. V1 images are in
    `train/` and `test/`, V2 images in `mask_train_v2/` and `mask_test_v2/`.

    Train = list_train + list_val, as TransReID does. The val list holds more images of the
    *same* 1041 training identities (same label space), so its pids are merged, not offset.
    """

    name = "MSMT17"
    _dirs: ClassVar[dict[str, tuple[str, str]]] = {"V1": ("train", "test"), "V2": ("mask_train_v2", "mask_test_v2")}
    _lists = ("list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt")

    def __init__(self, root: str | os.PathLike = "datasets", version: str | None = None,
                 dataset_dir: str | None = None, verbose: bool = False, **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(f"MSMT17: unexpected arguments {sorted(kwargs)}")
        root = Path(os.path.expanduser(os.fspath(root))).absolute()
        if version is not None:
            version = version.upper().removeprefix("MSMT17_")
            if version not in self._dirs:
                raise ValueError(f"MSMT17 version must be 'V1' or 'V2', got {version!r}")
        versions = (version,) if version else ("V1", "V2")
        bases = [root / dataset_dir] if dataset_dir else [root / "msmt17", root / "MSMT17", root]
        candidates = [b / f"MSMT17_{v}" for b in bases for v in versions] + bases
        found = None
        for cand in candidates:
            for v in versions:
                needed = [cand / d for d in self._dirs[v]]
                if all(p.is_dir() for p in needed) and all((cand / f).is_file() for f in self._lists):
                    found = (cand, v)
                    break
            if found:
                break
        if found is None:
            lists = ",".join(self._lists)
            expected = " or ".join(f"<dir>/{{{','.join(self._dirs[v])},{lists}}} (MSMT17_{v})"
                                   for v in versions)
            looked = ", ".join(str(c) for c in candidates)
            raise DatasetLayoutError(
                f"MSMT17 not found: expected {expected} with <dir> one of {looked}. "
                "Nothing is downloaded; see datasets/README.md.")
        base, self.version = found
        self.dataset_dir = str(base)
        train_dir, test_dir = (base / d for d in self._dirs[self.version])
        train = self._process_list(train_dir, base / "list_train.txt")
        train += self._process_list(train_dir, base / "list_val.txt")
        query = self._process_list(test_dir, base / "list_query.txt")
        gallery = self._process_list(test_dir, base / "list_gallery.txt")
        for split, records in (("query", query), ("gallery", gallery)):
            if not records:
                raise DatasetLayoutError(f"MSMT17: {base / f'list_{split}.txt'} lists no images")
        super().__init__(relabel_train(train), query, gallery, verbose=verbose)

    @staticmethod
    def _process_list(image_dir: Path, list_path: Path) -> list[Record]:
        """Parse `relative/path.jpg pid` lines; the camera is the file name's third `_` field.

        Image files are not stat-ed here (126k of them on MSMT17): a missing one is reported by
        the loader as a failed image instead.
        """
        records: list[Record] = []
        with open(list_path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                parts = line.split()
                try:
                    if len(parts) != 2:
                        raise ValueError("expected '<relative/path.jpg> <pid>'")
                    rel, pid = parts[0], int(parts[1])
                    cam = int(os.path.basename(rel).split("_")[2])
                    if cam < 1:
                        raise ValueError(f"camera numbers start at 1, got {cam}")
                except (ValueError, IndexError) as err:
                    raise DatasetLayoutError(
                        f"MSMT17: {list_path} line {lineno}: malformed entry {line.strip()!r} ({err}); "
                        "expected e.g. '0000/0000_000_01_0303morning_0015_0.jpg 0'") from None
                records.append((str(image_dir / rel), pid, cam - 1, 0))
        return records
