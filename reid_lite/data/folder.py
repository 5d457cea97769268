"""A generic folder of camera crops: camera and identity from the file name (a regex) or from a
CSV/JSON sidecar file, validated row by row (`SidecarError` names the file and the line)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .base import IMG_EXTENSIONS, DatasetLayoutError, Record, ReIDDataset, SidecarError, relabel_train


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
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float's range
        number = math.inf
    except (TypeError, ValueError):
        return str(value).strip()
    if not math.isfinite(number):  # nan / inf / 1e400 would sort before or after every crop
        raise ValueError(f"timestamp {str(value)[:40]!r} is not a finite number")
    return number


def _byte_line(path: Path, offset: int) -> str:
    """'line N' of the byte at `offset` in `path` (for a decoding error, which only knows the offset)."""
    newlines = path.read_bytes()[:offset].count(b"\n")
    return f"line {newlines + 1}"


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
            records = relabel_train(records)
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
                # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the text.
                data = json.loads(sidecar.read_text(encoding="utf-8-sig"))
            except json.JSONDecodeError as err:
                raise SidecarError(f"{sidecar}: line {err.lineno}: invalid JSON ({err.msg})") from None
            except UnicodeDecodeError as err:
                raise SidecarError(f"{sidecar}: {_byte_line(sidecar, err.start)}: not UTF-8 text "
                                   f"(byte {err.object[err.start:err.start + 1]!r})") from None
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
        try:
            text = sidecar.read_bytes().decode("utf-8-sig")  # a leading byte-order mark is dropped
        except UnicodeDecodeError as err:
            raise SidecarError(f"{sidecar}: {_byte_line(sidecar, err.start)}: not UTF-8 text "
                               f"(byte {err.object[err.start:err.start + 1]!r}); save it as UTF-8") from None
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = []
        try:
            missing = {"path", "camid"} - set(reader.fieldnames or ())
            if missing:
                raise SidecarError(
                    f"{sidecar}: line 1: header lacks required column(s) {sorted(missing)} "
                    f"(found {reader.fieldnames}); expected path,camid[,pid][,timestamp]")
            for row in reader:
                rows.append((f"line {reader.line_num}", row))
        except csv.Error as err:  # e.g. a NUL byte, an unterminated quote at the end of the file
            raise SidecarError(f"{sidecar}: line {reader.line_num}: not valid CSV ({err})") from None
        return rows

    def _from_sidecar(self, folder: Path, sidecar: Path, cam_base: int) -> list[Record]:
        real_folder = folder.resolve()
        records: list[Record] = []
        seen: set[str] = set()
        for where, row in self._sidecar_rows(sidecar):
            try:
                if None in row:  # csv.DictReader files the fields beyond the header under None
                    raise ValueError(f"{len(row) - 1 + len(row[None])} fields, but the header has {len(row) - 1} "
                                     f"(extra {row[None]!r}); quote a value that holds a comma")
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
