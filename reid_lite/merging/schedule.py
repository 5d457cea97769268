"""Reduction schedules: which blocks reduce, by how much, and the monotone search that meets a budget."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from .base import TokenReducer, bipartite_r
from .registry import method_of


def check_layers(layers: Sequence[int], depth: int, key: str = "MERGE.LAYERS") -> list[int]:
    """1-based block indices, each checked to lie in 1..depth (ValueError naming `key` otherwise)."""
    layers = [int(i) for i in layers]
    bad = [i for i in layers if not 1 <= i <= depth]
    if bad:
        raise ValueError(f"{key} {bad} outside the {depth} blocks that can reduce tokens (1..{depth})")
    return layers


def per_layer_r(merge_cfg, depth: int) -> dict[int, int]:
    """{0-based block index: r} from MERGE.R / MERGE.R_LIST / MERGE.LAYERS (1-based in the config)."""
    layers = check_layers(merge_cfg.LAYERS, depth)
    if len(merge_cfg.R_LIST):
        if len(merge_cfg.R_LIST) != len(layers):
            raise ValueError(f"MERGE.R_LIST has {len(merge_cfg.R_LIST)} entries for {len(layers)} MERGE.LAYERS")
        rs = [int(r) for r in merge_cfg.R_LIST]
    else:
        rs = [int(merge_cfg.R)] * len(layers)
    if any(r < 0 for r in rs):
        raise ValueError(f"r must be >= 0, got {rs}")
    return {i - 1: r for i, r in zip(layers, rs)}


def per_layer_k(node, depth: int, prefix: str) -> dict[int, int]:
    """{0-based block: K} from a method node's K / K_LIST / LAYERS (`prefix` names it in errors, e.g.
    'MERGE.LOTM'): K_LIST, one count per layer, overrides K when set."""
    layers = check_layers(node.LAYERS, depth, f"{prefix}.LAYERS")
    ks = [int(k) for k in node.K_LIST] if len(node.K_LIST) else [int(node.K)] * len(layers)
    if len(ks) != len(layers):
        raise ValueError(f"{prefix}.K_LIST has {len(ks)} entries for {len(layers)} {prefix}.LAYERS")
    return {i - 1: k for i, k in zip(layers, ks)}


def _overflow(rs: dict[int, int], num_tokens: int) -> tuple[int, int, int] | None:
    """The first (0-based block, tokens it receives, largest r it allows) whose r bipartite matching
    cannot merge (at most half of the non-class tokens), or None when every block can."""
    n = num_tokens
    for i in sorted(rs):
        if bipartite_r(n, rs[i]) < rs[i]:
            return i, n, bipartite_r(n, n)
        n -= rs[i]
    return None


def largest_r(blocks: Sequence[int], num_tokens: int) -> int:
    """The largest constant r that every one of `blocks` (0-based) can merge when `num_tokens` tokens
    (class token included) enter the first block."""
    r = bipartite_r(num_tokens, num_tokens)
    while r > 0 and _overflow(dict.fromkeys(blocks, r), num_tokens) is not None:
        r -= 1
    return r


def check_r(merge_cfg, rs: dict[int, int], num_tokens: int) -> None:
    """Raise ValueError when a block is asked to merge more tokens than it can, naming the block and the
    largest allowed r: silently merging fewer would run (and record) another schedule than configured."""
    over = _overflow(rs, num_tokens)
    if over is None:
        return
    block, n, cap = over
    where = f"block {block + 1} receives {n} tokens (the class token and {n - 1} patches) and can merge at most {cap}"
    if len(merge_cfg.R_LIST):
        raise ValueError(f"MERGE.R_LIST asks block {block + 1} to merge {rs[block]} tokens, but {where}")
    layers = [i + 1 for i in sorted(rs)]
    raise ValueError(f"MERGE.R {rs[block]} is too large: {where}; the largest r for MERGE.LAYERS {layers} is "
                     f"{largest_r(sorted(rs), num_tokens)}")


def build_reducers(merge_cfg, depth: int, r_override: int | None = None,
                   num_tokens: int | None = None, cls_head: bool = False) -> dict[int, TokenReducer]:
    """One reducer per reducing block, {0-based block index: reducer}, as MERGE configures them.

    `depth` is the number of blocks whose tokens may be reduced (the backbone's own blocks; with JPM
    the last block belongs to the branches and is excluded). `r_override` replaces every r (solver).
    With `num_tokens` (tokens entering the first block, class token included) an r that a block cannot
    merge is a ValueError naming the largest allowed r (`check_r`), for methods that merge by bipartite
    matching (those whose GFLOPs target is met through r), and each reducer's own `check_tokens` runs
    (LoTM's and DHTM's K). The plugins of MERGE.PLUGINS are imported first
    (a config read from a stored gallery names them). `cls_head`: the last reducible block feeds a head
    that reads the class token alone (no JPM); otherwise a reducer declaring `cls_head_only` is replaced by
    its `fallback`.
    """
    method = method_of(merge_cfg)
    rs = None
    if method.uses_r:
        rs = per_layer_r(merge_cfg, depth)
        if r_override is not None:
            rs = {i: r_override for i in rs}
        if num_tokens is not None and method.gflops_knob == "r":
            check_r(merge_cfg, {i: r for i, r in rs.items() if r > 0}, num_tokens)
    reducers = method.build(merge_cfg, depth, rs)
    for i, reducer in list(reducers.items()):
        if reducer.cls_head_only and not (cls_head and i == depth - 1):
            if reducer.fallback is None:
                del reducers[i]
            else:
                reducers[i] = reducer.fallback
    bad = [i + 1 for i in reducers if not 0 <= i < depth]
    if bad:
        raise ValueError(f"MERGE.METHOD {method.name!r} put reducers in blocks {bad}, outside 1..{depth}")
    if num_tokens is not None:
        for i, (t_in, _) in enumerate(token_counts(num_tokens, depth, reducers)):
            if i in reducers:
                reducers[i].check_tokens(t_in, i + 1)
    return reducers


def token_counts(num_tokens: int, depth: int, reducers: dict[int, TokenReducer]) -> list[tuple[int, int]]:
    """(tokens seen by attention, tokens after reduction) for each of `depth` blocks."""
    counts = []
    for i in range(depth):
        out = reducers[i].num_out(num_tokens) if i in reducers else num_tokens
        counts.append((num_tokens, out))
        num_tokens = out
    return counts


def reduction_schedule(reducers: dict[int, TokenReducer], num_tokens: int, depth: int) -> list[dict[str, int]]:
    """The schedule that runs, for records: one {block (1-based), tokens_in, tokens_out} per reducing block."""
    counts = token_counts(num_tokens, depth, reducers)
    return [{"block": i + 1, "tokens_in": counts[i][0], "tokens_out": counts[i][1]} for i in sorted(reducers)]


def first_fit(fits: Callable[[int], bool], lo: int, hi: int) -> int:
    """Smallest step s in [lo, hi] with fits(s), for a monotone `fits` (False ... False True ... True) that holds
    at `hi`; binary search, so each step is evaluated at most once per halving."""
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


class BudgetError(ValueError):
    """A budget no setting of the knob meets within the tolerance; the message names the reachable range."""


def search_knob(cost: Callable[[float], float], target: float, mildest: float, strongest: float,
                integer: bool = False, stride: int = 1, tol: float = 0.01, digits: int = 4,
                what: str = "the method", describe: Callable[[float], str] = "{:g}".format, unit: str = "GFLOPs",
                max_halvings: int = 60) -> tuple[float, float]:
    """The mildest knob value whose cost is at most `target` and within `tol` of it: (value, its cost).

    One monotone search for every method's knob: `cost` must not rise from `mildest` (the least reduction)
    towards `strongest` (the most), whichever of the two is the larger number, so the budget is a ceiling
    and the value returned is the most accurate setting under it (cost in [target (1 - tol), target]).
    Integer knobs: binary search, first over every `stride`-th value (the preferred settings: constant
    r), then between the two preferred values around the target when the preferred one is off by more
    than `tol`. Real knobs: bisection (at most `max_halvings` steps) until the cost is within `tol`, the
    value rounded to `digits` decimals (towards the stronger end) where the rounded value still meets the
    budget. `unit` names the cost in messages (GFLOPs; ms for the latency budget).
    Raises BudgetError naming the reachable range when the target lies outside it, or the two
    neighbouring settings when the knob's steps jump over the tolerance window (`describe` names a value).
    """
    memo: dict[float, float] = {}

    def c(v: float) -> float:
        if v not in memo:
            memo[v] = float(cost(v))
        return memo[v]

    low = target * (1 - tol)
    top, bottom = c(mildest), c(strongest)
    if bottom > target or top < low:
        raise BudgetError(f"{what} cannot meet {target:.4g} {unit} within {tol:.0%}: its settings reach "
                          f"{bottom:.4g} {unit} ({describe(strongest)}) to {top:.4g} ({describe(mildest)})")
    if top <= target:
        return mildest, top
    sign = 1 if strongest > mildest else -1
    if integer:
        steps = int(round(abs(strongest - mildest)))

        def value(s: int) -> float:
            return mildest + sign * min(s, steps)

        def fits(s: int) -> bool:
            return c(value(s)) <= target

        coarse = first_fit(lambda k: fits(k * stride), 1, -(-steps // stride))  # a multiple of stride, or the end
        s = min(coarse * stride, steps)
        if c(value(s)) < low and stride > 1:
            s = first_fit(fits, (coarse - 1) * stride + 1, s)
        v, prev = value(s), value(s - 1)
    else:
        mild, strong = float(mildest), float(strongest)
        for _ in range(max_halvings):
            if c(strong) >= low or abs(mild - strong) < 1e-9:
                break
            mid = (mild + strong) / 2
            mild, strong = (mild, mid) if c(mid) <= target else (mid, strong)
        scale = 10**digits  # round towards the stronger end, where the cost stays under the budget
        rounded = (math.ceil(strong * scale) if sign > 0 else math.floor(strong * scale)) / scale
        v, prev = (rounded if low <= c(rounded) <= target else strong), mild
    if c(v) < low:
        raise BudgetError(f"{what} cannot meet {target:.4g} {unit} within {tol:.0%}: its settings jump from "
                          f"{c(prev):.4g} {unit} ({describe(prev)}) to {c(v):.4g} ({describe(v)})")
    return v, c(v)
