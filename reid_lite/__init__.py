"""reid_lite: person re-identification with a compressed TransReID (STM-ReID token merging).

`reid_lite.build_model`, `get_cfg` and `load_cfg` are resolved when first used, so that importing one part of
the package (`reid_lite.metrics`, `reid_lite.merging`) loads that part alone.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "build_model", "get_cfg", "load_cfg"]

#: The package's convenience names and the module each comes from.
_CONVENIENCE = {"build_model": "reid_lite.build", "get_cfg": "reid_lite.config", "load_cfg": "reid_lite.config"}


#: The package's modules, reachable as attributes (`reid_lite.models`) without importing them first.
_MODULES = ("build", "cli", "compress", "config", "data", "deploy", "engine", "index", "integrations", "merging",
            "metrics", "models", "utils")


def __getattr__(name: str) -> Any:
    """`reid_lite.build_model` and friends, and the package's modules, imported on first use (PEP 562)."""
    if name in _CONVENIENCE:
        return getattr(importlib.import_module(_CONVENIENCE[name]), name)
    if name in _MODULES:
        return importlib.import_module(f"reid_lite.{name}")
    raise AttributeError(f"module 'reid_lite' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_CONVENIENCE, *_MODULES])
