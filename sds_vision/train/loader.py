"""Deterministic, resumable data loading.

The order of an epoch is a function of (seed, epoch) only, and every sample is loaded
with all random generators (python, numpy, torch CPU and any albumentations `Compose`
found in the dataset) seeded from (seed, epoch, position). So augmentation does not
depend on the number of workers, and a run resumed in the middle of an epoch sees
exactly the batches an uninterrupted run would: the sampler just starts further in.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from .config import TrainError


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    state = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class EpochSampler(Sampler):
    """Shuffles per epoch, shards across ranks (padding like DistributedSampler so every
    rank runs the same number of steps) and yields `(index, sample_seed)` pairs."""

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1):
        if n == 0:
            raise TrainError("the training set is empty")
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.per_rank = math.ceil(n / world_size)
        self.epoch = 0
        self.start = 0  # samples of this rank's shard to skip (mid-epoch resume)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.per_rank - self.start

    def __iter__(self):
        g = _epoch_generator(self.seed, self.epoch)
        order = torch.randperm(self.n, generator=g)
        seeds = torch.randint(0, 2**31 - 1, (self.n,), generator=g)
        total = self.per_rank * self.world_size
        if total > self.n:  # pad by wrapping around
            reps = math.ceil(total / self.n)
            order, seeds = order.repeat(reps)[:total], seeds.repeat(reps)[:total]
        mine = range(self.rank, total, self.world_size)
        for pos in list(mine)[self.start:]:
            # the seed is tied to the position, so padded duplicates get a fresh seed too
            yield int(order[pos]), int(seeds[pos]) + pos


def _find_seedables(obj, depth: int = 4, seen=None) -> list:
    """Objects below `obj` with their own random state (albumentations Compose)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth < 0 or isinstance(obj, (str, bytes, int, float, torch.Tensor,
                                                           np.ndarray)):
        return []
    seen.add(id(obj))
    if callable(getattr(obj, "set_random_seed", None)) and hasattr(obj, "random_generator"):
        return [obj]  # Compose propagates the seed to its children itself
    children = []
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj) if len(obj) <= 64 else []  # skip sample lists
    elif hasattr(obj, "__dict__"):
        children = list(vars(obj).values())
        for name in ("func", "args", "keywords"):  # functools.partial
            if hasattr(obj, name) and not isinstance(obj, type):
                children.append(getattr(obj, name))
    out = []
    for c in children:
        out += _find_seedables(c, depth - 1, seen)
    return out


class SeededDataset(Dataset):
    """Wraps a map-style dataset; `ds[(index, seed)]` loads sample `index` under `seed`."""

    def __init__(self, ds):
        self.ds = ds
        self._seedables = _find_seedables(ds)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, item):
        index, seed = item
        # TransformedDataset reseeds its transform once per worker on first use; let it
        # do that now so it cannot override the per-sample seed below
        getattr(self.ds, "_maybe_reseed", lambda: None)()
        if get_worker_info() is not None:
            _seed_all(seed, self._seedables)
            return self.ds[index]
        # in the main process: leave the training RNG streams untouched
        states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
        try:
            _seed_all(seed, self._seedables)
            return self.ds[index]
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.random.set_rng_state(states[2])


def _seed_all(seed: int, seedables) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.random.default_generator.manual_seed(seed)
    for s in seedables:
        s.set_random_seed(seed % 2**32)


class ShardSampler(Sampler):
    """Rank `r` evaluates samples r, r+W, ... (no padding, so metrics count each once)."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, n, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


def is_gatherable(ds) -> bool:
    """A dataset that serves whole batches itself: ``ds.gather(index_tensor) -> (x, y)`` on
    its own device (the benchmark harness's decoded splits). The engine then batches by
    index, with no DataLoader, worker processes or per-batch host-to-device copies."""
    return callable(getattr(ds, "gather", None))


class TrainBatches:
    """The training batches of one epoch for this rank, resumable at a batch boundary.

    ``set_epoch(epoch, start)`` skips the first ``start`` batches (mid-epoch resume).
    ``batches_per_epoch`` counts full epochs: with ``drop_last`` the last partial batch
    is dropped (as the VTAB references do), else it is kept.
    """

    def __init__(self, ds, batch_size: int, seed: int, num_workers: int, rank: int,
                 world_size: int, pin_memory: bool, drop_last: bool):
        self.ds, self.batch_size, self.drop_last = ds, batch_size, drop_last
        self.sampler = EpochSampler(len(ds), seed, rank, world_size)
        n = self.sampler.per_rank
        self.batches_per_epoch = n // batch_size if drop_last else math.ceil(n / batch_size)
        if self.batches_per_epoch == 0:
            raise TrainError(f"batch size {batch_size} is larger than the {n} training samples "
                             "of this process and the last partial batch is dropped")
        self.loader = None
        if not is_gatherable(ds):
            self.loader = DataLoader(SeededDataset(ds), batch_size=batch_size,
                                     sampler=self.sampler, num_workers=num_workers,
                                     pin_memory=pin_memory, drop_last=drop_last,
                                     persistent_workers=num_workers > 0,
                                     generator=torch.Generator().manual_seed(seed))

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.sampler.set_epoch(epoch, start=start * self.batch_size)

    def __iter__(self):
        if self.loader is not None:
            yield from self.loader
            return
        order = [i for i, _ in self.sampler]
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        for s in range(0, stop, self.batch_size):
            yield self.ds.gather(torch.tensor(order[s:s + self.batch_size]))


class _GatheredBatches:
    def __init__(self, ds, indices: list[int], batch_size: int):
        self.ds, self.idx, self.batch_size = ds, torch.tensor(indices, dtype=torch.long), batch_size

    def __iter__(self):
        for s in range(0, len(self.idx), self.batch_size):
            yield self.ds.gather(self.idx[s:s + self.batch_size])


def eval_batches(ds, batch_size: int, num_workers: int, rank: int, world_size: int,
                 pin_memory: bool):
    """Evaluation batches of this rank's shard (each sample once across ranks); iterable
    any number of times."""
    shard = ShardSampler(len(ds), rank, world_size)
    if is_gatherable(ds):
        return _GatheredBatches(ds, shard.indices, batch_size)
    return DataLoader(ds, batch_size=batch_size, sampler=shard, num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=num_workers > 0)
