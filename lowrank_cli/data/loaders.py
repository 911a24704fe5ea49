"""Loaders: the training order as a pure function of (seed, epoch, rank), so that a run resumes exactly."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lowrank_cli.data.images import TensorImages


class EpochSampler(Sampler[int]):
    """Shuffled indices for one process: permutation `seed + epoch`, every `world`-th from `rank`.

    Each process gets the same number of whole batches (the tail is dropped), and
    `set_epoch(epoch, start_batch)` resumes mid-epoch without touching any global RNG.
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0, shuffle: bool = True):
        self.n, self.batch_size, self.rank, self.world, self.seed, self.shuffle = n, batch_size, rank, world, seed, shuffle
        self.batches = (n // world) // batch_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch)) if self.shuffle else torch.arange(self.n)
        mine = order[self.rank :: self.world][: self.batches * self.batch_size]
        return iter(mine[self.start_batch * self.batch_size :].tolist())

    def __len__(self) -> int:
        return (self.batches - self.start_batch) * self.batch_size


class Head(Dataset):
    """The first `n` examples of a dataset (its `collate` kept): a quick evaluation during training."""

    def __init__(self, base: Dataset, n: int):
        self.base, self.n = base, min(n, len(base))
        if hasattr(base, "collate"):
            self.collate = base.collate

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.base[i]


def train_loader(dataset: Dataset, sampler: EpochSampler, num_workers: int, pin_memory: bool) -> DataLoader:
    """Batches of the training split in `sampler`'s order; in-memory data needs no workers."""
    workers = 0 if _in_memory(dataset) else num_workers
    return DataLoader(dataset, batch_size=sampler.batch_size, sampler=sampler, drop_last=True, num_workers=workers,
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(sampler.seed * 100003 + sampler.epoch),
                      collate_fn=getattr(dataset, "collate", None))


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, pin_memory: bool) -> DataLoader:
    workers = 0 if _in_memory(dataset) else num_workers
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory,
                      collate_fn=getattr(dataset, "collate", None))


def _in_memory(dataset: Dataset) -> bool:
    """Data held in memory needs no worker processes (tensors, tokenized text)."""
    dataset = dataset.base if isinstance(dataset, Head) else dataset
    return isinstance(dataset, TensorImages) or hasattr(dataset, "collate")
