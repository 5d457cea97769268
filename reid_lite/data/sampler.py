"""P x K identity sampler for triplet-loss training (TransReID's `RandomIdentitySampler`)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["RandomIdentitySampler", "TrainBatchSampler"]


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

    def _rng(self, epoch: int) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
        return np.random.default_rng([self.seed, epoch])

    def epoch_indices(self, epoch: int) -> list[int]:
        """The whole index sequence of `epoch` (a multiple of `batch_size` long), without advancing the counter."""
        rng = self._rng(epoch)
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
        return final

    def __iter__(self) -> Iterator[int]:
        final = self.epoch_indices(self.epoch)
        self.epoch += 1
        return iter(final)

    def __len__(self) -> int:
        return self.length


class TrainBatchSampler(Sampler[list[tuple[int, int]]]):
    """This process' share of each global training batch, every sample with its own augmentation seed.

    Every process computes the same epoch order from `(seed, epoch)`: P x K identity groups
    (`RandomIdentitySampler`, when `num_instances` is given) or a seeded permutation (softmax
    sampling). Global batch b is `order[b * B:(b + 1) * B]` (an incomplete last batch is dropped) and
    process `rank` of `world_size` takes the contiguous slice `[rank * B / W, (rank + 1) * B / W)` of it.
    Items are `(dataset index, seed)` pairs; `ImageDataset` runs the random augmentations of that
    sample under its seed. So which images a global batch holds, and how each is augmented, does not
    depend on the number of processes, on DataLoader workers, or on a resume in the middle of an epoch
    (`set_epoch(epoch, start_batch)` skips the batches already trained).
    """

    def __init__(self, data_source: Sequence[tuple], batch_size: int, num_instances: int | None, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of {world_size} processes")
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"SOLVER.IMS_PER_BATCH ({batch_size}) must be a positive multiple of the number of "
                             f"processes ({world_size}): it is the global batch, split evenly")
        self.identity = (RandomIdentitySampler(data_source, batch_size, num_instances, seed=seed)
                         if num_instances else None)
        self.num_samples = len(data_source)
        self.batch_size = batch_size
        self.local_batch_size = batch_size // world_size
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.epoch, self.start_batch = 1, 0
        self._cache: tuple[int, list[int], np.ndarray] | None = None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch the next pass yields, starting at global batch `start_batch` (a resume)."""
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def _order(self) -> tuple[list[int], np.ndarray]:
        if self._cache is None or self._cache[0] != self.epoch:
            if self.identity is not None:
                order = self.identity.epoch_indices(self.epoch)
            else:
                order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples).tolist()
            seeds = np.random.default_rng([self.seed, self.epoch, 1]).integers(0, 2**62, size=len(order))
            self._cache = (self.epoch, order, seeds)
        return self._cache[1], self._cache[2]

    def batches_in_epoch(self) -> int:
        """Number of complete global batches of the current epoch (from its first batch)."""
        return len(self._order()[0]) // self.batch_size

    def __len__(self) -> int:
        return max(0, self.batches_in_epoch() - self.start_batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order, seeds = self._order()
        lo = self.rank * self.local_batch_size
        for b in range(self.start_batch, self.batches_in_epoch()):
            s = b * self.batch_size + lo
            yield [(int(order[i]), int(seeds[i])) for i in range(s, s + self.local_batch_size)]
