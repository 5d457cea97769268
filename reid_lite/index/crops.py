"""Listing crops (camera, timestamp, identity from file names or a sidecar) and hashing their bytes."""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from ..data.datasets import IMG_EXTENSIONS, FolderDataset, parse_timestamp
from .storage import sha256_file
from .store import CropRecord

logger = logging.getLogger(__name__)

__all__ = ["cameras_from_names", "collect_crops", "hash_records", "to_seconds"]


def to_seconds(value: float | int | str | None) -> float | None:
    """Timestamps: numbers as given (epoch or frame clock); ISO 8601 strings -> epoch seconds (naive = UTC)."""
    if value is None:
        return None
    number: float | None = None
    try:
        number = float(value)
    except OverflowError:  # an int beyond float's range
        number = math.inf
    except ValueError:
        if isinstance(value, (int, float)):
            raise
    if number is not None:
        # nan, inf and overflowing literals (1e400) would sort before or after every crop, or match none.
        if not math.isfinite(number):
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise ValueError(f"timestamp {shown} is not a finite number")
        return number
    try:
        t = _dt.datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"timestamp {value!r} is neither a number nor ISO 8601") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    return t.timestamp()



def collect_crops(inputs: Sequence[str | os.PathLike], pattern: str | None = None,
                  sidecar: str | os.PathLike | None = None, recursive: bool = True,
                  cam_base: int | None = None) -> list[CropRecord]:
    """List crops (no hashes yet) from folders and/or image files, with camera, timestamp and identity.

    Parsing is the data package's `FolderDataset` (file-name `pattern` with groups `camid`, optional
    `pid`, or a CSV/JSON `sidecar` with path, camid, pid, timestamp), so its validation and messages
    apply. A `pattern` may also carry a named group `timestamp`. Loose image files are parsed by the
    same class over a temporary folder of symlinks (it only reads folders). Sorted by path, so the
    order, and with it the ids, is deterministic.
    """
    regex = re.compile(pattern or FolderDataset.DEFAULT_PATTERN)
    folders = [Path(p) for p in inputs if Path(p).is_dir()]
    files = [Path(p) for p in inputs if not Path(p).is_dir()]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise FileNotFoundError(f"no such image file or folder: {', '.join(missing[:5])}{more}")
    if sidecar is not None and (len(folders) != 1 or files):
        raise ValueError("a sidecar file describes one folder: pass exactly one folder with --sidecar")
    raw: list[tuple[str, int, int, float | str | None]] = []

    def take(ds: FolderDataset, rename: dict[str, str] | None = None) -> None:
        for path, pid, camid, _ in ds.gallery:
            ts = ds.timestamps.get(path)
            if ts is None and "timestamp" in regex.groupindex:
                m = regex.search(Path(path).name)
                ts = parse_timestamp(m.group("timestamp")) if m else None
            raw.append(((rename or {}).get(path, path), pid, camid, ts))

    for folder in folders:
        take(FolderDataset(folder, pattern=pattern, sidecar=sidecar, cam_base=cam_base, recursive=recursive))
    if files:
        bad = [str(f) for f in files if f.suffix.lower() not in IMG_EXTENSIONS]
        if bad:
            raise ValueError(f"not an image file ({', '.join(IMG_EXTENSIONS)}): {bad[:5]}")
        with tempfile.TemporaryDirectory(prefix="reid-gallery-list-") as tmp:
            rename = {}
            for i, f in enumerate(files):
                link = Path(tmp) / f"{i:08d}" / f.name  # one folder per file: equal names cannot clash
                link.parent.mkdir()
                link.symlink_to(f.resolve())
                rename[str(link)] = str(f.resolve())
            take(FolderDataset(tmp, pattern=pattern, cam_base=cam_base, recursive=True), rename)
    records = [CropRecord(path=os.path.abspath(p), sha256="", camid=int(c), identity=None if pid < 0 else int(pid),
                          timestamp=to_seconds(ts), timestamp_raw=None if ts is None else str(ts))
               for p, pid, c, ts in raw]
    records.sort(key=lambda r: r.path)
    return records



def hash_records(records: Sequence[CropRecord], progress: bool = False) -> tuple[list[CropRecord], list[str]]:
    """Fill in each record's content sha256: (hashed records, paths that could not be read).

    A file that cannot be opened is reported, not fatal, as an image that cannot be decoded is at
    embedding time. `progress`: a tqdm bar on stderr (hashing a large collection takes a while).
    """
    from tqdm.auto import tqdm

    hashed: list[CropRecord] = []
    failed: list[str] = []
    todo = sum(1 for r in records if not r.sha256)
    with tqdm(total=todo, desc="hash", unit="img", disable=not progress or not todo, dynamic_ncols=True) as bar:
        for r in records:
            if r.sha256:
                hashed.append(r)
                continue
            try:
                hashed.append(replace(r, sha256=sha256_file(r.path)))
            except OSError as err:
                logger.warning("cannot read %s (%s); skipped", r.path, err.strerror or err)
                failed.append(r.path)
            bar.update(1)
    return hashed, failed


def cameras_from_names(paths: Sequence[str], pattern: str) -> list[int | None]:
    """Query cameras via `collect_crops` (the folder dataset's parser); None where a name does not parse."""
    out: list[int | None] = []
    for p in paths:
        try:
            out.append(collect_crops([p], pattern=pattern)[0].camid)
        except (ValueError, FileNotFoundError):
            out.append(None)
    return out
