"""What a merging method merges, block by block: statistics that explain accuracy differences between methods.

`MergeRecorder` wraps a block's reducer, lets it run unchanged and records, for the tokens it merged (those
whose group after the block holds more than one token):

- `merged_fraction`: share of the patch tokens that took part in a merge;
- `key_cosine`: cosine of each merged token's head-averaged key to the mean key of the rest of its group
  (1 = identical tokens merged; ToMe picks the most similar pairs its split allows);
- `distance`: twice the distance, in patches, from each merged token's centroid to its group's centroid
  (about the distance between the two tokens of a pair);
- `attention_ratio`: the merged tokens' share of the class token's attention over their share of tokens
  (below 1: the method merges tokens the class token attends to less than average);
- for reducers with a PR-Degree (STM-ReID's `assess`): `pr_decades` (log10 of the 95th over the 5th
  percentile of the PR-Degree in an image) and the spread, over each A token's candidates, of the two
  factors of log F (Eq. 10): `spread_log_fsim` (the similarity term of each A token's best candidate) and
  `spread_log_fres` (delta2 times the response term); when the second is the larger, responsiveness decides
  the merges rather than similarity.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import TokenReducer, TokenState


class MergeRecorder(TokenReducer):
    """A reducer that runs `inner` and appends one record of merge statistics per call to `records`."""

    def __init__(self, inner: TokenReducer, block: int, records: list[dict[str, float]]):
        self.inner, self.block, self.records = inner, block, records
        for name in ("needs_pos", "needs_block_input", "may_empty", "cls_head_only", "export_refusal"):
            setattr(self, name, getattr(inner, name))
        self.needs_cls_attn = True  # the attention statistics need it; a reducer that does not ignores it

    def num_out(self, num_tokens: int) -> int:
        return self.inner.num_out(num_tokens)

    def matching_flops(self, num_tokens: int, dim: int, heads: int) -> int:
        return self.inner.matching_flops(num_tokens, dim, heads)

    def __call__(self, x: Tensor, keys: Tensor, cls_attn: Tensor | None, state: TokenState) -> Tensor:
        if self.num_out(x.shape[1]) == x.shape[1]:
            return x
        state.init(x)
        before = state.source.clone()
        out = self.inner(x, keys, cls_attn, state)
        record = {"block": self.block, **merge_statistics(before, state.source, keys, cls_attn, state.grid)}
        if hasattr(self.inner, "assess") and cls_attn is not None:
            record.update(response_statistics(self.inner, keys, cls_attn, state))
        self.records.append(record)
        return out


def merge_statistics(before: Tensor, after: Tensor, keys: Tensor, cls_attn: Tensor | None,
                     grid: tuple[int, int]) -> dict[str, float]:
    """Merge statistics of one block from the source maps before (B, T, P) and after (B, T', P) it, the
    block's keys (B, H, T, d) and class-token attention (B, H, T) (module docstring)."""
    owner = (after @ before.transpose(1, 2)).argmax(1)  # (B, T): the token after the block that holds each one
    groups = F.one_hot(owner, after.shape[1]).to(before.dtype)  # (B, T, T')
    member_of = groups.sum(1).gather(1, owner)  # (B, T): size of each token's group, in tokens
    merged = member_of > 1
    merged[:, 0] = False  # the class token holds no patches and is never merged
    k = F.normalize(keys.float().mean(1), dim=-1)
    group_sum = groups.transpose(1, 2) @ k
    mine = group_sum.gather(1, owner[..., None].expand_as(k))
    to_rest = ((k * mine).sum(-1) - 1) / (member_of - 1).clamp_min(1)
    ys, xs = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()], -1).to(before)
    centroid = (before @ coords) / before.sum(-1, keepdim=True).clamp_min(1e-9)
    group_centroid = (groups.transpose(1, 2) @ centroid) / groups.sum(1)[..., None].clamp_min(1)
    distance = (centroid - group_centroid.gather(1, owner[..., None].expand_as(centroid))).norm(dim=-1)
    stats = {"tokens_in": float(before.shape[1]), "tokens_out": float(after.shape[1]),
             "merged_fraction": merged[:, 1:].float().mean().item(),
             "key_cosine": to_rest[merged].mean().item(), "distance": 2 * distance[merged].mean().item()}
    if cls_attn is not None:
        attn = cls_attn.float().mean(1)[:, 1:]
        share = (attn * merged[:, 1:]).sum(1) / attn.sum(1)
        stats["attention_ratio"] = (share / merged[:, 1:].float().mean(1).clamp_min(1e-9)).mean().item()
    return stats


def response_statistics(reducer: TokenReducer, keys: Tensor, cls_attn: Tensor, state: TokenState) -> dict[str, float]:
    """PR-Degree range and the spreads of the CC-Function's two factors (module docstring) for a reducer with
    `assess` (STM-ReID), on the alternating split of the current tokens (the scale, not the exact pairs)."""
    score = reducer.assess(cls_attn, state).float().clamp_min(1e-12)  # (B, n)
    log_s = score.log10()
    decades = log_s.quantile(0.95, dim=1) - log_s.quantile(0.05, dim=1)
    k = F.normalize(keys.transpose(1, 2).flatten(2)[:, 1:].float(), dim=-1)
    f_sim = ((k[:, 0::2] @ k[:, 1::2].transpose(1, 2)) + 1) / 2
    s_hat = score.amin(1, keepdim=True) / score
    f_res = s_hat[:, 0::2, None] * s_hat[:, None, 1::2]
    return {"pr_decades": decades.mean().item(),
            "spread_log_fsim": f_sim.amax(-1).clamp_min(1e-12).log().std().item(),
            "spread_log_fres": (reducer.delta2 * f_res.log()).std().item()}


@torch.no_grad()
def record_merges(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> dict[int, dict[str, float]]:
    """Run a reid_lite TransReID (with reducers attached) over (images, camera ids) batches and return, per
    1-based block, the batch-averaged merge statistics. The model's reducers and tracing are restored after;
    its outputs are those of the unwrapped reducers."""
    reducers, prop_attn, tracing = model.reducers, model.prop_attn, model.trace_source
    if not reducers:
        raise ValueError("the model reduces no tokens: attach a merging method first")
    records: list[dict[str, float]] = []
    model.set_reducers({i: MergeRecorder(r, i + 1, records) for i, r in reducers.items()}, prop_attn)
    model.trace_source = True
    try:
        model.eval()
        for images, cams in batches:
            model(images, cam_label=cams)
    finally:
        model.set_reducers(reducers, prop_attn)
        model.trace_source = tracing
    per_block: dict[int, list[dict[str, float]]] = {}
    for rec in records:
        per_block.setdefault(int(rec["block"]), []).append(rec)
    return {b: {key: sum(r[key] for r in recs) / len(recs) for key in recs[0] if key != "block"}
            for b, recs in sorted(per_block.items())}
