"""File digests (what fingerprints, manifests and exported-model checks identify files by) and the checks of
output paths that tools run before any work."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["check_output_dir", "check_output_file", "sha256_file"]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in `chunk`-byte blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _writable_ancestor(path: Path, what: str) -> None:
    """Raise when the nearest existing ancestor of `path` is a file or cannot be written (mkdir would fail)."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"{what} {path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise PermissionError(f"{what} {path}: the folder {parent} is not writable")
            return


def check_output_file(path: str | os.PathLike, what: str = "output file", overwrite: bool = True) -> Path:
    """`path` as a Path after checking, before any work, that a file can be written there.

    Raises IsADirectoryError when it is a folder, FileExistsError when it exists and not `overwrite`,
    NotADirectoryError / PermissionError when a parent is a file or the folder is not writable. Creates nothing.
    """
    out = Path(path)
    if out.is_dir():
        raise IsADirectoryError(f"{what} {out} is a folder: give a file name")
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{what} {out} exists: pass --overwrite to replace it, or choose another path")
        if not os.access(out, os.W_OK):
            raise PermissionError(f"{what} {out} exists and is not writable")
        return out
    _writable_ancestor(out, what)
    return out


def check_output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """`path` as a Path after checking, before any work, that it is (or can be created as) a writable folder.

    Raises NotADirectoryError when it or a parent is a file, PermissionError when it is not writable.
    Creates nothing.
    """
    out = Path(path)
    if out.exists():
        if not out.is_dir():
            raise NotADirectoryError(f"{what} {out} is a file, not a folder")
        if not os.access(out, os.W_OK | os.X_OK):
            raise PermissionError(f"{what} {out} is not writable")
        return out
    _writable_ancestor(out, what)
    return out
