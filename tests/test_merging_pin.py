"""Pinned features: none, ToMe, every STM option combination that matters, and EViT, on fixed tiny weights.

The reference file `tests/data/merging_pin.pt` was written by the code as it was before the merging
engine was reshaped (registry, capacity contract); this test proves the reshaped engine reproduces it.
It was verified bit-identical (torch.equal) on the machine that wrote it. The committed check allows
1e-6 because CPU kernels (oneDNN dispatch by instruction set, thread count) may round differently on
another machine. Regenerate only on purpose: `REID_LITE_REPIN=1 python -m pytest tests/test_merging_pin.py`.
"""

from __future__ import annotations

import os
from itertools import product
from pathlib import Path

import pytest
import torch
from conftest import tiny_cfg

from reid_lite import build_model

PIN_FILE = Path(__file__).parent / "data" / "merging_pin.pt"


def _stm_cases() -> dict[str, dict]:
    cases = {}
    # Every DSE/CCF/PRN switch combination, with the default options and with all alternatives at once.
    for dse, ccf, prn in product((True, False), repeat=3):
        for alt in (False, True):
            opts = {"STM__DSE": dse, "STM__CCF": ccf, "STM__PRN": prn}
            if alt:
                opts.update(STM__ENTROPY="normalized", STM__COORDS="tracked", STM__KEYS="mean")
            cases[f"stm_dse{int(dse)}_ccf{int(ccf)}_prn{int(prn)}{'_alt' if alt else ''}"] = opts
    # Each alternative on its own, with all components on.
    cases["stm_normalized"] = {"STM__ENTROPY": "normalized"}
    cases["stm_tracked"] = {"STM__COORDS": "tracked"}
    cases["stm_keys_mean"] = {"STM__KEYS": "mean"}
    cases["stm_no_prop_attn"] = {"PROP_ATTN": False}
    cases["stm_r_list"] = {"R_LIST": [4, 16, 30]}
    return {name: {"METHOD": "stm", **opts} for name, opts in cases.items()}


CASES: dict[str, dict] = {
    "none": {"METHOD": "none"},
    "tome": {"METHOD": "tome"},
    "tome_no_prop_attn": {"METHOD": "tome", "PROP_ATTN": False},
    "evit": {"METHOD": "evit", "EVIT__LAYERS": [1, 3], "EVIT__KEEP_RATE": 0.7},
    "evit_no_fuse": {"METHOD": "evit", "EVIT__LAYERS": [2], "EVIT__KEEP_RATE": 0.6, "EVIT__FUSE_TOKEN": False},
    **_stm_cases(),
}


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return torch.randn(2, 3, 256, 128, generator=g), torch.tensor([0, 2])


def pinned_features(name: str) -> torch.Tensor:
    """Eval features (2, 5 x 16) of a seeded tiny TransReID (JPM, SIE) under CASES[name]'s merging."""
    opts = {"R": 12, **CASES[name]}
    cfg = tiny_cfg(**opts)
    cfg.merge_from_list(["MODEL.EMBED_DIM", 16])
    torch.manual_seed(0)
    model = build_model(cfg, 10, 3, 1).eval()
    x, cams = _inputs()
    with torch.no_grad():
        return model(x, cam_label=cams)


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    if os.environ.get("REID_LITE_REPIN"):
        PIN_FILE.parent.mkdir(exist_ok=True)
        names = sorted(CASES)
        torch.save({"names": names, "features": torch.stack([pinned_features(n) for n in names])}, PIN_FILE)
    saved = torch.load(PIN_FILE, weights_only=True)
    return dict(zip(saved["names"], saved["features"]))


def test_the_reference_covers_every_case(reference):
    assert set(reference) == set(CASES)
    # The cases really differ (a pin of identical features would prove nothing about the options).
    distinct = {tuple(f.flatten()[:8].tolist()) for f in reference.values()}
    assert len(distinct) > 0.9 * len(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_features_match_the_pinned_reference(name, reference):
    got = pinned_features(name)
    torch.testing.assert_close(got, reference[name], rtol=1e-6, atol=1e-6)
