"""Exportable tensor primitives for the merge steps: a stable sort without a sort op, grouped max/first.

ONNX exporters have no stable sort (`argsort(stable=True)` fails to export) and ONNX's ScatterElements
has no 'mean' reduction and needs opset 18 for 'max'. The replacements use only comparisons, sums,
cumulative sums, plain scatters and reductions, and give exactly the results of the ops they replace
(the permutations are the same integers, the maxima the same floats). The sorts keep PyTorch's own
kernel in eager mode and under torch.compile (it is faster there: the rank count is O(n^2)); only
while a graph is being exported (`torch.compiler.is_exporting()`) is the rank count traced instead.
"""

from __future__ import annotations

import torch
from torch import Tensor


def stable_rank(x: Tensor, descending: bool = False) -> Tensor:
    """Position of each element of `x` (..., n) in its stable sort along the last dim (int64, same shape).

    rank_i = #{j: x_j before x_i} + #{j < i: x_j == x_i}: O(n^2) comparisons, cheap for token counts
    (n <= a few hundred) and free of sort/top-k ops, whose tie order exporters and runtimes do not fix.
    `x` must be free of NaN.
    """
    xi, xj = x[..., :, None], x[..., None, :]
    n = x.shape[-1]
    ahead = xj > xi if descending else xj < xi
    idx = torch.arange(n, device=x.device)
    earlier_tie = (xj == xi) & (idx[None, :] < idx[:, None])
    return (ahead | earlier_tie).sum(dim=-1)


def inverse_permutation(perm: Tensor) -> Tensor:
    """inv with inv[..., perm[..., i]] = i for permutations along the last dim (a plain scatter)."""
    idx = torch.arange(perm.shape[-1], device=perm.device).expand_as(perm)
    return torch.empty_like(perm).scatter(-1, perm, idx)


def stable_argsort(x: Tensor, descending: bool = False) -> Tensor:
    """`torch.argsort(x, dim=-1, descending=descending, stable=True)`, traced as a rank count for export."""
    if torch.compiler.is_exporting():
        return inverse_permutation(stable_rank(x, descending))
    return torch.argsort(x, dim=-1, descending=descending, stable=True)


def stable_ranks(x: Tensor, descending: bool = False) -> Tensor:
    """Each element's position in the stable sort of `x` along the last dim: the inverse of the stable
    argsort eagerly, the rank count (`stable_rank`) while exporting."""
    if torch.compiler.is_exporting():
        return stable_rank(x, descending)
    return inverse_permutation(torch.argsort(x, dim=-1, descending=descending, stable=True))


def top_and_rest(x: Tensor, k: int, descending: bool = True) -> tuple[Tensor, Tensor]:
    """(indices of the k first elements of x (B, n) in stable sort order, the others in index order).

    `order[:, :k]` and `order[:, k:].sort().values` for order = stable argsort; traced for export
    without sorting (`split_ranked`).
    """
    if torch.compiler.is_exporting():
        return split_ranked(stable_rank(x, descending), k)
    order = torch.argsort(x, dim=-1, descending=descending, stable=True)
    return order[:, :k], order[:, k:].sort(dim=-1).values


def split_ranked(rank: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(the k first elements in rank order, the others in index order) from a stable `rank` (B, n).

    What `order[:, :k]` and `order[:, k:].sort().values` give for `order` = the inverse of `rank`,
    without sorting integers: the others' positions come from a cumulative count.
    """
    n = rank.shape[-1]
    rest = rank >= k
    slot = torch.where(rest, rest.cumsum(dim=-1) - 1, rank + (n - k))
    order = inverse_permutation(slot)
    return order[:, n - k:], order[:, : n - k]


def grouped_max(values: Tensor, groups: Tensor) -> Tensor:
    """For each j, the max of `values` (B, r) over the i with groups[i] == groups[j] (B, r).

    Exact for non-negative values (norms): the masked-out entries are 0 and the group holds j itself.
    Replaces a scatter_reduce('amax') into the groups followed by a gather back.
    """
    same = groups[:, :, None] == groups[:, None, :]
    return torch.where(same, values[:, None, :], values.new_zeros(())).amax(dim=-1)


def group_first(groups: Tensor) -> Tensor:
    """For each i of `groups` (B, n) (values in 0..n-1), the least j with groups[j] == groups[i] (B, n).

    Eagerly a scatter 'amin' into the groups and a gather back; while exporting (ONNX's ScatterElements
    needs opset 18 for 'min') a comparison matrix, O(n^2) like `grouped_max`.
    """
    n = groups.shape[-1]
    ar = torch.arange(n, device=groups.device)
    if torch.compiler.is_exporting():
        same = groups[:, :, None] == groups[:, None, :]
        return torch.where(same, ar, n).amin(dim=-1)
    first = torch.full_like(groups, n).scatter_reduce(1, groups, ar.expand_as(groups), reduce="amin")
    return first.gather(1, groups)
