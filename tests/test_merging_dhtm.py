"""DHTM: neighbourhoods on a small grid worked by hand, the vectorised rounds against a sequential
reference of Algorithm 1 (ROUNDS = K), the merge arithmetic, batch invariance and one compiled graph."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import tiny_cfg

from reid_lite import build_model
from reid_lite.merging import TokenState, get_method, merge_cfg
from reid_lite.merging.dhtm import DHTM, forest_roots, grid_neighbours
from reid_lite.merging.ops import grid_positions


def test_neighbours_on_a_3x3_grid_are_the_8_neighbourhood():
    pos = grid_positions((3, 3))[:, 1:]
    adj = grid_neighbours(pos, torch.ones(1, 9), (3, 3))[0]
    assert adj.sum(1).tolist() == [3, 5, 3, 5, 8, 5, 3, 5, 3]  # corners, edges, centre
    assert adj[0].nonzero().flatten().tolist() == [1, 3, 4]
    assert torch.equal(adj, adj.T)


def test_neighbours_of_a_merged_run_are_its_region_neighbours():
    # 2x4 grid; patches 0 and 1 (row 0, columns 0-1) form one token of size 2 in slot 0, slot 1 empty
    pos = grid_positions((2, 4))[:, 1:].clone()
    pos[0, 0] = (pos[0, 0] + pos[0, 1]) / 2
    size = torch.tensor([[2.0, 0, 1, 1, 1, 1, 1, 1]])
    adj = grid_neighbours(pos, size, (2, 4))[0]
    # region {(0,0),(0,1)} touches (0,2), (1,0), (1,1), (1,2); not (0,3) or (1,3); the empty slot none
    assert adj[0].nonzero().flatten().tolist() == [2, 4, 5, 6]
    assert not adj[1].any() and not adj[:, 1].any()


def test_forest_roots_by_pointer_jumping():
    parent = torch.tensor([[1, 2, 2, 2, 3, 5, 5, 6]])  # a chain 0->1->2, 3->2, 4->3->2; 7->6->5
    assert forest_roots(parent).tolist() == [[2, 2, 2, 2, 2, 5, 5, 5]]


def _sequential_dhtm(x: torch.Tensor, k: int, grid: tuple[int, int]) -> list[tuple[frozenset, torch.Tensor]]:
    """Algorithm 1 literally, one image: k times merge the globally most similar adjacent pair (same
    adjacency rule), size-weighted. Returns (patches held, feature) per token."""
    pos = grid_positions(grid)[0, 1:]
    tokens = [(frozenset([i]), x[1 + i].double(), pos[i].double()) for i in range(x.shape[0] - 1)]
    for _ in range(k):
        best, pair = -2.0, None
        for i, j in itertools.combinations(range(len(tokens)), 2):
            (si, fi, pi), (sj, fj, pj) = tokens[i], tokens[j]
            p = torch.stack([pi, pj]).float()[None]
            if not grid_neighbours(p, torch.tensor([[len(si), len(sj)]]).float(), grid)[0, 0, 1]:
                continue
            cos = float(torch.nn.functional.cosine_similarity(fi, fj, dim=0))
            if cos > best:
                best, pair = cos, (i, j)
        i, j = pair
        (si, fi, pi), (sj, fj, pj) = tokens[i], tokens[j]
        ni, nj = len(si), len(sj)
        merged = (si | sj, (ni * fi + nj * fj) / (ni + nj), (ni * pi + nj * pj) / (ni + nj))
        tokens = [t for n, t in enumerate(tokens) if n not in (i, j)] + [merged]
    return [(s, f) for s, f, _ in tokens]


def test_rounds_equal_to_k_reproduce_the_sequential_algorithm():
    g = torch.Generator().manual_seed(3)
    grid, k = (4, 5), 8
    x = torch.randn(2, 21, 6, generator=g)
    state = TokenState(grid=grid, trace_source=True, track_pos=True)
    out = DHTM(k, rounds=k)(x, None, None, state)
    assert out.shape == (2, 21 - k, 6)
    for b in range(2):
        got = {frozenset(state.source[b, t].nonzero().flatten().tolist()): out[b, t] for t in range(1, out.shape[1])}
        want = dict(_sequential_dhtm(x[b], k, grid))
        assert set(got) == set(want)
        for patches, feat in want.items():
            torch.testing.assert_close(got[patches], feat.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rounds,weighting", [(1, "size"), (3, "size"), (3, "mean")])
def test_merge_arithmetic(rounds, weighting):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 211, 16, generator=g)
    state = TokenState(grid=(21, 10), trace_source=True, track_pos=True)
    out = DHTM(48, rounds, weighting)(x, None, None, state)
    assert out.shape == (3, 211 - 48, 16) and (state.size > 0).all()
    assert torch.equal(state.source.sum(1), torch.ones(3, 210))  # every patch held by exactly one token
    assert torch.equal(state.source.sum(-1)[:, 1:], state.size[:, 1:, 0])  # sizes add
    assert torch.equal(out[:, 0], x[:, 0])  # the class token never merges
    # slots stay in raster order: each token's first patch increases along the sequence
    first = state.source[:, 1:].argmax(-1)
    assert (first[:, 1:] > first[:, :-1]).all()
    # with size weighting a token is the mean of its patches' input tokens
    if weighting == "size":
        mean = state.source[:, 1:] @ x[:, 1:] / state.size[:, 1:]
        torch.testing.assert_close(out[:, 1:], mean, rtol=1e-4, atol=1e-5)


def test_defaults_model_batch_invariance_and_one_graph():
    reducers = get_method("dhtm").build(merge_cfg("dhtm"), 11, None)
    assert sorted(reducers) == [3, 6, 10] and {(r.k, r.rounds) for r in reducers.values()} == {(48, 4)}
    with pytest.raises(ValueError, match="ROUNDS"):
        get_method("dhtm").build(merge_cfg("dhtm", dhtm_rounds=0), 11, None)
    torch.manual_seed(0)
    model = build_model(tiny_cfg(METHOD="dhtm", DHTM__LAYERS=[1, 3], DHTM__K=30), 10, 3, 1).eval()
    g = torch.Generator().manual_seed(0)
    images, cams = torch.randn(3, 3, 256, 128, generator=g), torch.tensor([0, 1, 2])
    with torch.no_grad():
        batch = model(images, cam_label=cams)
        alone = torch.cat([model(images[i:i + 1], cam_label=cams[i:i + 1]) for i in range(3)])
        torch.testing.assert_close(alone, batch, rtol=1e-5, atol=1e-5)
        explained = torch._dynamo.explain(model)(images[:2], cam_label=cams[:2])
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_k_beyond_what_a_block_can_merge_is_an_error():
    from reid_lite.merging import build_reducers

    with pytest.raises(ValueError, match="MERGE.DHTM.K 106 is too large: block 4 receives 211 tokens.*at most 105"):
        build_reducers(merge_cfg("dhtm", dhtm_k=106), 11, num_tokens=211)
