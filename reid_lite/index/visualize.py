"""Ranked-results picture: each query followed by its top-k gallery matches (OpenCV only).

True matches get a green border, false ones red; under each crop its camera (1-based, as in the
file names, `c1` = camid 0) and identity. Gallery images of the query's own identity seen by the query's
own camera are left out of the ranking, as the Market-1501 protocol (and torchreid's
`visualize_ranked_results`) does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from .vector_index import VectorIndex

__all__ = ["canvas_size", "rank_gallery", "visualize_ranked_results"]

CELL_HW = (256, 128)  # every crop is resized to this (height, width)
PAD = 8  # between cells and around the picture
QUERY_GAP = 24  # extra space separating the query from its matches
LABEL_H = 22  # text band under each crop
BORDER = 4

_GREEN, _RED, _BLUE, _GREY = (0, 200, 0), (0, 0, 230), (230, 120, 0), (160, 160, 160)  # BGR


def canvas_size(num_queries: int, topk: int, cell_hw: tuple[int, int] = CELL_HW) -> tuple[int, int]:
    """(height, width) in pixels of the picture for `num_queries` rows of 1 + `topk` crops."""
    h, w = cell_hw
    width = PAD + (w + PAD) * (1 + topk) + QUERY_GAP
    height = PAD + (h + LABEL_H + PAD) * num_queries
    return height, width


def rank_gallery(query_feat: torch.Tensor, q_pid: int, q_camid: int, gallery_feats: torch.Tensor,
                 g_pids: np.ndarray, g_camids: np.ndarray, topk: int = 10) -> np.ndarray:
    """Indices of the `topk` nearest gallery features (squared Euclidean, as the evaluator ranks),
    excluding same-identity same-camera images (junk in the Market-1501 protocol). An exact search of the
    one faiss wrapper (`reid_lite.index.VectorIndex`, the gallery's own; on GPU when faiss has one): the
    top `topk` + (number of junk images) without a filter, then the junk dropped, which is still exact."""
    g = gallery_feats.float()
    junk = (np.asarray(g_pids) == q_pid) & (np.asarray(g_camids) == q_camid)
    index = VectorIndex.exact(g.shape[1], metric="l2")
    index.add(g)
    _, ids = index.search(query_feat.reshape(1, -1).float(), topk + int(junk.sum()))
    ids = ids[0][ids[0] >= 0]
    return ids[~junk[ids]][:topk]


def _read_cell(path: str, cell_hw: tuple[int, int]) -> np.ndarray:
    h, w = cell_hw
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:  # unreadable: a grey placeholder keeps the grid aligned
        return np.full((h, w, 3), 128, dtype=np.uint8)
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)


def _put_label(canvas: np.ndarray, text: str, x: int, y: int, width: int) -> None:
    scale = 0.45
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    tx = x + max(0, (width - tw) // 2)
    cv2.putText(canvas, text, (tx, y + (LABEL_H + th) // 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1,
                cv2.LINE_AA)


def visualize_ranked_results(query_paths: Sequence[str], query_pids: Sequence[int], query_camids: Sequence[int],
                             ranked: Sequence[Sequence[int]], gallery_paths: Sequence[str],
                             gallery_pids: Sequence[int], gallery_camids: Sequence[int], out_path: str | Path,
                             topk: int = 10, cell_hw: tuple[int, int] = CELL_HW) -> Path:
    """Write a PNG with one row per query: the query (blue border), then its ranked gallery matches.

    `ranked[i]` are gallery indices for query i, best first (e.g. from `rank_gallery`); rows with fewer
    than `topk` matches leave blank cells, so the picture is always `canvas_size(len(query_paths), topk)`.
    Returns the written path.
    """
    if not (len(query_paths) == len(query_pids) == len(query_camids) == len(ranked)):
        raise ValueError("query_paths, query_pids, query_camids and ranked must have the same length")
    h, w = cell_hw
    H, W = canvas_size(len(query_paths), topk, cell_hw)
    canvas = np.full((H, W, 3), 255, dtype=np.uint8)
    for row, (qpath, qpid, qcam, order) in enumerate(zip(query_paths, query_pids, query_camids, ranked)):
        y = PAD + row * (h + LABEL_H + PAD)
        cells = [(qpath, _BLUE, f"query c{int(qcam) + 1} id{int(qpid)}")]
        for gi in list(order)[:topk]:
            gpid, gcam = int(gallery_pids[gi]), int(gallery_camids[gi])
            color = _GREEN if gpid == int(qpid) else _RED
            cells.append((gallery_paths[gi], color, f"c{gcam + 1} id{gpid}"))
        for col, (path, color, text) in enumerate(cells):
            x = PAD + col * (w + PAD) + (QUERY_GAP if col else 0)
            img = _read_cell(path, cell_hw)
            cv2.rectangle(img, (0, 0), (w - 1, h - 1), color, BORDER)
            canvas[y:y + h, x:x + w] = img
            _put_label(canvas, text, x, y + h, w)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), canvas):
        raise OSError(f"could not write {out}")
    return out
