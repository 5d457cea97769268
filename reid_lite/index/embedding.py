"""The model half of a gallery: its stored configuration, the feature extractor, embedding crops.

`GalleryEncoder` is the component a `reid_lite.index.Gallery` holds; `build_extractor` builds the model
a gallery is bound to (seeded, so that every process building the same gallery gets the same weights).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from yacs.config import CfgNode

from ..data import ImageDataset, ReIDCollate, build_transforms
from ..deploy.runtime import DeployError
from ..engine.extractor import FeatureExtractor, extract_features
from .fingerprint import check_fingerprint, check_query_fingerprint, gallery_space, model_fingerprint
from .interfaces import CropMetadata
from .storage import FingerprintMismatch
from .store import CropRecord

__all__ = ["GalleryEncoder", "build_extractor"]


class _EachBatch:
    """A DataLoader that reports "batch embedded" to a write's stage callback after every batch."""

    def __init__(self, loader: Any, notify: Callable[[str], None]) -> None:
        self.loader = loader
        self.dataset = loader.dataset
        self.notify = notify

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            yield batch
            self.notify("batch embedded")


class GalleryEncoder:
    """A gallery's model: its stored configuration and fingerprint, the feature extractor (built on first use or
    shared), embedding crops into the gallery's feature space. One per gallery; it survives new generations."""

    def __init__(self, fingerprint: dict[str, Any], config_text: str, camera_num: int, pattern: str | None,
                 device: str | None = None) -> None:
        self.fingerprint = fingerprint
        self.config_text = config_text
        self.camera_num = int(camera_num)
        self.device = device
        self._pattern = pattern
        self._extractor: Any = None  # built on first use (`extractor()`), or shared

    @classmethod
    def from_metadata(cls, store: CropMetadata) -> GalleryEncoder:
        """The encoder a gallery's metadata describes (fingerprint, config, SIE cameras, file-name pattern)."""
        return cls(store.get_meta("fingerprint"), store.get_meta("config"), store.get_meta("camera_num", 1),
                   store.get_meta("pattern"))

    @property
    def cfg(self) -> Any:
        """The configuration the gallery was built with (frozen)."""
        cfg = CfgNode.load_cfg(self.config_text)
        cfg.freeze()
        return cfg

    @property
    def pattern(self) -> str:
        """Default file-name pattern (camid, optional pid and timestamp groups) of this gallery."""
        return self._pattern or self.cfg.DATASETS.FOLDER_PATTERN

    @property
    def dim(self) -> int:
        """Stored feature dimension."""
        return int(self.fingerprint["feature"]["dim"])

    def extractor(self, cfg: Any | None = None, device: str | None = None) -> Any:
        """The gallery's FeatureExtractor (built from its stored config), or one for the query model `cfg`
        (see `query_model`)."""
        if cfg is None:
            if self._extractor is None:
                self._extractor = self._gallery_extractor(device)
                check_fingerprint(self.fingerprint, model_fingerprint(
                    self.cfg, self._extractor.model, self.fingerprint["feature"]["kind"], self.camera_num))
            return self._extractor
        return self.query_model(cfg, device)[0]

    def _gallery_extractor(self, device: str | None) -> Any:
        """build_extractor on the stored config; a gallery bound to an exported model whose file is gone says
        where the gallery expects it."""
        cfg = self.cfg
        onnx = str(cfg.MODEL.ONNX_PATH) if str(cfg.MODEL.BACKEND).lower() != "torch" else ""
        if onnx and not Path(onnx).is_file():
            raise DeployError(f"this gallery embeds with the exported model {onnx} (its MODEL.ONNX_PATH), which "
                              "is not there any more: put the file back at that path (a copy with the same bytes; "
                              "the gallery checks its sha256)")
        return build_extractor(cfg, self.camera_num, device or self.device, None)

    def query_model(self, cfg: Any, device: str | None = None) -> tuple[Any, dict[str, Any]]:
        """(FeatureExtractor, fingerprint) of the query model `cfg`, after checking that the gallery
        accepts it: the gallery's own model, or (a gallery built with `accept_merged_queries`) the same
        model with other token merging; anything else raises `FingerprintMismatch`."""
        ext = build_extractor(cfg, self.camera_num, device or self.device, None)
        fp = model_fingerprint(cfg, ext.model, self.fingerprint["feature"]["kind"], self.camera_num)
        check_query_fingerprint(self.fingerprint, fp)
        return ext, fp

    def use_extractor(self, extractor: Any) -> None:
        """Embed with `extractor`, a FeatureExtractor of this gallery's model (the caller vouches for that:
        a build passes the one it fingerprinted)."""
        self._extractor = extractor

    def share_model(self, other: GalleryEncoder) -> None:
        """Use `other`'s already built extractor (another generation of the same gallery, or one with
        the same fingerprint), so that reopening a gallery does not build its model again."""
        if other.fingerprint != self.fingerprint:
            raise FingerprintMismatch("share_model: the two galleries were built with different models")
        if other._extractor is not None:
            self._extractor = other._extractor
        self.device = other.device

    def normalize_features(self, feats: torch.Tensor | np.ndarray) -> np.ndarray:
        """What the gallery stores of extracted features: float32, the global part for feature 'global',
        L2-normalised rows."""
        return gallery_space(feats, self.fingerprint)

    def check_cameras(self, records: Sequence[CropRecord], what: str = "crop") -> None:
        """Raise ValueError (with the way out) when the model has a camera SIE and a record's camera is
        missing or outside its table, which is fixed when the gallery is built."""
        if not self.fingerprint["architecture"]["sie_camera"]:
            return
        bad = [r for r in records if r.camid is None or not 0 <= r.camid < self.camera_num]
        if bad:
            cams = sorted({r.camid for r in bad if r.camid is not None})
            raise ValueError(
                f"this gallery's model has a camera SIE over {self.camera_num} cameras (0-based ids 0.."
                f"{self.camera_num - 1}), fixed when it was built; {len(bad)} {what}(s) have "
                + (f"camera(s) {', '.join(map(str, cams[:5]))}" if cams else "no camera")
                + f", e.g. {bad[0].path}. Map them onto its cameras (--sidecar / --query-camera) or build a new "
                "gallery for more cameras (--camera-num N, or a checkpoint trained on them)")

    def embed_records(self, records: Sequence[CropRecord], batch_size: int | None = None, workers: int = 0,
                      progress: bool = False, *, extractor: Any | None = None, what: str = "crop",
                      on_batch: Callable[[str], None] | None = None
                      ) -> tuple[np.ndarray, list[int], list[str], float]:
        """Embed crops: (features (n, D), positions in `records` of the n embedded crops, unreadable
        paths, seconds). Uses the data package's loader (an unreadable image is skipped and reported,
        never fatal) and the engine's `extract_features`. `extractor`: another model of the same
        fingerprint (default: the gallery's). `on_batch`: called with "batch embedded" after every batch."""
        ext = extractor or self.extractor()
        cfg = ext.cfg
        sie = bool(self.fingerprint["architecture"]["sie_camera"])
        self.check_cameras(records, what)
        ds = ImageDataset([(r.path, r.identity if r.identity is not None else -1, r.camid or 0, 0) for r in records],
                          build_transforms(cfg, is_train=False))
        loader = DataLoader(ds, batch_size=int(batch_size or cfg.TEST.IMS_PER_BATCH), shuffle=False,
                            num_workers=workers, collate_fn=ReIDCollate(cfg.INPUT.SIZE_TEST))
        if on_batch is not None:
            loader = _EachBatch(loader, on_batch)
        out = extract_features(ext.model, loader, device=ext.device, amp=cfg.TEST.AMP,
                               flip=bool(cfg.TEST.FLIP), feat_norm=True, use_camera=sie,
                               progress=progress, desc="embed" if what == "crop" else what)
        return self.normalize_features(out.feats), [int(i) for i in out.indices], list(out.failed), out.seconds


def build_extractor(cfg: Any, camera_num: int, device: str | None, model: torch.nn.Module | None) -> Any:
    """FeatureExtractor for `cfg`; random initialisation is seeded (SOLVER.SEED) so that every process
    building the same gallery model gets the same weights, without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.SOLVER.SEED))
        return FeatureExtractor(cfg, model=model, weights=cfg.TEST.WEIGHT or None,
                                device=device or cfg.MODEL.DEVICE, camera_num=camera_num)
