"""ATM: Eq. 1's threshold schedule, the size-distinctive split and merging error, the merge itself on a
hand-made case, per-image batch invariance, one compiled graph, and the class-token-only last block."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_cfg

from reid_lite import build_model
from reid_lite.compress.flops import effective_gflops, transreid_gflops
from reid_lite.merging import TokenState, get_method, merge_cfg
from reid_lite.merging.atm import ATM, ClsOnly, atm_threshold, merging_error, size_distinctive_split


def test_threshold_schedule_worked_by_hand():
    # (alpha, beta, theta_min) = (0.99, 0.04, 0.88): 0.99, 0.99 - (e^0.04 - 1), 0.99 - (e^0.08 - 1), then the floor
    got = [atm_threshold(layer, 0.99, 0.04, 0.88) for layer in range(1, 13)]
    assert got[:3] == pytest.approx([0.99, 0.949189, 0.906713], abs=1e-6)
    assert got[3:] == [0.88] * 9
    # (1, 0.025, 0.89): the floor from block 6 on; block 1 merges nothing (cosine never exceeds 1)
    got = [atm_threshold(layer, 1.0, 0.025, 0.89) for layer in range(1, 8)]
    assert got == pytest.approx([1.0, 0.974684, 0.948729, 0.922116, 0.894829, 0.89, 0.89], abs=1e-6)


def test_builder_places_thresholds_and_the_split_depth():
    merge = merge_cfg("atm", atm_alpha=0.99, atm_beta=0.04, atm_theta_min=0.88, atm_split_depth=2)
    reducers = get_method("atm").build(merge, 4, None)
    assert sorted(reducers) == [0, 1, 2, 3] and isinstance(reducers[3], ClsOnly)
    assert [reducers[i].theta for i in range(3)] == pytest.approx([0.99, 0.949189, 0.906713], abs=1e-6)
    assert [reducers[i].size_split for i in range(3)] == [False, False, True]
    assert reducers[3].fallback.size_split and reducers[3].fallback.theta == 0.88
    with pytest.raises(ValueError, match="MERGE.ATM.MODE"):
        get_method("atm").build(merge_cfg("atm", atm_mode="sometimes"), 4, None)


def test_size_distinctive_split_worked_by_hand():
    # class token, then patches p0..p6 with sizes 3 1 2 1 5 1 4 (sequence positions 1..7)
    size = torch.tensor([[1.0, 3, 1, 2, 1, 5, 1, 4]])
    a, b = size_distinctive_split(size)
    # ascending (ties by position): p1 p3 p5 | p2 p0 p6 p4; the smaller half floor(7/2) = 3 are sources
    assert a.tolist() == [[0, 2, 4, 6]] and b.tolist() == [[3, 1, 7, 5]]
    # p1 empty (size 0): the 6 valid split 3/3 (p3 p5 p2 | p0 p6 p4), the empty slot fills A's spare place
    size = torch.tensor([[1.0, 3, 0, 2, 1, 5, 1, 4]])
    a, b = size_distinctive_split(size, size > 0)
    assert a.tolist() == [[0, 4, 6, 3]] and b.tolist() == [[2, 1, 7, 5]]


def test_merging_error_closed_form_and_theorem_bounds():
    g = torch.Generator().manual_seed(0)
    xi, xj = torch.randn(2, 50, 8, generator=g).unbind(0)
    xi, xj = xi / xi.norm(dim=-1, keepdim=True), xj / xj.norm(dim=-1, keepdim=True)
    ni, nj = torch.randint(1, 100, (2, 50), generator=g).float().unbind(0)
    merged = (ni[:, None] * xi + nj[:, None] * xj) / (ni + nj)[:, None]

    def delta(u, v):
        return 1 - torch.cosine_similarity(u, v, dim=-1)

    definition = ni * delta(xi, merged) + nj * delta(xj, merged)  # Definition 2
    closed = merging_error(ni, nj, torch.cosine_similarity(xi, xj, dim=-1))
    torch.testing.assert_close(closed, definition, rtol=1e-4, atol=1e-5)
    bound = ni * nj / (ni + nj) * delta(xi, xj)
    assert (closed >= bound - 1e-5).all() and (closed <= 2 * bound + 1e-5).all()
    # Examples 1 and 3: at equal similarity two tokens of 100 cost 100 times what two tokens of 1 do
    one = merging_error(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(0.9))
    big = merging_error(torch.tensor(100.0), torch.tensor(100.0), torch.tensor(0.9))
    assert float(big / one) == pytest.approx(100.0, rel=1e-4)


def _hand_case():
    """Two images of 1 + 6 tokens; one head of unit keys at these angles (radians)."""
    angles = torch.tensor([
        [0.0, 0.0, 0.1, 1.5, 1.8, 3.0, -1.5],  # 2 -> 1 (cos 0.995), 4 -> 3 (cos 0.955)
        [0.0, 0.0, 0.1, 1.5, 2.1, 3.0, -1.5],  # 2 -> 1 only: 4's best partner is 3 at cos 0.825
    ])
    keys = torch.stack([angles.cos(), angles.sin()], dim=-1)[:, None]  # (2, 1, 7, 2)
    x = torch.arange(2 * 7 * 3, dtype=torch.float32).reshape(2, 7, 3)
    return x, keys


def test_per_image_merge_worked_by_hand():
    x, keys = _hand_case()
    state = TokenState(grid=(2, 3), trace_source=True)
    out = ATM(0.9)(x, keys, None, state)
    # Merged, the sequence is the A slots (positions 0 2 4 6), then the B slots (1 3 5), with the merged A
    # slots empty: sizes [1, 0, 0, 1, 2, 2, 1] and [1, 0, 1, 1, 2, 1, 1]. Each image's valid tokens then move to
    # the front in that order (ToMe's order, the paper's at batch size 1), and the sequence is cut to the
    # fullest image's 6 tokens: image 0 keeps one empty slot at the end.
    assert state.size[..., 0].tolist() == [[1, 1, 2, 2, 1, 0], [1, 1, 1, 2, 1, 1]]
    assert state.may_empty and state.valid().sum(1).tolist() == [5, 6]
    torch.testing.assert_close(out[0, 2], (x[0, 1] + x[0, 2]) / 2)
    torch.testing.assert_close(out[0, 3], (x[0, 3] + x[0, 4]) / 2)
    torch.testing.assert_close(out[1, 4], x[1, 3])  # nothing merged into it: unchanged
    torch.testing.assert_close(out[1, 1], x[1, 4])
    assert out[0, 5].abs().sum() == 0
    # every patch is held by exactly one token, and a token's size is the number of patches it holds
    assert torch.equal(state.source.sum(1), torch.ones(2, 6))
    assert torch.equal(state.source.sum(-1) + (torch.arange(6) == 0), state.size[..., 0])
    # Static shapes (SHRINK off, as when exporting or compiling): the same tokens in the same order, at capacity
    state = TokenState(grid=(2, 3))
    static = ATM(0.9, shrink=False)(x, keys, None, state)
    assert static.shape[1] == 7 and state.size[..., 0].tolist() == [[1, 1, 2, 2, 1, 0, 0], [1, 1, 1, 2, 1, 1, 0]]
    assert torch.equal(static[:, :6], out)
    # the paper's batch mode: round(mean(2, 1)) = 2 pairs in both images, threshold or not
    state = TokenState(grid=(2, 3))
    ATM(0.9, mode="batch")(x, keys, None, state)
    assert state.valid().sum(1).tolist() == [5, 5]
    # MIN_R: each image merges at least 2 pairs, and the top 2 leave the sequence (capacity 7 - 2)
    state = TokenState(grid=(2, 3))
    out = ATM(0.99, min_r=2)(x, keys, None, state)
    assert out.shape[1] == 5 and state.size[..., 0].sum(1).tolist() == [7, 7] and state.valid().all()


def _model(jpm=True, **atm):
    opts = {f"ATM__{k.upper()}": v for k, v in atm.items()}
    torch.manual_seed(0)
    return build_model(tiny_cfg(jpm=jpm, METHOD="atm", **opts), 10, 3, 1).eval()


def _features(model, images, cams):
    with torch.no_grad():
        return model(images, cam_label=cams)


# thresholds low enough that random weights merge a different number of tokens in every image
LOW = dict(alpha=0.9, beta=0.3, theta_min=0.3, split_depth=1)


@pytest.mark.parametrize("jpm", [True, False])
def test_per_image_features_are_batch_invariant(images, cams, jpm):
    model = _model(jpm, **LOW)
    model.count_tokens = True
    batch = _features(model, images, cams)
    model.count_tokens = False
    valid = model.last_state.counts[-2 if not jpm else -1]
    assert len(set(valid.tolist())) > 1  # the images really merge different numbers of tokens
    alone = torch.cat([_features(model, images[i:i + 1], cams[i:i + 1]) for i in range(len(images))])
    torch.testing.assert_close(alone, batch, rtol=1e-5, atol=1e-5)
    perm = torch.tensor([4, 2, 0])
    torch.testing.assert_close(_features(model, images[perm], cams[perm]), batch[perm], rtol=1e-5, atol=1e-5)
    effective, _ = effective_gflops(model, images, cam_label=cams)
    assert effective < transreid_gflops(model)


def test_per_image_mode_compiles_to_one_graph(images, cams):
    model = _model(True, **LOW)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(images[:2], cam_label=cams[:2])
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_batch_mode_merges_the_same_count_in_every_image(images, cams):
    model = _model(True, mode="batch", **LOW)
    model.count_tokens = True
    _features(model, images, cams)
    counts = torch.stack(model.last_state.counts, dim=1)
    assert (counts == counts[:1]).all() and counts[0, -1] < 211


def test_cls_only_last_block_only_without_jpm(images, cams):
    assert not any(isinstance(r, ClsOnly) for r in _model(True).reducers.values())  # never in front of JPM
    plain = _model(False, cls_only_last=False, **LOW)
    cls_only = _model(False, cls_only_last=True, **LOW)
    assert isinstance(cls_only.reducers[3], ClsOnly) and not isinstance(plain.reducers[3], ClsOnly)
    # The head reads the class token alone, and the last MLP is per token: the feature is the same.
    torch.testing.assert_close(_features(cls_only, images, cams), _features(plain, images, cams),
                               rtol=1e-5, atol=1e-5)
    assert transreid_gflops(cls_only) < transreid_gflops(plain)


def test_min_r_shrinks_the_capacity():
    model = _model(True, min_r=5, **LOW)
    full = _model(True, **LOW)
    assert [r.num_out(211) for r in model.reducers.values()][0] == 206
    assert transreid_gflops(model) < transreid_gflops(full)
    assert math.isclose(atm_threshold(1, 0.9, 0.3, 0.3), 0.9)


# Thresholds 1.3, 1.2 (size split from block 2 on), then 1.07, 0.93, ...: blocks 1-3 cannot merge, later ones do.
SKIPPING = dict(alpha=1.2, beta=0.1, theta_min=0.3, split_depth=1, offset=0.1)


@pytest.mark.parametrize("trace", [False, True])
def test_blocks_that_cannot_merge_skip_the_matching_with_the_same_features(images, cams, trace):
    """A threshold above every cosine (the early blocks under a positive OFFSET, as a GFLOPs budget solves it)
    merges nothing in any image: those blocks only put the tokens in the split's order, with no matching and no
    host read, and the features and source maps equal the full path's bit for bit."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(depth=6, METHOD="atm", **{f"ATM__{k.upper()}": v for k, v in SKIPPING.items()}),
                        10, 3, 1).eval()
    model.trace_source = trace
    assert [r.merges_nothing for r in model.reducers.values()] == [True, True, True, False, False]
    fast = _features(model, images, cams)
    fast_source = model.last_state.source if trace else None
    for reducer in model.reducers.values():
        reducer.merges_nothing = False
    full = _features(model, images, cams)
    assert torch.equal(fast, full)
    assert not trace or torch.equal(fast_source, model.last_state.source)
    model.count_tokens = True
    _features(model, images, cams)
    assert model.last_state.counts[-1].min() < 211  # the later blocks do merge


@pytest.mark.parametrize("jpm,min_r,skipping", [(True, 0, False), (False, 0, False), (True, 5, False), (True, 0, True)])
def test_analytic_flops_agree_with_fvcore(jpm, min_r, skipping):
    """Capacity-based: the matching runs in every block even where no slot leaves the sequence, except in the
    blocks whose threshold no cosine reaches (they skip it)."""
    from reid_lite.compress.flops import fvcore_gflops

    model = _model(jpm, min_r=min_r, **(SKIPPING if skipping else {}))
    assert any(getattr(r, "merges_nothing", False) for r in model.reducers.values()) == skipping
    assert transreid_gflops(model) == pytest.approx(fvcore_gflops(model), rel=1e-9)


def test_merging_every_source_in_twelve_blocks_leaves_jpm_a_valid_input(cams):
    """Cut to the batch's valid tokens, an ATM that merges every source halves the sequence per block, down to
    the class token and one patch before JPM: its parts then get one empty slot each, not a zero length."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(depth=12, METHOD="atm", ATM__OFFSET=-3.0), 10, 3, 0).eval()
    images = torch.randn(3, 3, 256, 128)
    model.count_tokens = True
    with torch.no_grad():
        out = model(images, cam_label=cams[:3])
    assert out.shape == (3, model.feature_dim) and torch.isfinite(out).all()
    assert model.last_state.counts[-1].tolist() == [2, 2, 2]
