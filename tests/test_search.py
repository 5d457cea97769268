"""The faiss wrapper (VectorIndex: exact and IVF-PQ search), chunked evaluate_retrieval, blocked re-ranking."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from extras import torchreid_evaluate_rank

import reid_lite
from reid_lite.index import Gallery, IndexParams, VectorIndex
from reid_lite.index.visualize import rank_gallery
from reid_lite.metrics import evaluate_retrieval, re_ranking


def _normalize(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(rng: np.random.Generator, num_ids: int, n: int, dim: int, noise: float):
    centers = rng.standard_normal((num_ids, dim)).astype(np.float32)
    pids = rng.integers(0, num_ids, n)
    feats = centers[pids] + noise * rng.standard_normal((n, dim)).astype(np.float32)
    return _normalize(feats), pids


# ---------------------------------------------------------------------------- VectorIndex (exact, IVF-PQ)
def test_exact_ip_equals_brute_force() -> None:
    rng = np.random.default_rng(0)
    gallery = _normalize(rng.standard_normal((2000, 48)))
    queries = _normalize(rng.standard_normal((300, 48)))
    index = VectorIndex.exact(48, use_gpu=False)
    assert index.add(gallery[:1200]).tolist() == list(range(1200))
    index.add(torch.from_numpy(gallery[1200:]))  # ids continue across add() calls; tensors accepted
    scores, ids = index.search(queries, k=10)
    sims = queries @ gallery.T
    ref_ids = np.argsort(-sims, axis=1, kind="stable")[:, :10]
    assert ids.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, np.take_along_axis(sims, ref_ids, axis=1), atol=1e-5)


def test_exact_l2_ranks_as_squared_euclidean_and_pads_past_the_end() -> None:
    rng = np.random.default_rng(1)
    gallery = rng.standard_normal((5, 8)).astype(np.float32) * 3  # not normalised
    index = VectorIndex.exact(8, metric="l2", use_gpu=False)
    index.add(gallery)
    scores, ids = index.search(gallery + 0.01, k=7)
    assert ids.shape == (5, 7)
    np.testing.assert_array_equal(ids[:, 0], np.arange(5))
    d = ((gallery[:, None] + 0.01 - gallery[None]) ** 2).sum(-1)
    np.testing.assert_allclose(scores[:, :5], np.sort(d, axis=1), rtol=1e-4, atol=1e-4)
    assert (ids[:, 5:] == -1).all() and np.isinf(scores[:, 5:]).all() and (scores[:, 5:] > 0).all()
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        index.search(np.zeros((2, 9), np.float32), 3)
    with pytest.raises(ValueError, match="metric"):
        VectorIndex.exact(8, metric="cosine")


def test_gpu_request_falls_back_to_cpu_without_error() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "GPU faiss requested but unavailable" on CPU-only machines
        index = VectorIndex.exact(16, use_gpu=True)
        index.add(_normalize(np.random.default_rng(2).standard_normal((50, 16))))
        assert index.search(np.eye(16, dtype=np.float32)[:3], 4)[1].shape == (3, 4)


def test_gpu_path_maps_rows_back_to_ids_and_falls_back_on_failure(monkeypatch) -> None:
    """The GPU copy holds the flat vectors by row; results must come back as the index's ids (here not
    0..n-1, after a removal). faiss' GPU calls are stood in for by a CPU copy (no GPU on CI)."""
    import faiss

    import reid_lite.index.vector_index as vi

    rng = np.random.default_rng(6)
    x = _normalize(rng.standard_normal((40, 16)))
    cpu = VectorIndex.exact(16, use_gpu=False)
    cpu.add(x, ids=np.arange(100, 140))
    cpu.remove(np.array([100, 105, 117]))
    copies: list[int] = []

    def to_gpu(res, device, index):
        copies.append(device)
        return faiss.clone_index(index)

    monkeypatch.setattr(vi, "gpu_available", lambda: True)
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: None, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    gpu = cpu.clone()
    gpu.params.use_gpu = None  # auto: the GPU when there is one
    expected = cpu.search(x, k=5)
    for _ in range(2):
        got = gpu.search(x, k=5)
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_allclose(got[0], expected[0], atol=1e-6)
    assert copies == [0]  # copied once, then reused
    assert gpu.search(x, k=5, allowed=np.arange(120, 140))[1].min() >= 120  # filters: CPU, still exact

    def fails(res, device, index):
        raise RuntimeError("not supported on GPU")

    monkeypatch.setattr(faiss, "index_cpu_to_gpu", fails, raising=False)
    fallback = cpu.clone()
    fallback.params.use_gpu = True
    with pytest.warns(UserWarning, match="could not move the faiss index to GPU"):
        np.testing.assert_array_equal(fallback.search(x, k=5)[1], expected[1])


def test_ivfpq_recall_on_clustered_data() -> None:
    rng = np.random.default_rng(3)
    feats, pids = _clustered(rng, num_ids=200, n=6000, dim=64, noise=0.35)
    gallery, queries = feats[:5000], feats[5000:5300]
    g_pids, q_pids = pids[:5000], pids[5000:5300]
    # 6-bit codes keep training fast; PQ is coarse, so exact top-1 is judged within the top 100.
    index = VectorIndex(64, IndexParams(kind="ivfpq", nlist=32, m=16, nbits=6, nprobe=8, use_gpu=False))
    index.add(gallery)  # trained on its first vectors
    assert index.kind == "ivfpq" and index.ntotal == 5000
    _, ids = index.search(queries, k=100)
    exact = np.argmax(queries @ gallery.T, axis=1)
    recall_1_at_100 = np.mean([exact[i] in ids[i] for i in range(len(queries))])
    same_id_at_10 = np.mean(g_pids[ids[:, :10]] == q_pids[:, None])
    assert recall_1_at_100 >= 0.95, recall_1_at_100
    assert same_id_at_10 >= 0.9, same_id_at_10
    # Far better than chance (1/200 identities).
    assert same_id_at_10 > 50 / 200


def test_ivfpq_needs_enough_training_data() -> None:
    index = VectorIndex(16, IndexParams(kind="ivfpq", nlist=64, m=4, nbits=8))
    with pytest.raises(ValueError, match="at least 256"):
        index.add(_normalize(np.random.default_rng(4).standard_normal((100, 16))))


def test_evaluation_and_the_gallery_search_through_the_one_wrapper(monkeypatch, tmp_path) -> None:
    """Evaluation's exact ranking (tools/test.py --vis-queries) and a gallery's search both run
    VectorIndex.search, and no other module of the package touches faiss."""
    calls: list[tuple[str, str]] = []
    search = VectorIndex.search

    def spy(self, *args, **kwargs):
        calls.append((self.kind, self.metric))
        return search(self, *args, **kwargs)

    monkeypatch.setattr(VectorIndex, "search", spy)
    rng = np.random.default_rng(5)
    g = torch.from_numpy(rng.standard_normal((60, 16)).astype(np.float32) * 2)  # not normalised
    g_pids, g_cams = rng.integers(0, 6, 60), rng.integers(0, 3, 60)
    q = g[7] + 0.1
    order = rank_gallery(q, int(g_pids[7]), int(g_cams[7]), g, g_pids, g_cams, topk=10)
    d = ((g - q) ** 2).sum(1).numpy()
    junk = (g_pids == g_pids[7]) & (g_cams == g_cams[7])  # the query's own crop among them
    np.testing.assert_array_equal(order, np.argsort(np.where(junk, np.inf, d), kind="stable")[:10])
    assert calls == [("flat", "l2")]
    root = tmp_path / "g"
    shutil.copytree(Path(__file__).parent / "data" / "galleries_v1" / "flat", root)
    x = np.load(Path(__file__).parent / "data" / "galleries_v1" / "flat_vectors.npy").astype(np.float32)
    assert Gallery.open(root).search(x[:1], k=3)[0][0].id == 0
    assert calls == [("flat", "l2"), ("flat", "ip")]
    package = Path(reid_lite.__file__).parent
    users = sorted(str(p.relative_to(package)) for p in package.rglob("*.py") if "import faiss" in p.read_text())
    assert users == ["index/vector_index.py"]


# ---------------------------------------------------------------------------- evaluate_retrieval
def _dense_distmat(q: np.ndarray, g: np.ndarray, metric: str) -> np.ndarray:
    """One-shot (Q, G) matrix as torchreid / TransReID compute it."""
    qt, gt = torch.from_numpy(q), torch.from_numpy(g)
    if metric == "cosine":
        qt, gt = torch.nn.functional.normalize(qt), torch.nn.functional.normalize(gt)
        return (1 - qt @ gt.t()).numpy()
    m, n = qt.shape[0], gt.shape[0]
    d = qt.pow(2).sum(1, keepdim=True).expand(m, n) + gt.pow(2).sum(1, keepdim=True).expand(n, m).t()
    return torch.addmm(d, qt, gt.t(), beta=1, alpha=-2).numpy()


def _retrieval_problem(seed: int, integer: bool):
    rng = np.random.default_rng(seed)
    num_ids, num_q, num_g, dim = 40, 90, 700, 24
    centers = rng.standard_normal((num_ids, dim))
    q_pids, g_pids = rng.integers(0, num_ids, num_q), rng.integers(0, num_ids, num_g)
    q_feats = centers[q_pids] + 0.8 * rng.standard_normal((num_q, dim))
    g_feats = centers[g_pids] + 0.8 * rng.standard_normal((num_g, dim))
    if integer:  # small integers: distances are exact integers in float32, so there are many ties
        q_feats, g_feats = np.round(q_feats), np.round(g_feats)
    q_cams, g_cams = rng.integers(0, 4, num_q), rng.integers(0, 4, num_g)
    return q_feats.astype(np.float32), g_feats.astype(np.float32), q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize("metric,integer", [("cosine", False), ("euclidean", False), ("euclidean", True)])
def test_evaluate_retrieval_chunked_equals_dense(metric: str, integer: bool) -> None:
    tr_eval = torchreid_evaluate_rank()
    qf, gf, qp, gp, qc, gc = _retrieval_problem(7, integer)
    dense = _dense_distmat(qf, gf, metric)
    cmc_ref, map_ref = tr_eval(dense, qp, gp, qc, gc, max_rank=50, use_metric_cuhk03=False, use_cython=False)
    results = [
        evaluate_retrieval(qf, gf, qp, gp, qc, gc, query_chunk=chunk, max_rank=50, metric=metric)
        for chunk in (1, 7, 32, 1000)
    ]
    for res in results:
        np.testing.assert_array_equal(res["cmc"], cmc_ref)
        assert res["mAP"] == pytest.approx(map_ref, abs=1e-12)
        assert res["rank1"] == cmc_ref[0] and res["rank5"] == cmc_ref[4] and res["rank10"] == cmc_ref[9]
        assert res["mINP"] == results[-1]["mINP"]
    assert 0.0 < results[0]["mINP"] <= 1.0


def test_evaluate_retrieval_accepts_tensors_and_rejects_bad_metric() -> None:
    qf, gf, qp, gp, qc, gc = _retrieval_problem(8, False)
    a = evaluate_retrieval(torch.from_numpy(qf), torch.from_numpy(gf), qp, gp, qc, gc, query_chunk=50)
    b = evaluate_retrieval(qf, gf, qp, gp, qc, gc, query_chunk=90)
    assert a["mAP"] == b["mAP"] and np.array_equal(a["cmc"], b["cmc"])
    with pytest.raises(ValueError):
        evaluate_retrieval(qf, gf, qp, gp, qc, gc, metric="manhattan")


# ---------------------------------------------------------------------------- re-ranking
def _dense_re_ranking(prob_fea: torch.Tensor, gal_fea: torch.Tensor, k1: int, k2: int, lambda_value: float):
    """TransReID utils/reranking.py (dense), with float32 instead of float16 buffers (as torchreid)."""
    query_num = prob_fea.size(0)
    all_num = query_num + gal_fea.size(0)
    feat = torch.cat([prob_fea, gal_fea])
    distmat = torch.pow(feat, 2).sum(dim=1, keepdim=True).expand(all_num, all_num) + \
        torch.pow(feat, 2).sum(dim=1, keepdim=True).expand(all_num, all_num).t()
    distmat = torch.addmm(distmat, feat, feat.t(), beta=1, alpha=-2)
    original_dist = distmat.numpy()
    gallery_num = original_dist.shape[0]
    original_dist = np.transpose(original_dist / np.max(original_dist, axis=0))
    V = np.zeros_like(original_dist).astype(np.float32)
    initial_rank = np.argsort(original_dist).astype(np.int32)
    for i in range(all_num):
        forward_k_neigh_index = initial_rank[i, :k1 + 1]
        backward_k_neigh_index = initial_rank[forward_k_neigh_index, :k1 + 1]
        fi = np.where(backward_k_neigh_index == i)[0]
        k_reciprocal_index = forward_k_neigh_index[fi]
        k_reciprocal_expansion_index = k_reciprocal_index
        for j in range(len(k_reciprocal_index)):
            candidate = k_reciprocal_index[j]
            cand_forward = initial_rank[candidate, :int(np.around(k1 / 2)) + 1]
            cand_backward = initial_rank[cand_forward, :int(np.around(k1 / 2)) + 1]
            fi_candidate = np.where(cand_backward == candidate)[0]
            cand_k_reciprocal_index = cand_forward[fi_candidate]
            if len(np.intersect1d(cand_k_reciprocal_index, k_reciprocal_index)) > 2 / 3 * len(
                    cand_k_reciprocal_index):
                k_reciprocal_expansion_index = np.append(k_reciprocal_expansion_index,
                                                         cand_k_reciprocal_index)
        k_reciprocal_expansion_index = np.unique(k_reciprocal_expansion_index)
        weight = np.exp(-original_dist[i, k_reciprocal_expansion_index])
        V[i, k_reciprocal_expansion_index] = weight / np.sum(weight)
    original_dist = original_dist[:query_num, ]
    if k2 != 1:
        V_qe = np.zeros_like(V, dtype=np.float32)
        for i in range(all_num):
            V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe
    inv_index = [np.where(V[:, i] != 0)[0] for i in range(gallery_num)]
    jaccard_dist = np.zeros_like(original_dist, dtype=np.float32)
    for i in range(query_num):
        temp_min = np.zeros(shape=[1, gallery_num], dtype=np.float32)
        ind_non_zero = np.where(V[i, :] != 0)[0]
        ind_images = [inv_index[ind] for ind in ind_non_zero]
        for j in range(len(ind_non_zero)):
            temp_min[0, ind_images[j]] = temp_min[0, ind_images[j]] + np.minimum(
                V[i, ind_non_zero[j]], V[ind_images[j], ind_non_zero[j]])
        jaccard_dist[i] = 1 - temp_min / (2 - temp_min)
    final_dist = jaccard_dist * (1 - lambda_value) + original_dist * lambda_value
    return final_dist[:query_num, query_num:]


@pytest.mark.parametrize("num_q,num_g,k1,k2,block", [(60, 150, 20, 6, 16), (25, 70, 10, 1, 1000)])
def test_re_ranking_equals_dense_reference(num_q: int, num_g: int, k1: int, k2: int, block: int) -> None:
    rng = np.random.default_rng(num_q)
    feats, _ = _clustered(rng, num_ids=25, n=num_q + num_g, dim=32, noise=0.7)
    q, g = feats[:num_q], feats[num_q:]
    ref = _dense_re_ranking(torch.from_numpy(q), torch.from_numpy(g), k1, k2, 0.3)
    got = re_ranking(q, g, k1=k1, k2=k2, lambda_value=0.3, block_size=block, join_budget=500)
    assert got.shape == (num_q, num_g) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    # Re-ranking must actually change the ordering w.r.t. the plain distance (not a no-op).
    plain = _dense_distmat(q, g, "euclidean")
    assert not np.array_equal(np.argsort(got, axis=1)[:, :5], np.argsort(plain, axis=1)[:, :5])
