"""reid_lite.metrics.rank against torchreid's Python evaluator (bit-exact CMC and mAP)."""

from __future__ import annotations

import numpy as np
import pytest
from extras import torchreid_evaluate_rank

from reid_lite.metrics.rank import RankAccumulator, _numpy_sum_of_sparse_rows, evaluate_rank


def _reference_minp(distmat, q_pids, g_pids, q_camids, g_camids) -> float:
    """mINP as in the AGW eval_func (Ye et al.), a plain per-query loop."""
    indices = np.argsort(distmat, axis=1)
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
    all_inp = []
    for q_idx in range(distmat.shape[0]):
        order = indices[q_idx]
        remove = (g_pids[order] == q_pids[q_idx]) & (g_camids[order] == q_camids[q_idx])
        raw_cmc = matches[q_idx][np.invert(remove)]
        if not np.any(raw_cmc):
            continue
        cmc = raw_cmc.cumsum()
        max_pos_idx = np.max(np.where(raw_cmc == 1))
        all_inp.append(cmc[max_pos_idx] / (max_pos_idx + 1.0))
    return float(np.mean(all_inp))


def _random_problem(rng: np.random.Generator, num_q: int, num_g: int, integer: bool, dtype=np.float64):
    num_ids = max(3, num_q // 3)
    q_pids = rng.integers(0, num_ids, num_q)
    # Some query identities are absent from the gallery (ids >= num_ids - 1 only in queries), and with
    # few cameras some queries only have same-camera matches (junk): both make queries invalid.
    g_pids = rng.integers(0, num_ids - 1, num_g)
    q_camids = rng.integers(0, 3, num_q)
    g_camids = rng.integers(0, 3, num_g)
    if integer:  # many exact ties: the tie order of np.argsort matters
        distmat = rng.integers(0, 6, (num_q, num_g)).astype(dtype)
    else:
        distmat = rng.random((num_q, num_g)).astype(dtype)
    return distmat, q_pids, g_pids, q_camids, g_camids


CASES = [
    # (num_q, num_g, integer distances, dtype); max_rank stays below every junk-removed gallery length,
    # otherwise torchreid itself fails on ragged per-query curves.
    (7, 60, True, np.float64),
    (30, 200, True, np.float32),
    (50, 600, False, np.float64),
    (64, 333, False, np.float32),
    (25, 3000, True, np.float32),  # G > 128 * 16: several levels of numpy's pairwise-sum tree
    (40, 1500, True, np.int64),
]


@pytest.mark.parametrize("num_q,num_g,integer,dtype", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_torchreid(num_q: int, num_g: int, integer: bool, dtype, seed: int) -> None:
    tr_eval = torchreid_evaluate_rank()
    rng = np.random.default_rng(seed * 1000 + num_q)
    problem = _random_problem(rng, num_q, num_g, integer, dtype)
    max_rank = min(50, num_g // 3)
    cmc_ref, map_ref = tr_eval(*problem, max_rank=max_rank, use_metric_cuhk03=False, use_cython=False)
    cmc, mAP, mINP = evaluate_rank(*problem, max_rank=max_rank)
    assert cmc.shape == (max_rank,)
    assert cmc.dtype == cmc_ref.dtype == np.float32
    assert np.array_equal(cmc, cmc_ref)
    assert mAP == map_ref  # bit-exact, including numpy's summation order
    assert mINP == pytest.approx(_reference_minp(*problem), abs=1e-15)


def test_some_queries_invalid_are_skipped() -> None:
    rng = np.random.default_rng(5)
    distmat, q_pids, g_pids, q_camids, g_camids = _random_problem(rng, 20, 100, False)
    q_pids[:5] = 10_000  # not in the gallery
    acc = RankAccumulator(g_pids, g_camids)
    acc.update(distmat, q_pids, q_camids)
    res = acc.result()
    assert res.num_queries == 20 and res.num_valid <= 15
    _, map_ref = torchreid_evaluate_rank()(distmat, q_pids, g_pids, q_camids, g_camids, 50, False, False)
    assert res.mAP == map_ref


@pytest.mark.parametrize("chunks", [[1] * 9, [4, 4, 1], [2, 7], [9]])
def test_chunked_equals_one_shot(chunks: list[int]) -> None:
    rng = np.random.default_rng(11)
    distmat, q_pids, g_pids, q_camids, g_camids = _random_problem(rng, 9, 300, True, np.float32)
    one_shot = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids)
    acc = RankAccumulator(g_pids, g_camids, num_threads=1)
    start = 0
    for size in chunks:
        sl = slice(start, start + size)
        acc.update(distmat[sl], q_pids[sl], q_camids[sl])
        start += size
    cmc, mAP, mINP = acc.result().as_tuple()
    assert np.array_equal(cmc, one_shot[0]) and mAP == one_shot[1] and mINP == one_shot[2]


def test_internal_row_blocks_and_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forcing tiny internal row blocks (several threads) must not change anything."""
    import reid_lite.metrics.rank as rank_mod

    rng = np.random.default_rng(3)
    problem = _random_problem(rng, 33, 500, True, np.float32)
    ref = evaluate_rank(*problem)
    monkeypatch.setattr(rank_mod, "_BLOCK_ELEMS", 1500)  # 3 rows per block
    acc = RankAccumulator(problem[2], problem[4], num_threads=2)
    acc.update(problem[0], problem[1], problem[3])
    got = acc.result().as_tuple()
    assert np.array_equal(got[0], ref[0]) and got[1] == ref[1] and got[2] == ref[2]


def test_max_rank_clamped_to_gallery_size() -> None:
    tr_eval = torchreid_evaluate_rank()
    rng = np.random.default_rng(4)
    problem = list(_random_problem(rng, 10, 30, True))
    problem[3][:], problem[4][:] = 0, 1  # no junk: every query keeps all 30 gallery samples
    cmc_ref, map_ref = tr_eval(*problem, max_rank=50, use_metric_cuhk03=False, use_cython=False)
    cmc, mAP, _ = evaluate_rank(*problem, max_rank=50)
    assert cmc.shape == (30,) and np.array_equal(cmc, cmc_ref) and mAP == map_ref


def test_cmc_truncated_to_junk_removed_length_like_torchreid() -> None:
    tr_eval = torchreid_evaluate_rank()
    rng = np.random.default_rng(8)
    distmat = rng.random((1, 20))
    g_pids, g_camids = np.repeat([0, 1], 10), np.tile([0, 1], 10)  # query pid 0 / cam 0: 5 junk
    args = (distmat, np.array([0]), g_pids, np.array([0]), g_camids)
    cmc_ref, map_ref = tr_eval(*args, max_rank=50, use_metric_cuhk03=False, use_cython=False)
    cmc, mAP, _ = evaluate_rank(*args, max_rank=50)
    assert cmc.shape == cmc_ref.shape == (15,) and np.array_equal(cmc, cmc_ref) and mAP == map_ref


def test_no_valid_query_raises() -> None:
    distmat = np.zeros((3, 4))
    with pytest.raises(ValueError):
        evaluate_rank(distmat, np.array([9, 9, 9]), np.arange(4), np.zeros(3), np.zeros(4))
    # Same pid but only in the same camera: junk, hence also invalid.
    with pytest.raises(ValueError):
        evaluate_rank(distmat, np.zeros(3, int), np.zeros(4, int), np.zeros(3), np.zeros(4))


def test_known_values() -> None:
    # One query (pid 1, cam 0). Sorted gallery: [pid1/cam1 hit, pid2, pid1/cam0 junk, pid1/cam2 hit].
    distmat = np.array([[0.1, 0.2, 0.3, 0.4]])
    g_pids, g_cams = np.array([1, 2, 1, 1]), np.array([1, 0, 0, 2])
    cmc, mAP, mINP = evaluate_rank(distmat, np.array([1]), g_pids, np.array([0]), g_cams, max_rank=3)
    # Kept ranking: hit, miss, hit -> AP = (1/1 + 2/3) / 2, INP = 2 / 3.
    assert np.array_equal(cmc, np.ones(3, np.float32))
    assert mAP == pytest.approx((1 + 2 / 3) / 2) and mINP == pytest.approx(2 / 3)


def test_sparse_pairwise_sum_is_numpy_sum() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 5000, 200)
    rows, pos, vals, dense = [], [], [], []
    for r, n in enumerate(lengths):
        k = int(min(n, rng.integers(1, 60)))
        p = np.sort(rng.choice(n, k, replace=False))
        v = rng.random(k) / rng.integers(1, 1000, k)
        row = np.zeros(n)
        row[p] = v
        dense.append(row.sum())
        rows += [r] * k
        pos.append(p)
        vals.append(v)
    got = _numpy_sum_of_sparse_rows(np.array(rows), np.concatenate(pos), np.concatenate(vals), lengths, 200)
    assert np.array_equal(got, np.array(dense))
