"""LoTM: the fixed raster pairs worked by hand, the merge arithmetic, pairs inside rows of the real 21x10
grid, and the registry's defaults (blocks 4, 7, 11; block 11 is the trunk's last under JPM)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_cfg

from reid_lite import build_model
from reid_lite.merging import TokenState, get_method, merge_cfg
from reid_lite.merging.lotm import LoTM, lotm_pairs


def _hand_tokens() -> torch.Tensor:
    """Class token and 8 patches of a 2x4 grid; pairs (1,2) cos 0.995, (3,4) cos 0, (5,6) cos 1, (7,8) cos -1."""
    p = [[1, 0], [1, 0.1], [1, 0], [0, 1], [0, 2], [0, 1], [3, 0], [-1, 0]]
    return torch.tensor([[[5.0, 5.0], *p]])


def test_pairs_worked_by_hand():
    x = _hand_tokens()
    assert lotm_pairs(x, 2).tolist() == [[0, 1, 1, 3, 4, 5, 5, 7, 8]]  # (5,6) and (1,2) merge
    assert lotm_pairs(x, 1).tolist() == [[0, 1, 2, 3, 4, 5, 5, 7, 8]]
    assert lotm_pairs(x, 4).tolist() == [[0, 1, 1, 3, 3, 5, 5, 7, 7]]
    # an odd number of patches: the last one has no partner
    assert lotm_pairs(x[:, :8], 3).tolist() == [[0, 1, 1, 3, 3, 5, 5, 7]]


@pytest.mark.parametrize("weighting", ["mean", "size"])
def test_merge_arithmetic(weighting):
    x = _hand_tokens()
    state = TokenState(grid=(2, 4), trace_source=True, track_pos=True)
    state.init(x)
    state.size = torch.tensor([[1.0, 3, 1, 1, 1, 1, 1, 1, 1]])[..., None]  # patch 1 already holds 3
    out = LoTM(2, weighting)(x, None, None, state)
    assert out.shape == (1, 7, 2) and state.size[0, :, 0].tolist() == [1, 4, 1, 1, 2, 1, 1]
    w = 3.0 if weighting == "size" else 1.0
    torch.testing.assert_close(out[0, 1], (w * x[0, 1] + x[0, 2]) / (w + 1))
    torch.testing.assert_close(out[0, 4], (x[0, 5] + x[0, 6]) / 2)
    for kept, orig in [(0, 0), (2, 3), (3, 4), (5, 7), (6, 8)]:  # raster order kept, the rest unchanged
        assert torch.equal(out[0, kept], x[0, orig])
    assert torch.equal(state.source.sum(1), torch.ones(1, 8))  # every patch held by exactly one token
    # positions are size-weighted centroids on the real grid (rows 0.25/0.75, columns 0.125...0.875)
    torch.testing.assert_close(state.pos[0, 1], torch.tensor([0.25, (3 * 0.125 + 0.375) / 4]))


def test_first_block_pairs_lie_inside_rows_of_the_real_grid():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 211, 16, generator=g)
    state = TokenState(grid=(21, 10), track_pos=True, trace_source=True)
    out = LoTM(48)(x, None, None, state)
    assert out.shape[1] == 211 - 48
    merged = state.size[..., 0] == 2
    assert merged.sum(1).tolist() == [48, 48, 48]
    rows = state.pos[..., 0] * 21 - 0.5
    assert torch.allclose(rows[merged], rows[merged].round())  # each merged pair inside one row
    cols = state.source.argmax(-1) % 10
    assert ((cols[:, 1:] % 2 == 0) | ~merged[:, 1:]).all()  # the pair starts at an even column


def test_defaults_and_model():
    reducers = get_method("lotm").build(merge_cfg("lotm"), 11, None)
    assert sorted(reducers) == [3, 6, 10] and {r.k for r in reducers.values()} == {48}
    with pytest.raises(ValueError, match="MERGE.LOTM.LAYERS"):
        get_method("lotm").build(merge_cfg("lotm"), 3, None)
    with pytest.raises(ValueError, match="MERGE.LOTM.WEIGHTING"):
        get_method("lotm").build(merge_cfg("lotm", lotm_weighting="max"), 11, None)
    torch.manual_seed(0)
    model = build_model(tiny_cfg(METHOD="lotm", LOTM__LAYERS=[1, 3], LOTM__K=30), 10, 3, 1).eval()
    assert not model.prop_attn  # the paper has no size bias
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 256, 128, generator=g)
    cams = torch.tensor([0, 1, 2])
    with torch.no_grad():
        batch = model(images, cam_label=cams)
        alone = torch.cat([model(images[i:i + 1], cam_label=cams[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(alone, batch, rtol=1e-5, atol=1e-5)


def test_k_beyond_what_a_block_can_merge_is_an_error():
    from reid_lite.merging import build_reducers

    # 211 tokens: block 4 merges 80 of 105 pairs, block 7 receives 131 and can merge at most 65
    with pytest.raises(ValueError, match="MERGE.LOTM.K 80 is too large: block 7 receives 131 tokens.*at most 65"):
        build_reducers(merge_cfg("lotm", lotm_k=80), 11, num_tokens=211)
    assert sorted(build_reducers(merge_cfg("lotm", lotm_k=48), 11, num_tokens=211)) == [3, 6, 10]
