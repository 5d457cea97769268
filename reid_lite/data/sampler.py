"""P x K identity sampler for triplet-loss training (TransReID's `RandomIdentitySampler`)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["RandomIdentitySampler"]


class RandomIdentitySampler(Sampler[int]):
    """Yield indices in groups of `num_instances` images of one identity, P identities per batch.

    With `batch_size = P * num_instances`, every batch holds P identities x K images. Identities
    with fewer than K images are sampled with replacement; surplus images that do not fill a
    group of K are dropped for the epoch, as in TransReID.

    Determinism: with `seed` set, epoch e draws from `numpy.random.default_rng([seed, e])`, and
    the epoch counter advances after each pass (or is set with `set_epoch`), so two samplers
    with the same seed give the same sequence. With `seed=None` each pass draws its seed from
    torch's global generator, so `torch.manual_seed` makes it reproducible.

    `len()` is TransReID's estimate; the real count can be lower when an epoch ends with fewer
    than P identities that still have a group left.
    """

    def __init__(self, data_source: Sequence[tuple], batch_size: int, num_instances: int,
                 seed: int | None = None) -> None:
        if num_instances < 1 or batch_size < num_instances or batch_size % num_instances:
            raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of "
                             f"num_instances ({num_instances})")
        self.batch_size = batch_size
        self.num_instances = num_instances
        self.num_pids_per_batch = batch_size // num_instances
        self.seed = seed
        self.epoch = 0
        index_dic: dict[int, list[int]] = defaultdict(list)
        for index, record in enumerate(data_source):
            index_dic[int(record[1])].append(index)
        self.index_dic = dict(index_dic)
        self.pids = sorted(self.index_dic)
        self.length = sum(max(len(v), num_instances) // num_instances * num_instances
                          for v in self.index_dic.values())

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next pass yields (only meaningful with a seed)."""
        self.epoch = epoch

    def _rng(self) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
        return np.random.default_rng([self.seed, self.epoch])

    def __iter__(self) -> Iterator[int]:
        rng = self._rng()
        self.epoch += 1
        k = self.num_instances
        groups: dict[int, list[list[int]]] = {}
        for pid in self.pids:
            idxs = np.asarray(self.index_dic[pid])
            if len(idxs) < k:
                idxs = rng.choice(idxs, size=k, replace=True)
            idxs = rng.permutation(idxs)
            n_groups = len(idxs) // k
            groups[pid] = [idxs[g * k:(g + 1) * k].tolist() for g in range(n_groups)]

        available = list(self.pids)
        final: list[int] = []
        while len(available) >= self.num_pids_per_batch:
            chosen = rng.choice(len(available), size=self.num_pids_per_batch, replace=False)
            for pid in [available[i] for i in chosen]:
                final.extend(groups[pid].pop(0))
                if not groups[pid]:
                    available.remove(pid)
        return iter(final)

    def __len__(self) -> int:
        return self.length
