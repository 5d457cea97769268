"""CMC / mAP / mINP under the Market-1501 protocol, accumulable over query chunks.

The numbers equal torchreid's ``evaluate_rank(..., use_metric_cuhk03=False, use_cython=False)``:

* the gallery is ordered with the very same ``np.argsort(distmat, axis=1)`` call (default quicksort,
  same dtype, row by row), so tied distances are broken exactly the way torchreid breaks them;
* for every query, gallery samples with the same pid AND the same camid are removed ("junk");
* queries without any remaining true match are skipped; if no query is valid a ``ValueError`` is raised;
* ``max_rank`` is clamped to the gallery size (and, like torchreid, to the shortest junk-removed gallery
  of a valid query); the CMC is a float32 array like torchreid's.

mINP is the mean inverse negative penalty of Ye et al. ("Deep Learning for Person Re-identification: A
Survey and Outlook", the AGW baseline): ``INP = num_rel / (rank of the hardest true match + 1)`` with ranks
counted after junk removal. torchreid 0.2.5's ``evaluate_py`` only returns ``(cmc, mAP)``; mINP follows the
AGW ``eval_func`` code that later torchreid/fast-reid versions copied.

Everything is vectorised over the queries of a block; there is no per-query Python loop.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

__all__ = ["RankAccumulator", "RankResult", "evaluate_rank"]

# Rows of a distance chunk are processed in sub-blocks of at most this many elements so that the
# (rows x G) int64 argsort and its gathered pid/camid copies stay a few hundred MB whatever chunk the
# caller passes.
_BLOCK_ELEMS = 1 << 24


@dataclass(frozen=True)
class RankResult:
    """Final metrics of a ranking evaluation."""

    cmc: np.ndarray  # float32, shape (max_rank,)
    mAP: float
    mINP: float
    num_valid: int  # queries with at least one valid match
    num_queries: int  # all queries seen, valid or not

    def as_tuple(self) -> tuple[np.ndarray, float, float]:
        """(cmc, mAP, mINP), the official `eval_func`'s return value."""
        return self.cmc, self.mAP, self.mINP


class RankAccumulator:
    """Accumulates CMC / AP / INP statistics over chunks of queries against one fixed gallery.

    Memory is O(G) for the gallery labels plus O(Q) floats for the per-query AP/INP values (kept so the
    final mean is computed with the same ``np.mean`` as torchreid) plus bounded per-block temporaries.

    Args:
        g_pids: (G,) gallery identity labels.
        g_camids: (G,) gallery camera labels.
        max_rank: length of the CMC curve; clamped to G like torchreid does.
        num_threads: threads used to argsort row blocks (numpy releases the GIL while sorting);
            ``None`` uses ``os.cpu_count()``.
    """

    def __init__(
        self,
        g_pids: np.ndarray,
        g_camids: np.ndarray,
        max_rank: int = 50,
        num_threads: int | None = None,
    ) -> None:
        self.g_pids = np.asarray(g_pids).ravel()
        self.g_camids = np.asarray(g_camids).ravel()
        if self.g_pids.shape != self.g_camids.shape:
            raise ValueError("g_pids and g_camids must have the same length")
        if max_rank < 1:
            raise ValueError("max_rank must be >= 1")
        self.num_gallery = int(self.g_pids.shape[0])
        self.max_rank = min(int(max_rank), self.num_gallery)
        self.num_threads = max(1, num_threads or os.cpu_count() or 1)
        # Histogram of the (junk-removed) rank of the first true match; its cumsum is the CMC numerator.
        # Integer counts keep the CMC exact whatever the chunking.
        self._first_hit_hist = np.zeros(self.max_rank, dtype=np.int64)
        self._aps: list[np.ndarray] = []
        self._inps: list[np.ndarray] = []
        self._firsts: list[np.ndarray] = []
        self._num_queries = 0
        self._min_kept_len = self.num_gallery  # shortest junk-removed gallery of a valid query

    # ------------------------------------------------------------------ public API
    def update(self, distmat: np.ndarray, q_pids: np.ndarray, q_camids: np.ndarray) -> None:
        """Adds a chunk of queries.

        Args:
            distmat: (B, G) distances of B queries to the whole gallery (smaller = more similar). Its
                dtype is kept as is: converting would change how ``np.argsort`` breaks ties.
            q_pids: (B,) query identities.
            q_camids: (B,) query cameras.
        """
        distmat = np.asarray(distmat)
        q_pids = np.asarray(q_pids).ravel()
        q_camids = np.asarray(q_camids).ravel()
        if distmat.ndim != 2 or distmat.shape[1] != self.num_gallery:
            raise ValueError(f"distmat must have shape (B, {self.num_gallery}), got {distmat.shape}")
        if q_pids.shape[0] != distmat.shape[0] or q_camids.shape[0] != distmat.shape[0]:
            raise ValueError("q_pids / q_camids must have one entry per distmat row")
        num_q = distmat.shape[0]
        if num_q == 0:
            return
        rows = max(1, _BLOCK_ELEMS // max(self.num_gallery, 1))
        starts = range(0, num_q, rows)
        slices = [slice(s, min(s + rows, num_q)) for s in starts]

        def work(sl: slice) -> tuple[np.ndarray, ...]:
            return self._block_stats(distmat[sl], q_pids[sl], q_camids[sl])

        if self.num_threads > 1 and len(slices) > 1:
            with ThreadPoolExecutor(max_workers=min(self.num_threads, len(slices))) as pool:
                outs = list(pool.map(work, slices))  # map keeps the query order (needed for np.mean)
        else:
            outs = [work(sl) for sl in slices]
        for valid, first, ap, inp, kept_len in outs:
            if valid.any():
                self._min_kept_len = min(self._min_kept_len, int(kept_len[valid].min()))
            first = first[valid]
            self._first_hit_hist += np.bincount(first[first < self.max_rank], minlength=self.max_rank)
            self._aps.append(ap[valid])
            self._inps.append(inp[valid])
            self._firsts.append(first)
        self._num_queries += num_q

    @property
    def num_valid(self) -> int:
        return int(sum(a.shape[0] for a in self._aps))

    def result(self) -> RankResult:
        """Returns the metrics of all queries added so far.

        Raises:
            ValueError: if no query had a valid match in the gallery.
        """
        num_valid = self.num_valid
        if num_valid == 0:
            raise ValueError(f"no query identity appears in the gallery from another camera ({self._num_queries} "
                             "queries): nothing to evaluate; check that the query and gallery sets share identities")
        # torchreid: float32 (n_valid, max_rank) 0/1 matrix summed over axis 0 (exact: integers < 2**24)
        # and divided by a Python float, which numpy evaluates in float32.
        # torchreid truncates each query's curve to its junk-removed length (`cmc[:max_rank]`), so when
        # that is shorter than max_rank its CMC is that short (it crashes if the lengths differ; we
        # return the common prefix).
        length = min(self.max_rank, self._min_kept_len)
        cmc = np.cumsum(self._first_hit_hist[:length]).astype(np.float32) / np.float32(num_valid)
        mAP = float(np.mean(np.concatenate(self._aps)))
        mINP = float(np.mean(np.concatenate(self._inps)))
        return RankResult(cmc=cmc, mAP=mAP, mINP=mINP, num_valid=num_valid, num_queries=self._num_queries)

    def per_query(self) -> dict[str, np.ndarray]:
        """Each valid query's own figures, in the order added: 'first_hit' (0-based rank of its first true
        match after junk removal; Rank-k is the mean of `first_hit < k`), 'ap' and 'inp'. Their means are the
        CMC, mAP and mINP of `result()`: what a bootstrap over queries resamples."""
        if not self._aps:
            empty = np.zeros(0)
            return {"first_hit": empty.astype(np.int64), "ap": empty, "inp": empty}
        return {"first_hit": np.concatenate(self._firsts), "ap": np.concatenate(self._aps),
                "inp": np.concatenate(self._inps)}

    # ------------------------------------------------------------------ internals
    def _block_stats(
        self, dist: np.ndarray, q_pids: np.ndarray, q_camids: np.ndarray
    ) -> tuple[np.ndarray, ...]:
        """Per-query (valid, first-hit rank, AP, INP, junk-removed gallery length) for one row block."""
        num_q = dist.shape[0]
        # Same call as torchreid (default kind): identical tie order, row by row.
        order = np.argsort(dist, axis=1)
        # Only same-pid positions matter (true matches and junk); everything else is a negative whose
        # only effect is to shift positions, which the sorted position itself already encodes.
        rows, pos = np.nonzero(self.g_pids[order] == q_pids[:, None])  # row-major: pos ascending per row
        is_junk = self.g_camids[order[rows, pos]] == q_camids[rows]
        del order
        # Rank after junk removal = position - number of junk entries before it in the same row.
        junk_i = is_junk.astype(np.int64)
        junk_excl = np.cumsum(junk_i) - junk_i
        row_junk = np.bincount(rows, weights=junk_i, minlength=num_q).astype(np.int64)
        row_junk_excl = np.cumsum(row_junk) - row_junk
        keep = ~is_junk
        h_rows = rows[keep]
        h_rank = (pos - (junk_excl - row_junk_excl[rows]))[keep]
        num_rel = np.bincount(h_rows, minlength=num_q)
        # 1-based index of each hit within its row (hits are still in rank order).
        row_start = np.cumsum(num_rel) - num_rel
        h_idx = np.arange(1, h_rows.shape[0] + 1) - row_start[h_rows]
        valid = num_rel > 0
        first = np.zeros(num_q, dtype=np.int64)
        is_first = h_idx == 1
        first[h_rows[is_first]] = h_rank[is_first]
        last = np.zeros(num_q, dtype=np.int64)
        is_last = h_idx == num_rel[h_rows]
        last[h_rows[is_last]] = h_rank[is_last]
        # AP = sum_hits (hits so far) / (rank + 1) / num_rel, same float64 terms as torchreid's tmp_cmc.
        terms = h_idx / (h_rank + 1.0)
        # torchreid sums these terms with np.sum over the whole junk-removed row (zeros elsewhere);
        # reproduce numpy's pairwise summation tree so that AP (hence mAP) is bit-identical.
        lengths = self.num_gallery - row_junk
        ap_sum = _numpy_sum_of_sparse_rows(h_rows, h_rank, terms, lengths, num_q)
        with np.errstate(invalid="ignore", divide="ignore"):  # rows without hits are discarded later
            ap = ap_sum / num_rel
            inp = num_rel / (last + 1.0)
        return valid, first, ap, inp, lengths


def evaluate_rank(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 50,
) -> tuple[np.ndarray, float, float]:
    """One-shot Market-1501 evaluation of a dense (Q, G) distance matrix.

    Equivalent to feeding the whole matrix to a `RankAccumulator`.

    Returns:
        ``(cmc, mAP, mINP)``: float32 CMC curve of length ``min(max_rank, G)``, mean AP, mean INP.

    Raises:
        ValueError: if no query has a valid match in the gallery.
    """
    acc = RankAccumulator(g_pids, g_camids, max_rank=max_rank)
    acc.update(distmat, q_pids, q_camids)
    return acc.result().as_tuple()


# numpy's float pairwise summation (numpy/_core/src/umath/loops_utils.h.src): blocks of <= 128 elements are
# summed with 8 interleaved accumulators, longer runs are split in two halves (rounded down to a multiple
# of 8) recursively; runs shorter than 8 are summed sequentially.
_PW_BLOCKSIZE = 128


def _numpy_sum_of_sparse_rows(
    rows: np.ndarray, pos: np.ndarray, vals: np.ndarray, lengths: np.ndarray, num_rows: int
) -> np.ndarray:
    """Bit-exact ``np.sum`` of virtual float64 rows that are zero except ``vals`` at ``pos``.

    Row ``r`` has length ``lengths[r]``; entries must be sorted by (row, pos). Adding an exact zero never
    rounds, so only the association of the non-zero terms in numpy's summation tree matters; this walks
    that tree for the non-zero entries only (O(nnz * log(length)), vectorised over all rows).
    """
    out = np.zeros(num_rows, dtype=np.float64)
    if rows.shape[0] == 0:
        return out
    pos = pos.astype(np.int64)
    off = np.zeros_like(pos)
    n = lengths[rows].astype(np.int64)
    path = np.zeros_like(pos)
    depth = np.zeros_like(pos)
    # 1) Descend to the leaf block (n <= 128) holding each entry, recording left/right turns.
    while True:
        big = np.flatnonzero(n > _PW_BLOCKSIZE)
        if big.size == 0:
            break
        nb = n[big]
        n2 = nb // 2
        n2 -= n2 % 8
        right = pos[big] >= off[big] + n2
        path[big] = path[big] * 2 + right
        depth[big] += 1
        off[big] += np.where(right, n2, 0)
        n[big] = np.where(right, nb - n2, n2)
    # 2) Leaf blocks are contiguous position ranges, hence contiguous in the (row, pos)-sorted entries.
    new_leaf = np.ones(rows.shape[0], dtype=bool)
    new_leaf[1:] = (rows[1:] != rows[:-1]) | (depth[1:] != depth[:-1]) | (path[1:] != path[:-1])
    leaf = np.cumsum(new_leaf) - 1
    num_leaves = int(leaf[-1]) + 1
    rel = pos - off
    in_acc = (n >= 8) & (rel < n - n % 8)
    slot = np.where(in_acc, rel % 8, 8)  # 0..7: interleaved accumulator; 8: sequential tail
    # Stable sort keeps position order inside each (leaf, slot) group: that is the accumulation order.
    order = np.argsort(leaf * 9 + slot, kind="stable")
    g_key = (leaf * 9 + slot)[order]
    g_start = np.ones(order.shape[0], dtype=bool)
    g_start[1:] = g_key[1:] != g_key[:-1]
    first_of_group = np.flatnonzero(g_start)
    k_in_group = np.arange(order.shape[0]) - np.repeat(first_of_group, np.diff(np.append(first_of_group,
                                                                                         order.shape[0])))
    s_leaf, s_slot, s_val = leaf[order], slot[order], vals[order]
    accs = np.zeros((num_leaves, 8), dtype=np.float64)
    acc_mask = s_slot < 8
    for k in range(int(k_in_group[acc_mask].max(initial=-1)) + 1):
        m = acc_mask & (k_in_group == k)
        accs[s_leaf[m], s_slot[m]] += s_val[m]  # one element per group per k: no aliasing
    leaf_val = ((accs[:, 0] + accs[:, 1]) + (accs[:, 2] + accs[:, 3])) + (
        (accs[:, 4] + accs[:, 5]) + (accs[:, 6] + accs[:, 7])
    )
    tail_mask = ~acc_mask
    for k in range(int(k_in_group[tail_mask].max(initial=-1)) + 1):
        m = tail_mask & (k_in_group == k)
        leaf_val[s_leaf[m]] += s_val[m]
    # 3) Combine siblings bottom-up (left + right; a missing sibling is an exact zero).
    first_entry = np.flatnonzero(new_leaf)
    node_row, node_depth, node_path = rows[first_entry], depth[first_entry], path[first_entry]
    node_val = leaf_val
    while node_depth.size and node_depth.max() > 0:
        d = node_depth.max()
        sel = node_depth == d
        parent_key = node_row[sel].astype(np.int64) * (1 << 32) + (node_path[sel] >> 1)
        uniq, inv = np.unique(parent_key, return_inverse=True)
        # bincount adds in float64 starting from 0.0: 0 + a + b == a + b exactly.
        parent_val = np.bincount(inv, weights=node_val[sel], minlength=uniq.shape[0])
        keep = ~sel
        node_row = np.concatenate([node_row[keep], uniq >> 32])
        node_path = np.concatenate([node_path[keep], uniq & ((1 << 32) - 1)])
        node_depth = np.concatenate([node_depth[keep], np.full(uniq.shape[0], d - 1)])
        node_val = np.concatenate([node_val[keep], parent_val])
    out[node_row] = node_val
    return out
