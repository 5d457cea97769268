"""Person ReID datasets in their published layouts, plus a generic folder of camera crops.

Every dataset exposes `train`, `query` and `gallery` lists of records
`(img_path, pid, camid, viewid)`, as in TransReID: `camid` is 0-based (Market's `c1` -> 0) and
`viewid` is 0 for datasets without view labels. Train pids are relabelled to 0..P-1 (the
classifier needs contiguous labels); query/gallery pids keep their original values, because
evaluation only compares them with each other.

Nothing here downloads anything: a missing or malformed dataset raises `DatasetLayoutError`
naming the expected layout and the paths that were looked at. See `datasets/README.md`.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

Record = tuple[str, int, int, int]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

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
]


class DatasetLayoutError(FileNotFoundError):
    """A dataset is missing or does not follow its expected layout (the message names both)."""


class SidecarError(ValueError):
    """A row of a folder dataset's sidecar file is invalid (the message names file and line)."""


def _split_info(records: Sequence[Record]) -> tuple[int, int, int, int]:
    """(# ids, # images, # cameras, # views) of one split; unlabelled pid -1 is not an identity."""
    pids = {r[1] for r in records if r[1] != -1}
    cams = {r[2] for r in records}
    views = {r[3] for r in records}
    return len(pids), len(records), len(cams), len(views)


def _relabel(records: Sequence[Record]) -> list[Record]:
    """Map train pids to 0..P-1 in sorted pid order (sorted, so the mapping is reproducible)."""
    pid2label = {pid: label for label, pid in enumerate(sorted({r[1] for r in records}))}
    return [(path, pid2label[pid], camid, viewid) for path, pid, camid, viewid in records]


class ReIDDataset:
    """Base class: holds the three splits and their statistics (TransReID's BaseImageDataset)."""

    #: Name shown in the statistics table.
    name: str = "dataset"

    def __init__(self, train: list[Record], query: list[Record], gallery: list[Record],
                 verbose: bool = False) -> None:
        self.train = train
        self.query = query
        self.gallery = gallery
        (self.num_train_pids, self.num_train_imgs,
         self.num_train_cams, self.num_train_vids) = _split_info(train)
        (self.num_query_pids, self.num_query_imgs,
         self.num_query_cams, self.num_query_vids) = _split_info(query)
        (self.num_gallery_pids, self.num_gallery_imgs,
         self.num_gallery_cams, self.num_gallery_vids) = _split_info(gallery)
        if verbose:
            self.print_statistics()

    def statistics_table(self) -> str:
        """The torchreid-style table: subset | # ids | # images | # cameras."""
        rule = "  " + "-" * 40
        rows = [f"=> Loaded {self.name}", rule, "  subset   | # ids | # images | # cameras", rule]
        for subset in ("train", "query", "gallery"):
            pids = getattr(self, f"num_{subset}_pids")
            imgs = getattr(self, f"num_{subset}_imgs")
            cams = getattr(self, f"num_{subset}_cams")
            rows.append(f"  {subset:<8} | {pids:5d} | {imgs:8d} | {cams:9d}")
        rows.append(rule)
        return "\n".join(rows)

    def print_statistics(self) -> None:
        """Print `statistics_table()`."""
        print(self.statistics_table())

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(train={self.num_train_imgs}, query={self.num_query_imgs}, "
                f"gallery={self.num_gallery_imgs})")


# ------------------------------------------------------------------------------ Market-style


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
        train = _relabel(self._process_dir(train_dir))
        query = self._process_dir(query_dir)
        gallery = self._process_dir(gallery_dir)
        for split, records, folder in (("query", query, query_dir), ("gallery", gallery, gallery_dir)):
            if not records:
                raise DatasetLayoutError(f"{self.name}: no {split} images (*.jpg) in {folder}")
        super().__init__(train, query, gallery, verbose=verbose)

    def _process_dir(self, folder: Path) -> list[Record]:
        records: list[Record] = []
        for path in sorted(folder.glob("*.jpg")):
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
        super().__init__(_relabel(train), query, gallery, verbose=verbose)

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


# ------------------------------------------------------------------------------ generic folder


def _list_images(folder: Path, recursive: bool) -> list[Path]:
    it: Iterable[Path] = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())


def _parse_int(value: Any, field: str, required: bool) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise ValueError(f"missing required field '{field}'")
        return None
    if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
        raise ValueError(f"'{field}' must be an integer, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"'{field}' must be an integer, got {value!r}") from None


def parse_timestamp(value: Any) -> float | str | None:
    """Numbers become float (e.g. epoch seconds); other strings (ISO 8601) are kept as given."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value).strip()


class FolderDataset(ReIDDataset):
    """A folder of person crops (e.g. from a camera network), by default all in `gallery`.

    Camera and identity come either from the file name, via `pattern` (a regex searched in the
    file name, with a named group `camid` and an optional group `pid`; default
    `DATASETS.FOLDER_PATTERN`), or from a `sidecar` CSV/JSON file (columns `path`, `camid`, and
    optionally `pid`, `timestamp`; see datasets/README.md). Crops without identity get pid -1
    and are kept (an unlabelled gallery).

    Camera numbering: numbers matched in file names are taken as 1-based as in Market/MSMT17
    (`c1` -> camid 0); sidecar `camid` values are used as given (0-based). `cam_base` overrides.

    `split` ('gallery', 'query' or 'train') says which list receives the images; 'train'
    requires every crop to have a pid and relabels them. Timestamps from a sidecar are in
    `self.timestamps` (path -> float or str).
    """

    name = "Folder"
    DEFAULT_PATTERN = r"(?P<pid>-?\d+)_c(?P<camid>\d+)"

    def __init__(self, root: str | os.PathLike, dataset_dir: str = "", pattern: str | None = None,
                 sidecar: str | os.PathLike | None = None, cam_base: int | None = None,
                 split: str = "gallery", recursive: bool = True, verbose: bool = False,
                 **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(f"FolderDataset: unexpected arguments {sorted(kwargs)}")
        if split not in ("gallery", "query", "train"):
            raise ValueError(f"split must be 'gallery', 'query' or 'train', got {split!r}")
        folder = Path(os.path.expanduser(os.fspath(root))).absolute() / dataset_dir
        if not folder.is_dir():
            raise DatasetLayoutError(
                f"folder dataset not found: expected a directory of image crops at {folder}")
        self.dataset_dir = str(folder)
        self.timestamps: dict[str, float | str] = {}
        if sidecar is not None:
            sidecar_path = Path(os.path.expanduser(os.fspath(sidecar)))
            if not sidecar_path.is_absolute() and not sidecar_path.exists():
                sidecar_path = folder / sidecar_path
            if not sidecar_path.is_file():
                raise DatasetLayoutError(f"sidecar file not found: {sidecar_path}")
            records = self._from_sidecar(folder, sidecar_path, 0 if cam_base is None else cam_base)
        else:
            regex = re.compile(pattern or self.DEFAULT_PATTERN)
            if "camid" not in regex.groupindex:
                raise ValueError(f"folder pattern {regex.pattern!r} needs a named group 'camid'")
            records = self._from_pattern(folder, regex, 1 if cam_base is None else cam_base, recursive)
        if not records:
            raise DatasetLayoutError(
                f"folder dataset: no images ({', '.join(IMG_EXTENSIONS)}) found in {folder}")
        if split == "train":
            unlabelled = [r[0] for r in records if r[1] < 0]
            if unlabelled:
                raise ValueError(f"split='train' needs a pid for every crop; none for {unlabelled[:3]}")
            records = _relabel(records)
        splits: dict[str, list[Record]] = {"train": [], "query": [], "gallery": []}
        splits[split] = records
        super().__init__(splits["train"], splits["query"], splits["gallery"], verbose=verbose)

    @staticmethod
    def _from_pattern(folder: Path, regex: re.Pattern[str], cam_base: int,
                      recursive: bool) -> list[Record]:
        records: list[Record] = []
        unmatched: list[str] = []
        for path in _list_images(folder, recursive):
            match = regex.search(path.name)
            if match is None:
                unmatched.append(path.name)
                continue
            pid = match.groupdict().get("pid")
            camid = int(match.group("camid")) - cam_base
            if camid < 0:
                raise DatasetLayoutError(
                    f"{path}: camera {match.group('camid')} below the first camera number {cam_base}")
            # pid -1 (Market's junk convention, or no pid group) means "unlabelled": kept.
            records.append((str(path), int(pid) if pid is not None else -1, camid, 0))
        if unmatched:
            raise DatasetLayoutError(
                f"folder dataset {folder}: {len(unmatched)} file name(s) do not match the pattern "
                f"{regex.pattern!r} (needs a named group 'camid'), e.g. {unmatched[:3]}; "
                "pass another pattern or a sidecar file")
        return records

    @staticmethod
    def _sidecar_rows(sidecar: Path) -> list[tuple[str, dict[str, Any]]]:
        """(location, row) pairs; location is 'line N' (CSV) or 'entry N' (JSON) for messages."""
        if sidecar.suffix.lower() == ".json":
            try:
                data = json.loads(sidecar.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise SidecarError(f"{sidecar}: line {err.lineno}: invalid JSON ({err.msg})") from None
            if isinstance(data, dict):  # {"path": {"camid": .., ...}, ...}
                items = [{**(v if isinstance(v, dict) else {"_bad": v}), "path": k} for k, v in data.items()]
            elif isinstance(data, list):
                items = data
            else:
                raise SidecarError(f"{sidecar}: expected a list of objects or an object keyed by path")
            rows = []
            for i, item in enumerate(items):
                if not isinstance(item, dict) or "_bad" in item:
                    raise SidecarError(f"{sidecar}: entry {i}: expected an object with 'path' and 'camid'")
                rows.append((f"entry {i}", item))
            return rows
        if sidecar.suffix.lower() != ".csv":
            raise SidecarError(f"{sidecar}: sidecar must be a .csv or .json file")
        with open(sidecar, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = {"path", "camid"} - set(reader.fieldnames or ())
            if missing:
                raise SidecarError(
                    f"{sidecar}: line 1: header lacks required column(s) {sorted(missing)} "
                    f"(found {reader.fieldnames}); expected path,camid[,pid][,timestamp]")
            return [(f"line {reader.line_num}", row) for row in reader]

    def _from_sidecar(self, folder: Path, sidecar: Path, cam_base: int) -> list[Record]:
        real_folder = folder.resolve()
        records: list[Record] = []
        seen: set[str] = set()
        for where, row in self._sidecar_rows(sidecar):
            try:
                rel = row.get("path")
                if not isinstance(rel, str) or not rel.strip():
                    raise ValueError("missing required field 'path'")
                target = (folder / rel.strip()).resolve()
                # Reject `..` escapes and absolute paths elsewhere (also through symlinks).
                if not target.is_relative_to(real_folder):
                    raise ValueError(f"path {rel!r} resolves outside the folder {folder}")
                if not target.is_file():
                    raise ValueError(f"image {rel!r} does not exist in {folder}")
                camid = _parse_int(row.get("camid"), "camid", required=True) - cam_base
                if camid < 0:
                    raise ValueError(f"camid must be >= {cam_base}, got {row.get('camid')!r}")
                pid = _parse_int(row.get("pid"), "pid", required=False)
                timestamp = parse_timestamp(row.get("timestamp"))
            except ValueError as err:
                raise SidecarError(f"{sidecar}: {where}: {err}") from None
            path = os.path.normpath(folder / rel.strip())
            if path in seen:
                raise SidecarError(f"{sidecar}: {where}: duplicate entry for {rel!r}")
            seen.add(path)
            records.append((path, -1 if pid is None else pid, camid, 0))
            if timestamp is not None:
                self.timestamps[path] = timestamp
        unlisted = len(_list_images(folder, True)) - len(records)
        if unlisted > 0:
            warnings.warn(f"{folder}: {unlisted} image(s) not listed in {sidecar.name} are ignored",
                          stacklevel=3)
        return records


# ------------------------------------------------------------------------------ registry

def sie_counts(dataset: ReIDDataset) -> tuple[int, int]:
    """(camera_num, view_num) for SIE: the official training counts, raised to cover every id in any split.

    Camera ids index the SIE table, so with cameras missing from the training split (e.g. only c1, c3)
    the official `num_train_cams` would be too small; training and
    evaluation both size the table this way, so a checkpoint trained here always loads there.
    """
    records = list(dataset.train) + list(dataset.query) + list(dataset.gallery)
    max_cam = max((r[2] for r in records), default=-1) + 1
    max_view = max((r[3] for r in records), default=-1) + 1
    return max(dataset.num_train_cams, max_cam), max(dataset.num_train_vids, max_view)



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
    from .synthetic import MARKER_NAME, generate_reid_dataset

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
