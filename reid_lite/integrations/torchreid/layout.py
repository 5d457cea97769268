"""Which torchreid is installed (PyPI 0.2.5 or a source install) and its model registry."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import SimpleNamespace

from torch import nn

INSTALL_HINT = "pip install -e .[torchreid]"
#: torchreid's submodules the adapter uses, under `torchreid.reid.` (PyPI) or `torchreid.` (source).
SUBMODULES = ("models", "utils", "metrics", "data", "engine", "losses", "optim")
#: Attribute marking the factory functions (and datasets) registered by us in torchreid's registries.
OWNED_MARKER = "_reid_lite_model"


def torchreid_modules() -> SimpleNamespace:
    """torchreid's submodules for whichever layout is installed.

    Returns a namespace with `models`, `utils`, `metrics`, `data`, `engine`, `losses`, `optim` and `layout`:
    'pypi' for the PyPI package 0.2.5 (code under `torchreid.reid.*`) or 'source' for a source install of
    deep-person-reid (`torchreid.models`, ...). Raises ImportError naming `pip install -e .[torchreid]` when
    torchreid (or one of its import-time dependencies, gdown and tensorboard) is missing.
    """
    try:
        importlib.import_module("torchreid")
    except ImportError as e:
        raise ImportError(f"the torchreid adapter needs torchreid (and gdown, tensorboard): {INSTALL_HINT} "
                          f"[{e.__class__.__name__}: {e}]") from e
    for layout, prefix in (("pypi", "torchreid.reid"), ("source", "torchreid")):
        try:
            mods = {name: importlib.import_module(f"{prefix}.{name}") for name in SUBMODULES}
        except ModuleNotFoundError as e:
            # Only "this layout is absent" moves on; a missing dependency inside torchreid is reported as is.
            if e.name and e.name != "torchreid" and any(f"{prefix}.{n}" == e.name or prefix == e.name
                                                        for n in SUBMODULES):
                continue
            raise ImportError(f"torchreid is installed but cannot be imported: {e}. Try {INSTALL_HINT}") from e
        return SimpleNamespace(layout=layout, **mods)
    raise ImportError(f"torchreid is installed but has neither torchreid.reid.models (PyPI 0.2.5) nor "
                      f"torchreid.models (source install); reinstall it: {INSTALL_HINT}")


def model_factory(tr: SimpleNamespace) -> dict[str, Callable[..., nn.Module]]:
    """torchreid's model registry (name -> factory function)."""
    # torchreid keeps its registry in a module-level dict; `build_model` reads it at call time.
    return getattr(tr.models, "__model_factory")
