"""Reducers with learned parameters (DTEM): where their weights live and how checkpoints carry them.

A learned reducer is a `TokenReducer` that is also an `nn.Module`; `attach_reducer` registers it on its
block as `reducer`, so its parameters are part of the model's state dict under
`<...>blocks.<i>.reducer.<name>` (`base.blocks.3.reducer.embed.weight` in a TransReID). They come from one
of three places, and loading is strict:

- the method's own weights file (MERGE.DTEM.WEIGHTS), read when the reducers are built;
- a fresh initialisation the user asked for (MERGE.DTEM.FRESH, to train one);
- the model checkpoint (TEST.WEIGHT, MODEL.PRETRAIN_PATH with 'self'), when it holds them.

Built without the first two, the reducers are pending (`weights_missing` says why); a checkpoint then must
supply them, or loading fails with that reason. A checkpoint that holds reducer weights for a model without
learned reducers (a DTEM-trained file evaluated with ToMe) loads without them.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from ..utils.checkpoint_file import CheckpointError, check_checkpoint_file, read_state_dict
from .base import TokenReducer

logger = logging.getLogger(__name__)

#: A learned reducer's parameter in any host's state dict: (block index, parameter name inside the reducer).
_REDUCER_KEY = re.compile(r"(?:^|\.)blocks\.(\d+)\.reducer\.(.+)$")


def learned_reducers(model: nn.Module) -> dict[str, TokenReducer]:
    """{module name: reducer} of the learned reducers registered in `model` (empty when none)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, TokenReducer) and isinstance(m, nn.Module)}


def learned_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The part of `model.state_dict()` that belongs to learned reducers (what an embedding file holds)."""
    prefixes = tuple(f"{name}." for name in learned_reducers(model))
    return {k: v for k, v in model.state_dict().items() if prefixes and k.startswith(prefixes)}


def reducer_entries(state: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """{block index: {parameter name: tensor}} of the learned-reducer keys of a state dict, whatever prefix the
    host model puts before `blocks.` (a TransReID's `base.`, none for a timm ViT)."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = _REDUCER_KEY.search(key)
        if m:
            out.setdefault(int(m.group(1)), {})[m.group(2)] = value
    return out


@lru_cache(maxsize=4)
def _read_entries(path: str, mtime_ns: int, size: int) -> dict[int, dict[str, torch.Tensor]]:
    return reducer_entries(read_state_dict(path))


def read_reducer_weights(path: str | Path) -> dict[int, dict[str, torch.Tensor]]:
    """The learned-reducer weights of a file (an embedding file or a full checkpoint), read weights-only
    (`read_state_dict`: CheckpointError for a missing, unreadable or unsafe file). Cached per file version:
    a GFLOPs search builds the reducers several times."""
    p = Path(path).expanduser()
    check_checkpoint_file(p)
    st = p.stat()
    entries = _read_entries(str(p.resolve()), st.st_mtime_ns, st.st_size)
    if not entries:
        raise CheckpointError(f"{p} holds no learned merging weights (no '*blocks.<i>.reducer.*' keys)")
    return entries


def load_reducer_weights(reducers: dict[int, nn.Module], entries: dict[int, dict[str, torch.Tensor]],
                         source: str) -> None:
    """Load {block: weights} into {block: reducer} strictly: the same blocks, names and shapes, else a
    CheckpointError listing every difference."""
    problems = []
    missing = sorted(set(reducers) - set(entries))
    extra = sorted(set(entries) - set(reducers))
    if missing:
        problems.append(f"no weights for block(s) {[i + 1 for i in missing]}")
    if extra:
        problems.append(f"weights for block(s) {[i + 1 for i in extra]} that do not merge here (MERGE.LAYERS)")
    for i in sorted(set(reducers) & set(entries)):
        own, theirs = reducers[i].state_dict(), entries[i]
        if set(own) != set(theirs):
            problems.append(f"block {i + 1}: keys {sorted(theirs)} vs {sorted(own)}")
        else:
            problems += [f"block {i + 1} {k}: {tuple(theirs[k].shape)} vs {tuple(v.shape)}"
                         for k, v in own.items() if v.shape != theirs[k].shape]
    if problems:
        raise CheckpointError(f"{source} does not match the learned merging of this model: " + "; ".join(problems))
    for i, reducer in reducers.items():
        reducer.load_state_dict(entries[i])


def resolve_learned_state(model: nn.Module, state: dict[str, torch.Tensor],
                          source: str) -> tuple[dict[str, torch.Tensor], bool]:
    """Prepare a checkpoint's state dict for a strict load into `model`, as far as learned reducers go.

    - model without learned reducers: the checkpoint's reducer keys are dropped (logged);
    - checkpoint with reducer keys: they must fit the model's reducers exactly (checked by the strict load);
      a reducer whose weights came from its own file (MERGE.DTEM.WEIGHTS) makes this ambiguous: error;
    - checkpoint without them: the model's own are kept when they were loaded or freshly made on request,
      else CheckpointError with the reducers' reason (`weights_missing`).
    Returns (the state dict to load, whether it brings the learned weights: then call `mark_loaded` once it
    is loaded); raises `CheckpointError`.
    """
    reducers = learned_reducers(model)
    ours = {k for k in state if _REDUCER_KEY.search(k)}
    if not reducers:
        if ours:
            logger.info("%s: ignoring its learned merging weights (%d tensors): this model's merging has none",
                        source, len(ours))
        return {k: v for k, v in state.items() if k not in ours}, False
    if ours:
        from_file = sorted({getattr(r, "weights_source", "") for r in reducers.values()} - {"", "fresh", "checkpoint"})
        if from_file:
            raise CheckpointError(f"{source} holds learned merging weights and {from_file[0]} gives them too: clear "
                                  "one (e.g. MERGE.DTEM.WEIGHTS '') so that it is clear which is used")
        return state, True
    pending = [r.weights_missing for r in reducers.values() if r.weights_missing]
    if pending:
        raise CheckpointError(f"{source} holds no learned merging weights (keys *blocks.<i>.reducer.*): {pending[0]}")
    return {**state, **learned_state_dict(model)}, False


def mark_loaded(model: nn.Module) -> None:
    """Record that `model`'s learned reducers now hold the weights of the checkpoint just loaded."""
    for r in learned_reducers(model).values():
        r.weights_missing, r.weights_source = None, "checkpoint"


def check_learned_ready(reducers: dict[int, TokenReducer]) -> None:
    """Raise ValueError with the reason when a learned reducer of `reducers` has no weights yet."""
    for reducer in reducers.values():
        if reducer.weights_missing:
            raise ValueError(reducer.weights_missing)
