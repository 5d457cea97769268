"""Reduction schedules: which blocks reduce, by how much, and a solver for a GFLOPs budget."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .base import TokenReducer
from .evit import EViT
from .stm import STM
from .tome import ToMe

METHODS = ("none", "tome", "evit", "stm")


def per_layer_r(merge_cfg, depth: int) -> dict[int, int]:
    """{0-based block index: r} from MERGE.R / MERGE.R_LIST / MERGE.LAYERS (1-based in the config)."""
    layers = list(merge_cfg.LAYERS)
    bad = [i for i in layers if not 1 <= i <= depth]
    if bad:
        raise ValueError(f"MERGE.LAYERS {bad} outside the {depth} blocks that can reduce tokens (1..{depth})")
    if len(merge_cfg.R_LIST):
        if len(merge_cfg.R_LIST) != len(layers):
            raise ValueError(f"MERGE.R_LIST has {len(merge_cfg.R_LIST)} entries for {len(layers)} MERGE.LAYERS")
        rs = [int(r) for r in merge_cfg.R_LIST]
    else:
        rs = [int(merge_cfg.R)] * len(layers)
    if any(r < 0 for r in rs):
        raise ValueError(f"r must be >= 0, got {rs}")
    return {i - 1: r for i, r in zip(layers, rs)}


def build_reducers(merge_cfg, depth: int, r_override: int | None = None) -> dict[int, TokenReducer]:
    """One reducer per reducing block, {0-based block index: reducer}, as MERGE configures them.

    `depth` is the number of blocks whose tokens may be reduced (the backbone's own blocks; with JPM
    the last block belongs to the branches and is excluded). `r_override` replaces every r (solver).
    """
    method = merge_cfg.METHOD.lower()
    if method not in METHODS:
        raise ValueError(f"unknown MERGE.METHOD {merge_cfg.METHOD!r}; choose one of {', '.join(METHODS)}")
    if method == "none":
        return {}
    if method == "evit":
        layers = list(merge_cfg.EVIT.LAYERS)
        bad = [i for i in layers if not 1 <= i <= depth]
        if bad:
            raise ValueError(f"MERGE.EVIT.LAYERS {bad} outside blocks 1..{depth}")
        return {i - 1: EViT(merge_cfg.EVIT.KEEP_RATE, merge_cfg.EVIT.FUSE_TOKEN) for i in layers}
    rs = per_layer_r(merge_cfg, depth)
    if r_override is not None:
        rs = {i: r_override for i in rs}
    if method == "tome":
        return {i: ToMe(r) for i, r in rs.items() if r > 0}
    s = merge_cfg.STM
    return {
        i: STM(r, s.ALPHA, s.K, s.DELTA1, s.DELTA2, s.DSE, s.CCF, s.PRN, s.ENTROPY, s.COORDS, s.KEYS)
        for i, r in rs.items()
        if r > 0
    }


def token_counts(num_tokens: int, depth: int, reducers: dict[int, TokenReducer]) -> list[tuple[int, int]]:
    """(tokens seen by attention, tokens after reduction) for each of `depth` blocks."""
    counts = []
    for i in range(depth):
        out = reducers[i].num_out(num_tokens) if i in reducers else num_tokens
        counts.append((num_tokens, out))
        num_tokens = out
    return counts


def solve_r(gflops_of_r: Callable[[int], float], target: float, r_max: int) -> int:
    """Smallest constant r whose GFLOPs are at most `target` (GFLOPs fall as r grows)."""
    lo, hi = 0, r_max
    if gflops_of_r(hi) > target:
        raise ValueError(f"no r <= {r_max} reaches {target} GFLOPs (r={r_max} gives {gflops_of_r(hi):.2f})")
    while lo < hi:
        mid = (lo + hi) // 2
        if gflops_of_r(mid) <= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


def parse_methods(spec: str | Sequence[str]) -> list[str]:
    """'none,tome,stm' -> ['none', 'tome', 'stm'], each checked against the known methods."""
    names = [m.strip().lower() for m in (spec.split(",") if isinstance(spec, str) else spec) if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    return names
