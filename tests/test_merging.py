"""Token reduction: STM-ReID against its specification, ToMe, EViT, schedules and FLOPs."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from conftest import tiny_cfg, vit_base_cfg

from reid_lite import build_model
from reid_lite.compress.flops import fvcore_gflops, transreid_gflops
from reid_lite.merging import STM, EViT, TokenState, ToMe, apply_merging, merge_cfg
from reid_lite.merging.base import BipartiteMerge, bipartite_match, put_tokens_, take_tokens
from reid_lite.merging.diagnostics import record_merges
from reid_lite.merging.ops import grid_positions, virtual_coordinates, virtual_knn, virtual_neighbourhood
from reid_lite.merging.stm import gaussian_prior, neighbourhood_entropy, pr_degree, pr_grouping, prn_fuse


def _model(method="none", r=8, **merge):
    torch.manual_seed(0)
    return build_model(tiny_cfg(METHOD=method, R=r, **merge), 10, 3, 1).eval()


def _features(model, images, cams):
    with torch.no_grad():
        return model(images, cam_label=cams)


@pytest.mark.parametrize("method", ["tome", "stm"])
def test_r0_is_bit_identical_to_the_unmerged_model(method, images, cams):
    assert torch.equal(_features(_model(method, 0), images, cams), _features(_model(), images, cams))


@pytest.mark.parametrize("method", ["tome", "stm", "evit"])
def test_merging_changes_tokens_but_not_the_cls_and_is_batch_independent(method, images, cams):
    model = _model(method, 8, EVIT__LAYERS=[1, 2])
    batch = _features(model, images, cams)
    alone = torch.cat([_features(model, images[i:i + 1], cams[i:i + 1]) for i in range(len(images))])
    torch.testing.assert_close(alone, batch, rtol=1e-5, atol=1e-5)
    assert not torch.equal(batch, _features(_model(), images, cams))


@pytest.mark.parametrize("reducer", [ToMe(8), STM(8), STM(8, coords="tracked", entropy="normalized"), EViT(0.7)])
def test_sizes_sum_to_the_patch_count_and_cls_is_kept(reducer):
    g = torch.Generator().manual_seed(3)
    B, T, C, H = 3, 1 + 210, 32, 4
    x = torch.randn(B, T, C, generator=g)
    state = TokenState(grid=(21, 10), trace_source=True, track_pos=reducer.needs_pos)
    for _ in range(4):  # several blocks in a row
        T = x.shape[1]
        keys = torch.randn(B, H, T, C // H, generator=g)
        cls_attn = torch.randn(B, H, T, generator=g).softmax(-1)
        out = reducer(x, keys, cls_attn, state)
        assert out.shape[1] == reducer.num_out(T) < T
        assert torch.equal(out[:, 0], x[:, 0])  # the class token is never merged and stays first
        assert state.size[:, 0].eq(1).all() and state.source[:, 0].eq(0).all()
        torch.testing.assert_close(state.size.sum(dim=(1, 2)), torch.full((B,), 211.0))
        # every patch is held by exactly one token
        assert torch.equal(state.source.sum(dim=1), torch.ones(B, 210))
        torch.testing.assert_close(state.size[..., 0], state.source.sum(-1) + (torch.arange(out.shape[1]) == 0))
        x = out


def test_tracked_positions_are_size_weighted_centroids():
    g = torch.Generator().manual_seed(4)
    B, T, C, H = 2, 211, 16, 2
    x = torch.randn(B, T, C, generator=g)
    state = TokenState(grid=(21, 10), track_pos=True, trace_source=True)
    reducer = STM(20, coords="tracked")
    for _ in range(3):
        T = x.shape[1]
        x = reducer(x, torch.randn(B, H, T, C // H, generator=g), torch.rand(B, H, T, generator=g).softmax(-1), state)
    cells = grid_positions((21, 10))[0, 1:]
    expect = (state.source @ cells) / state.source.sum(-1, keepdim=True)
    torch.testing.assert_close(state.pos[:, 1:], expect[:, 1:])


def test_virtual_coordinates_and_neighbourhood():
    c = virtual_coordinates(5)  # Hv = 3, Wv = 2
    torch.testing.assert_close(c, torch.tensor([[1 / 6, .25], [1 / 6, .75], [.5, .25], [.5, .75], [5 / 6, .25]]))
    _, nbr = virtual_neighbourhood(210, 9, torch.device("cpu"))
    assert nbr.shape == (210, 9) and torch.equal(nbr[:, 0], torch.arange(210))  # itself first
    # 210 tokens: Hv = 15, Wv = 14; an interior token's neighbours are its 3x3 block
    i = 3 * 14 + 5
    assert sorted(nbr[i].tolist()) == sorted(i + dr * 14 + dc for dr in (-1, 0, 1) for dc in (-1, 0, 1))
    assert virtual_neighbourhood(210, 9, torch.device("cpu"))[1] is nbr  # cached


def test_pr_degree_on_a_hand_worked_case():
    # 5 patch tokens, 2 heads, neighbourhoods of k = 3 on the virtual 3x2 grid.
    attn = torch.tensor([[[0.10, 0.30, 0.05, 0.15, 0.20], [0.25, 0.05, 0.20, 0.10, 0.15]]])
    coords = virtual_coordinates(5)
    pts = coords.tolist()
    exact = [(Fraction(2 * (i // 2) + 1, 6), Fraction(2 * (i % 2) + 1, 4)) for i in range(5)]
    nbrs = []
    for i in range(5):  # k nearest by Euclidean distance, ties by index (exact arithmetic)
        d = [(exact[i][0] - exact[j][0]) ** 2 + (exact[i][1] - exact[j][1]) ** 2 for j in range(5)]
        nbrs.append(sorted(range(5), key=lambda j: (d[j], j))[:3])
    sigma = 0.1 * math.sqrt(5)
    expect = []
    for i in range(5):
        w = math.exp(-((pts[i][0] - .5) ** 2 + (pts[i][1] - .5) ** 2) / (2 * sigma ** 2))
        ent = [-sum(attn[0, h, j].item() * math.log(attn[0, h, j].item()) for j in nbrs[i]) for h in range(2)]
        rw = [math.exp(-e) / sum(math.exp(-f) for f in ent) for e in ent]
        expect.append(w * sum(rw[h] * attn[0, h, i].item() for h in range(2)))
    nbr = virtual_knn(5, 3)
    assert nbr.tolist() == nbrs
    got = pr_degree(attn, neighbourhood_entropy(attn, nbr), gaussian_prior(coords, 5, 0.1))
    torch.testing.assert_close(got[0], torch.tensor(expect), rtol=1e-6, atol=1e-8)
    # Grouping: patches by S descending; A = [cls, p1, p3, ...], B = [p2, p4, ...] (sequence positions).
    order = sorted(range(5), key=lambda i: -expect[i])
    a_idx, b_idx = pr_grouping(got)
    assert a_idx[0].tolist() == [0] + [1 + order[0], 1 + order[2], 1 + order[4]]
    assert b_idx[0].tolist() == [1 + order[1], 1 + order[3]]


def test_normalised_entropy_is_the_entropy_of_the_renormalised_neighbourhood():
    attn = torch.rand(2, 3, 12).softmax(-1)
    _, nbr = virtual_neighbourhood(12, 4, torch.device("cpu"))
    got = neighbourhood_entropy(attn, nbr, normalized=True)
    p = attn[..., nbr]  # (2, 3, 12, 4)
    p = p / p.sum(-1, keepdim=True)
    torch.testing.assert_close(got, -(p * p.log()).sum(-1))


def test_put_tokens_writes_and_adds_rows_as_scatter_does():
    # Row writes of the fusion: several sources may go into one row (they add, in source order).
    g = torch.Generator().manual_seed(3)
    t = torch.randn(3, 7, 5, generator=g)
    idx = torch.tensor([[1, 4, 1], [0, 0, 6], [2, 3, 5]])
    values = torch.randn(3, 3, 5, generator=g)
    index = idx[..., None].expand(-1, -1, 5)
    assert torch.equal(put_tokens_(t.clone(), idx, values, accumulate=True), t.scatter_add(1, index, values))
    unique = torch.tensor([[1, 4, 2], [0, 5, 6], [2, 3, 5]])
    got = put_tokens_(t.clone(), unique, values)
    assert torch.equal(got, t.scatter(1, unique[..., None].expand(-1, -1, 5), values))
    assert torch.equal(take_tokens(got, unique), values)


def test_prn_fuse_keeps_the_largest_norm_and_leaves_the_others_alone():
    g = torch.Generator().manual_seed(5)
    B, T, C = 2, 11, 8
    x = torch.randn(B, T, C, generator=g) * torch.rand(B, T, 1, generator=g) * 5
    score = torch.rand(B, T, generator=g) + 0.1
    scores = torch.randn(B, 6, 5, generator=g)
    merge = BipartiteMerge.from_match(*bipartite_match(scores, 3))
    state = TokenState(grid=(2, 5))
    state.init(x)
    out = prn_fuse(merge, x, score, state)
    norms = x.norm(dim=-1)
    n_unm = merge.unm_pos.shape[1]
    for i in range(B):
        assert torch.equal(out[i, :n_unm], x[i, merge.unm_pos[i]])
        for j in range(5):  # B token j sits at sequence position 2j + 1; its group adds the sources merged into it
            srcs = merge.src_pos[i][merge.dst_idx[i] == j]
            got = out[i, n_unm + j]
            if len(srcs) == 0:
                assert torch.equal(got, x[i, 2 * j + 1])
                continue
            members = torch.cat([torch.tensor([2 * j + 1]), srcs])
            torch.testing.assert_close(got.norm(), norms[i, members].max())
            mean = (x[i, members] * score[i, members, None]).sum(0) / score[i, members].sum()
            torch.testing.assert_close(got / got.norm(), mean / mean.norm())
            assert state.size[i, n_unm + j, 0] == len(members)


def test_stm_with_every_component_off_is_exactly_tome(images, cams):
    tome = _features(_model("tome", 8), images, cams)
    stm = _features(_model("stm", 8, STM__DSE=False, STM__CCF=False, STM__PRN=False, STM__KEYS="mean"), images, cams)
    assert torch.equal(tome, stm)


def test_recording_merges_changes_nothing_and_describes_each_block(images, cams):
    model = _model("stm", 8)
    before = _features(model, images, cams)
    stats = record_merges(model, [(images, cams)])
    assert torch.equal(_features(model, images, cams), before)  # outputs as before; the recorder is gone again
    assert list(stats) == [i + 1 for i in sorted(model.reducers)]
    for s in stats.values():
        assert s["tokens_in"] - s["tokens_out"] == 8
        assert 0 < s["merged_fraction"] <= 1 and -1 <= s["key_cosine"] <= 1 and s["distance"] > 0
        assert s["attention_ratio"] > 0 and s["pr_decades"] >= 0


def test_a_heavier_response_term_merges_tokens_the_class_token_attends_less(images, cams):
    # What the reference investigation measures: CCF-Match's response factor (delta2) steers merges towards
    # low-PR-Degree tokens, away from the most similar pairs.
    light = record_merges(_model("stm", 8, STM__DELTA2=0.0), [(images, cams)])
    heavy = record_merges(_model("stm", 8, STM__DELTA2=5.0), [(images, cams)])
    for block in light:
        assert heavy[block]["attention_ratio"] < light[block]["attention_ratio"]
        assert heavy[block]["spread_log_fres"] > heavy[block]["spread_log_fsim"]
        assert light[block]["spread_log_fres"] == 0


def test_ablation_switches_each_change_the_result(images, cams):
    feats = [
        _features(_model("stm", 8, STM__DSE=dse, STM__CCF=ccf, STM__PRN=prn), images, cams)
        for dse, ccf, prn in [(True, False, False), (True, True, False), (True, True, True)]
    ]
    assert not torch.equal(feats[0], feats[1]) and not torch.equal(feats[1], feats[2])
    for variant in [{"STM__COORDS": "tracked"}, {"STM__ENTROPY": "normalized"}]:
        assert not torch.equal(_features(_model("stm", 8, **variant), images, cams), feats[2])


def test_bf16_autocast_runs(images, cams):
    model = _model("stm", 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, cam_label=cams)
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), _features(model, images, cams), rtol=0.1, atol=0.1)


def test_bad_schedules_are_rejected():
    with pytest.raises(ValueError, match="MERGE.LAYERS"):
        build_model(tiny_cfg(METHOD="stm", LAYERS=[1, 4]), 10, 3, 1)  # block 4 belongs to the JPM branches
    with pytest.raises(ValueError, match="R_LIST"):
        build_model(tiny_cfg(METHOD="tome", LAYERS=[1, 2], R_LIST=[4]), 10, 3, 1)
    with pytest.raises(ValueError, match="unknown MERGE.METHOD"):
        build_model(tiny_cfg(METHOD="magic"), 10, 3, 1)
    with pytest.raises(ValueError, match="COORDS"):
        build_model(tiny_cfg(METHOD="stm", STM__COORDS="polar"), 10, 3, 1)


def test_r_larger_than_a_block_allows_names_the_largest_allowed_r():
    # 211 tokens into blocks 1-3: with r = 60, block 3 receives 211 - 120 = 91 and can merge at most 45.
    for method in ("tome", "stm"):
        with pytest.raises(ValueError, match=r"^MERGE.R 60 is too large: block 3 receives 91 tokens \(the class "
                                             r"token and 90 patches\) and can merge at most 45; the largest r for "
                                             r"MERGE.LAYERS \[1, 2, 3\] is 52$"):
            _model(method, 60)
    # 52 is the largest that runs as configured: every block merges exactly 52 (nothing silently clamped).
    from reid_lite.merging import reduction_schedule

    model = _model("tome", 52)
    assert reduction_schedule(model.reducers, 211, 3) == [
        {"block": 1, "tokens_in": 211, "tokens_out": 159}, {"block": 2, "tokens_in": 159, "tokens_out": 107},
        {"block": 3, "tokens_in": 107, "tokens_out": 55}]
    with pytest.raises(ValueError, match=r"^MERGE.R_LIST asks block 2 to merge 90 tokens, but block 2 receives "
                                         r"111 tokens .* at most 55$"):
        _model("stm", 0, LAYERS=[1, 2], R_LIST=[100, 90])
    # the GFLOPs solver searches only schedules that run as stated
    solved = _model("tome", 0, TARGET_GFLOPS=1e-6 + transreid_gflops(_model("tome", 52)))
    assert solved.merge_r == 52


def test_per_layer_schedule_and_gflops_solver():
    model = _model("stm", 0, LAYERS=[1, 2, 3], R_LIST=[4, 8, 16])
    assert {i: r.r for i, r in model.reducers.items()} == {0: 4, 1: 8, 2: 16}
    base = transreid_gflops(_model())
    target = 0.85 * base
    solved = _model("stm", 0, TARGET_GFLOPS=target)
    r = solved.merge_r
    assert transreid_gflops(solved) <= target
    assert transreid_gflops(build_model(tiny_cfg(METHOD="stm", R=r - 1), 10, 3, 1)) > target


def test_timm_deit_with_merging():
    import timm

    torch.manual_seed(0)
    deit = timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=4, num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = deit(x)
        apply_merging(deit, merge_cfg("tome", 0, layers=[1, 2, 3, 4]))
        assert torch.equal(deit(x), ref) or torch.allclose(deit(x), ref, atol=1e-6)
        for method in ("tome", "stm", "evit"):
            apply_merging(deit, merge_cfg(method, 8, layers=[1, 2, 3], evit_layers=[2]))
            out = deit(x)
            assert out.shape == (2, 7) and torch.isfinite(out).all() and not torch.allclose(out, ref)
        assert deit._merge_state is None  # nothing left over between calls


def test_paper_gflops_for_the_vit_base_model():
    """fvcore on our ViT-B TransReID against the paper's Tables 1-2; analytic within 0.5% of fvcore."""
    expected = {("tome", 8): (15.53, 0.01), ("stm", 8): (15.53, 0.01), ("tome", 6): (16.69, 0.01),
                ("stm", 17): (10.31, 0.03), ("evit", 0): (17.50, 0.01)}
    for (method, r), (paper, tol) in expected.items():
        model = build_model(vit_base_cfg(**{"MERGE.METHOD": method, "MERGE.R": r}), 1000, 15, 1).eval()
        fv = fvcore_gflops(model)
        assert fv == pytest.approx(paper, rel=tol), (method, r, fv)
        assert transreid_gflops(model) == pytest.approx(fv, rel=0.005)


@pytest.mark.parametrize("method", ["tome", "stm", "evit"])
def test_forward_is_one_graph_for_torch_compile(method, images, cams):
    """Static shapes and no data-dependent Python control flow: dynamo captures one graph, no breaks."""
    model = _model(method, 8, EVIT__LAYERS=[1, 2])
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(images[:2], cam_label=cams[:2])
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_source_map_picture(images):
    from reid_lite.merging.visualize import render_groups, token_groups

    model = _model("stm", 8)
    groups = token_groups(model, images[0], cam=1, block=2)  # reductions in blocks 1 and 2 only
    assert groups.shape == (210,) and len(set(groups.tolist())) == 211 - 2 * 8 - 1
    assert model.reducers.keys() == {0, 1, 2} and not model.trace_source  # the model is restored
    img = (torch.rand(256, 128, 3) * 255).byte().numpy()
    pic = render_groups(img, groups, (21, 10), 16, 12)
    assert pic.shape == (256, 128, 3) and pic.dtype == img.dtype
    # a token's pixels share one colour (its patches' mean) apart from the outlines
    assert len({tuple(c) for c in pic.reshape(-1, 3)}) <= 211 - 16 + 1
