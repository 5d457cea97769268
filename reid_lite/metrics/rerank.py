"""Blocked k-reciprocal re-ranking (Zhong et al., CVPR 2017).

Same algorithm and numbers (to float32 tolerance) as the dense ``re_ranking`` of person-re-ranking /
TransReID ``utils/reranking.py`` (with float32 instead of float16 buffers, as torchreid does), but the dense
(Q+G)^2 distance matrix is never materialised:

1. k-NN pass: for blocks of ``block_size`` rows, the (block, N) squared-Euclidean distances
   (``N = Q + G``) give each row's maximum (the dense code divides row i by it) and its ``max(k1+1, k2)``
   nearest neighbours (``torch.topk``).
2. k-reciprocal sets, their 2/3-overlap expansion and the Gaussian weights are computed vectorised from
   the neighbour lists only; distances to expansion members are recomputed from the features.
3. Query expansion averages the sparse rows of the ``k2`` nearest neighbours.
4. Jaccard distances ``1 - sum_k min(V_q,k, V_g,k) / (2 - ...)`` come from a sparse join on the shared
   support k (the dense code's inverted index), one query block at a time.

Memory bound (besides the inputs, N x D float32, and the returned Q x G float32 output):
``N * K`` neighbour ids (``K = max(k1+1, k2)``), ``N * S`` sparse entries for V with
``S <= (k1+1) * (round(k1/2)+2)`` (252 for k1=20; typically a few tens), ``N * min(k2 * S, N)`` for the
query-expanded V, plus per-block temporaries of ``block_size * N`` floats (k-NN), ``block_size * k2 * S``
entries (expansion) and at most ``join_budget`` join triplets + ``block_size * G`` floats (Jaccard).
Nothing is O(N^2) except what the Q x G output itself needs.

Tie caveat: the dense code orders neighbours with ``np.argsort`` over a full row, ``torch.topk`` may order
exactly tied distances differently (only possible with duplicated features).
"""

from __future__ import annotations

import numpy as np
import torch

from reid_lite.metrics.distance import as_float_tensor

__all__ = ["re_ranking"]


def re_ranking(
    query_feats: np.ndarray | torch.Tensor,
    gallery_feats: np.ndarray | torch.Tensor,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    block_size: int = 1024,
    join_budget: int = 1 << 24,
) -> np.ndarray:
    """k-reciprocal re-ranked distances between queries and gallery.

    The original distance is the squared Euclidean distance of the given features (TransReID computes
    ``||x||^2 + ||y||^2 - 2 x.y``), each row divided by its maximum over all Q+G samples.

    Args:
        query_feats: (Q, D) query features.
        gallery_feats: (G, D) gallery features.
        k1: size of the k-reciprocal neighbourhood (paper: 20).
        k2: neighbours used for local query expansion (paper: 6); 1 disables it.
        lambda_value: weight of the original distance in the final mix (paper: 0.3).
        block_size: rows per block of the (block, Q+G) distance computation; bounds temporary memory.
        join_budget: maximum number of (query, gallery, k) triplets materialised at once in the Jaccard
            join (each triplet costs ~40 bytes).

    Returns:
        (Q, G) float32 re-ranked distance matrix.
    """
    q = as_float_tensor(query_feats)
    g = as_float_tensor(gallery_feats)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError("query_feats and gallery_feats must be (Q, D) and (G, D) with the same D")
    if k1 < 1 or k2 < 1:
        raise ValueError("k1 and k2 must be >= 1")
    num_q, num_g = q.shape[0], g.shape[0]
    feats = torch.cat([q, g], dim=0)
    n = feats.shape[0]
    sqnorm = feats.pow(2).sum(dim=1)
    num_nn = min(max(k1 + 1, k2), n)

    # 1) k-NN lists and per-row maxima (the dense code's normaliser), block by block.
    rank = np.empty((n, num_nn), dtype=np.int64)
    row_max = np.empty(n, dtype=np.float32)
    for s in range(0, n, block_size):
        e = min(s + block_size, n)
        d = _sq_dist(feats[s:e], feats, sqnorm[s:e], sqnorm)
        row_max[s:e] = d.max(dim=1).values.numpy()
        rank[s:e] = torch.topk(d, num_nn, dim=1, largest=False, sorted=True).indices.numpy()
        del d

    # 2) k-reciprocal expansion sets and their weights, as padded (n, S) arrays (-1 = empty).
    v_idx, v_val = _reciprocal_weights(feats, sqnorm, row_max, rank, k1, block_size)

    # 3) Local query expansion: V_qe[i] = mean of V over the k2 nearest neighbours of i (including i).
    if k2 != 1:
        indptr, indices, data = _query_expand(v_idx, v_val, rank[:, :k2], n, block_size)
    else:
        valid = v_idx >= 0
        indptr = np.concatenate([[0], np.cumsum(valid.sum(1))]).astype(np.int64)
        indices, data = v_idx[valid], v_val[valid].astype(np.float64)
    del v_idx, v_val, rank

    # 4) Jaccard distance between each query row and each gallery row of V, then the final mix.
    # Gallery rows of V in column-major (CSC) form: for every support index k, the gallery rows using it.
    g_lo, g_hi = indptr[num_q], indptr[n]
    g_rows = np.repeat(np.arange(num_g), np.diff(indptr[num_q:]))
    g_cols, g_vals = indices[g_lo:g_hi], data[g_lo:g_hi]
    col_order = np.argsort(g_cols, kind="stable")
    csc_rows, csc_vals = g_rows[col_order], g_vals[col_order]
    colptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(g_cols, minlength=n), out=colptr[1:])

    out = np.empty((num_q, num_g), dtype=np.float32)
    g_feats, g_sq = feats[num_q:], sqnorm[num_q:]
    for s in range(0, num_q, block_size):
        e = min(s + block_size, num_q)
        jac = _jaccard_block(indptr, indices, data, s, e, colptr, csc_rows, csc_vals, num_g, join_budget)
        orig = _sq_dist(feats[s:e], g_feats, sqnorm[s:e], g_sq).numpy() / row_max[s:e, None]
        out[s:e] = jac * (1.0 - lambda_value) + orig * lambda_value
    return out


def _sq_dist(a: torch.Tensor, b: torch.Tensor, a_sq: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances, TransReID formula (``addmm`` with beta=1, alpha=-2)."""
    return torch.addmm(a_sq.unsqueeze(1) + b_sq.unsqueeze(0), a, b.t(), beta=1.0, alpha=-2.0)


def _reciprocal_weights(
    feats: torch.Tensor,
    sqnorm: torch.Tensor,
    row_max: np.ndarray,
    rank: np.ndarray,
    k1: int,
    block_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Padded (n, S) support indices (sorted, -1 padded) and weights of each row of V."""
    n = rank.shape[0]
    kk = min(k1 + 1, rank.shape[1])
    half = min(int(np.around(k1 / 2.0)) + 1, kk)
    fwd = rank[:, :kk]
    fwd_h = rank[:, :half]
    # "Half" reciprocal sets of every sample: c's j-th neighbour is kept if c is in its top `half`.
    recip_h = (fwd_h[fwd_h] == np.arange(n)[:, None, None]).any(axis=2)  # (n, half)
    width = kk + kk * half
    v_idx = np.full((n, width), -1, dtype=np.int64)
    v_val = np.zeros((n, width), dtype=np.float32)
    # (b, kk, half, kk) membership tests dominate the temporaries: keep them around ~32M booleans.
    # The gathered member features (b, width, D) are bounded the same way (~256 MB of float32).
    sub = max(1, min(block_size, (1 << 25) // (kk * half * kk), (1 << 26) // (width * feats.shape[1])))
    for s in range(0, n, sub):
        e = min(s + sub, n)
        ids = np.arange(s, e)
        f = fwd[s:e]  # (b, kk)
        recip = (fwd[f] == ids[:, None, None]).any(axis=2)  # (b, kk): k-reciprocal neighbours of i
        r_set = np.where(recip, f, -1)
        cand_set = np.where(recip_h[f], fwd_h[f], -2)  # (b, kk, half): candidates' half-reciprocal sets
        cand_len = recip_h[f].sum(axis=2)
        # |candidate set ∩ k-reciprocal set of i|; -2 / -1 paddings never match each other.
        inter = (cand_set[:, :, :, None] == r_set[:, None, None, :]).any(axis=3).sum(axis=2)
        # Same float expression as the reference (`> 2. / 3 * len(...)`), only for reciprocal candidates.
        take = recip & (inter > 2.0 / 3 * cand_len)
        expand = np.where(take[:, :, None] & recip_h[f], fwd_h[f], -1).reshape(e - s, -1)
        members = np.concatenate([r_set, expand], axis=1)
        members.sort(axis=1)
        dup = np.zeros_like(members, dtype=bool)
        dup[:, 1:] = members[:, 1:] == members[:, :-1]
        members[dup] = -1
        members.sort(axis=1)
        members = members[:, ::-1]  # valid (sorted descending) first, -1 padding last
        valid = members >= 0
        safe = np.where(valid, members, 0)
        # Distances from i to its members, recomputed from the features (no dense row kept around).
        fi = feats[s:e]
        fm = feats[torch.from_numpy(safe)]  # (b, width, D)
        dots = torch.bmm(fm, fi.unsqueeze(2)).squeeze(2)
        dist = (sqnorm[s:e].unsqueeze(1) + sqnorm[torch.from_numpy(safe)] - 2.0 * dots).numpy()
        w = np.where(valid, np.exp(-(dist / row_max[s:e, None])), 0.0).astype(np.float32)
        w /= w.sum(axis=1, keepdims=True)
        v_idx[s:e, : members.shape[1]] = np.where(valid, members, -1)
        v_val[s:e, : members.shape[1]] = w
    return v_idx, v_val


def _query_expand(
    v_idx: np.ndarray, v_val: np.ndarray, nn: np.ndarray, n: int, block_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR (indptr, indices, data) of ``V_qe[i] = mean_{j in nn[i]} V[j]`` (float64 data)."""
    k2 = nn.shape[1]
    indptr = np.zeros(n + 1, dtype=np.int64)
    ind_parts: list[np.ndarray] = []
    dat_parts: list[np.ndarray] = []
    for s in range(0, n, block_size):
        e = min(s + block_size, n)
        idx = v_idx[nn[s:e]].reshape(e - s, -1)  # (b, k2 * S)
        val = v_val[nn[s:e]].reshape(e - s, -1)
        rows = np.repeat(np.arange(e - s), idx.shape[1])
        idx, val = idx.ravel(), val.ravel()
        ok = idx >= 0
        key = rows[ok] * np.int64(n) + idx[ok]
        uniq, inv = np.unique(key, return_inverse=True)
        sums = np.bincount(inv, weights=val[ok], minlength=uniq.shape[0])
        ind_parts.append(uniq % n)
        dat_parts.append(sums / k2)
        indptr[s + 1 : e + 1] = indptr[s] + np.cumsum(np.bincount(uniq // n, minlength=e - s))
    return indptr, np.concatenate(ind_parts), np.concatenate(dat_parts)


def _jaccard_block(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    s: int,
    e: int,
    colptr: np.ndarray,
    csc_rows: np.ndarray,
    csc_vals: np.ndarray,
    num_g: int,
    join_budget: int,
) -> np.ndarray:
    """Jaccard distances of query rows [s, e) of V against all gallery rows, via a sparse join on k."""
    temp = np.zeros((e - s) * num_g, dtype=np.float64)
    counts_per_entry = colptr[indices[indptr[s] : indptr[e]] + 1] - colptr[indices[indptr[s] : indptr[e]]]
    row_of_entry = np.repeat(np.arange(e - s), np.diff(indptr[s : e + 1]))
    # Split the query block's entries so that each piece expands to at most `join_budget` triplets.
    cum = np.cumsum(counts_per_entry)
    start = 0
    total = counts_per_entry.shape[0]
    while start < total:
        base = cum[start - 1] if start else 0
        stop = int(np.searchsorted(cum, base + join_budget, side="right"))
        stop = max(stop, start + 1)
        ent = slice(indptr[s] + start, indptr[s] + stop)
        cnt = counts_per_entry[start:stop]
        k = indices[ent]
        a = data[ent]
        r = row_of_entry[start:stop]
        tot = int(cnt.sum())
        if tot:
            # Ragged arange: positions colptr[k] .. colptr[k+1]-1 for every query entry.
            rep_start = np.repeat(colptr[k] - (np.cumsum(cnt) - cnt), cnt)
            pos = rep_start + np.arange(tot)
            contrib = np.minimum(np.repeat(a, cnt), csc_vals[pos])
            flat = np.repeat(r, cnt) * num_g + csc_rows[pos]
            temp += np.bincount(flat, weights=contrib, minlength=temp.shape[0])
        start = stop
    temp = temp.reshape(e - s, num_g)
    return (1.0 - temp / (2.0 - temp)).astype(np.float32)
