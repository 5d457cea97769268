"""reid_lite: person re-identification with a compressed TransReID (STM-ReID token merging)."""

from .config import get_cfg, load_cfg
from .models import build_model

__version__ = "0.1.0"
__all__ = ["__version__", "build_model", "get_cfg", "load_cfg"]
