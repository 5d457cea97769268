"""Helpers every reduction method and the models share: attention, cosine scores, bipartite FLOPs, grids.

Nothing here imports `reid_lite.models` or a method module, so the backbone (`models/vit.py`), timm
patching and each method file use the same code without importing each other.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# ----------------------------------------------------------------------------------------- attention
def attend(
    attn: nn.Module,
    x: Tensor,
    bias: Tensor | None = None,
    need_cls_attn: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Multi-head self-attention through the fused kernel, for our `Attention` and timm's alike.

    Returns the projected output, the keys (B, H, T, d) and, when asked, the class token's attention
    row (B, H, T) in fp32. That row is recomputed on its own (O(T D)) so that the full T x T attention
    matrix is never materialised. `bias` (B, 1, 1, T) is added to every query's logits (proportional
    attention: log token sizes; -inf on empty slots).
    """
    B, T, C = x.shape
    h = attn.num_heads
    qkv = attn.qkv(x).reshape(B, T, 3, h, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    if bias is not None:
        bias = bias.to(q.dtype)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0, scale=attn.scale
    )
    cls_attn = None
    if need_cls_attn:
        with full_precision(q.device):  # a merge decision's input: fp32 even under autocast
            # One dot product per key (a vecdot over d): as a (1 x d) @ (d x T) matmul per head it cost
            # 3x more on the CPU (the strided keys are copied first), 1.4 ms per ViT-B block at batch 16.
            # Taken over (B, T, H, d), the keys' order in memory (7% faster than over (B, H, T, d)).
            q_cls = q[:, :, :1].float().transpose(1, 2) * attn.scale
            logits = torch.linalg.vecdot(k.float().transpose(1, 2), q_cls).transpose(1, 2)
            if bias is not None:
                logits = logits + bias.float()[:, 0]
            cls_attn = logits.softmax(dim=-1)
    out = out.transpose(1, 2).reshape(B, T, -1)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        out = norm(out)
    return attn.proj_drop(attn.proj(out)), k, cls_attn


# ----------------------------------------------------------------------------------------- precision
def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast switched off on `device`, for merge decisions (similarities, scores, thresholds): under bf16/fp16
    autocast a matrix product would otherwise run in the low precision, and its rounding flips near-tied
    decisions (which token merges where), which changes features far more than rounding the values does. A
    no-op where autocast does not exist (the meta device) and, in fp32, for the results (bit for bit)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------- similarity
def cosine_scores(a: Tensor, b: Tensor) -> Tensor:
    """(B, Na, Nb) cosine similarity between the rows of a (B, Na, C) and b (B, Nb, C), in fp32 whatever the
    inputs' dtype or an autocast around (see `full_precision`)."""
    with full_precision(a.device):
        a, b = a.float(), b.float()
        a = a / a.norm(dim=-1, keepdim=True)
        b = b / b.norm(dim=-1, keepdim=True)
        return a @ b.transpose(-1, -2)


def bipartite_flops(num_tokens: int, channels: int) -> int:
    """Multiply-adds of the (A x B) similarity matrix of an alternating split of `num_tokens`."""
    return ((num_tokens + 1) // 2) * (num_tokens // 2) * channels


# ----------------------------------------------------------------------------------------- grids
def grid_positions(grid: tuple[int, int], device: torch.device | str = "cpu") -> Tensor:
    """(1, 1+N, 2) centres of the patch grid's cells in [0, 1]^2 (row, column); the class token at 0.5."""
    rows, cols = grid
    r = (torch.arange(rows, device=device, dtype=torch.float32) + 0.5) / rows
    c = (torch.arange(cols, device=device, dtype=torch.float32) + 0.5) / cols
    pos = torch.stack(torch.meshgrid(r, c, indexing="ij"), dim=-1).reshape(-1, 2)
    return torch.cat([pos.new_full((1, 2), 0.5), pos])[None]


def virtual_coordinates(n: int, device: torch.device | str = "cpu") -> Tensor:
    """Dynamic Virtual Coordinates: (n, 2) positions of n tokens laid row-major on a ceil(sqrt n) grid."""
    hv = math.ceil(math.sqrt(n))
    wv = math.ceil(n / hv)
    i = torch.arange(n, device=device)
    return torch.stack([(i // wv + 0.5) / hv, (i % wv + 0.5) / wv], dim=-1).float()


def knn_indices(coords: Tensor, k: int) -> Tensor:
    """(..., n, k) indices of each point's k nearest points (itself included; ties broken by index)."""
    dist = (coords[..., :, None, :] - coords[..., None, :, :]).square().sum(-1)
    return dist.argsort(dim=-1, stable=True)[..., : min(k, coords.shape[-2])]


def virtual_knn(n: int, k: int, device: torch.device | str = "cpu") -> Tensor:
    """k nearest neighbours on the virtual grid, from exact integer distances so that ties (which the
    regular grid is full of) break by index rather than by floating-point noise."""
    hv = math.ceil(math.sqrt(n))
    wv = math.ceil(n / hv)
    i = torch.arange(n, device=device)
    row, col = i // wv, i % wv
    # squared distance scaled by (hv * wv)^2: (d_row * wv)^2 + (d_col * hv)^2
    dist = ((row[:, None] - row[None]) * wv).square() + ((col[:, None] - col[None]) * hv).square()
    return dist.argsort(dim=-1, stable=True)[:, : min(k, n)]


_NEIGHBOURS: dict[tuple[int, int, str], tuple[Tensor, Tensor]] = {}


def virtual_neighbourhood(n: int, k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Cached (coords (n, 2), neighbours (n, k)) of the virtual grid: they depend on n alone."""
    key = (n, k, str(device))
    if key not in _NEIGHBOURS:
        _NEIGHBOURS[key] = virtual_coordinates(n, device), virtual_knn(n, k, device)
    return _NEIGHBOURS[key]
