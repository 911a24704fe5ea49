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

    `lengths` (text: tokens per document) groups documents of similar length into the same batch, so that a batch
    padded to its longest document holds little padding: the epoch's permutation is cut into chunks of `group` global
    batches (`batch_size × world`), each chunk sorted by length and cut into global batches, and the global batches are
    shuffled; each process takes every `world`-th document of each global batch, as without grouping. Still a pure
    function of (seed, epoch, rank).
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0, shuffle: bool = True,
                 lengths: list[int] | None = None, group: int = 64):
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"{len(lengths)} lengths for {n} examples")
        self.n, self.batch_size, self.rank, self.world, self.seed, self.shuffle = n, batch_size, rank, world, seed, shuffle
        self.lengths = None if lengths is None else torch.as_tensor(lengths, dtype=torch.long)
        self.group = max(1, group)
        self.batches = (n // world) // batch_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.n, generator=gen) if self.shuffle else torch.arange(self.n)
        if self.lengths is not None and self.shuffle:
            mine = self._grouped(order, gen)
        else:
            mine = order[self.rank :: self.world][: self.batches * self.batch_size]
        return iter(mine[self.start_batch * self.batch_size :].tolist())

    def _grouped(self, order: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """This process's indices, batches of similar lengths in a shuffled order (see the class docstring)."""
        width = self.batch_size * self.world
        order = order[: self.batches * width]  # whole global batches only, as every process takes the same number
        chunks = []
        for start in range(0, len(order), self.group * width):
            chunk = order[start:start + self.group * width]
            chunks.append(chunk[torch.sort(self.lengths[chunk], descending=True, stable=True).indices])
        batches = torch.cat(chunks).view(self.batches, width) if chunks else order.view(0, width)
        batches = batches[torch.randperm(self.batches, generator=gen)]
        return batches[:, self.rank :: self.world].reshape(-1)

    def __len__(self) -> int:
        return (self.batches - self.start_batch) * self.batch_size


class Head(Dataset):
    """The first `n` examples of a dataset (its `collate` kept): a quick evaluation during training."""

    def __init__(self, base: Dataset, n: int):
        self.base, self.n = base, min(n, len(base))
        if hasattr(base, "collate"):
            self.collate = base.collate
        if hasattr(base, "lengths"):
            self.lengths = lambda: base.lengths()[: self.n]

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


# Evaluation batches of text documents sorted by length hold at most this many tokens, padding included (a batch
# always holds at least one document): a held-out set of short and long documents is not all padded to the longest.
EVAL_BATCH_TOKENS = 4096


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, pin_memory: bool) -> DataLoader:
    """The held-out examples in batches of `batch_size`; text with known lengths (`dataset.lengths()`) in order of
    length, longest first, in batches of at most `EVAL_BATCH_TOKENS` padded tokens. Every evaluation figure is a sum or
    a set over the examples, so the order changes no figure."""
    workers = 0 if _in_memory(dataset) else num_workers
    collate = getattr(dataset, "collate", None)
    if hasattr(dataset, "lengths") and len(dataset):
        return DataLoader(dataset, batch_sampler=length_batches(dataset.lengths(), batch_size, EVAL_BATCH_TOKENS), num_workers=workers,
                          pin_memory=pin_memory, collate_fn=collate)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory, collate_fn=collate)


def length_batches(lengths: list[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """Indices sorted by length (longest first, ties in index order) cut into batches of at most `max_rows` examples and at
    most `max_tokens` padded tokens (rows × the batch's longest), at least one example each."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < max_rows and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _in_memory(dataset: Dataset) -> bool:
    """Data held in memory needs no worker processes (tensors, tokenized text)."""
    dataset = dataset.base if isinstance(dataset, Head) else dataset
    return isinstance(dataset, TensorImages) or hasattr(dataset, "collate")
