"""Deterministic, resumable sample order and per-sample augmentation seeds.

The sampler yields ``(index, sample_seed)`` pairs: the order of epoch ``e`` is a
permutation drawn from ``seed + e``, sharded over ranks, and may start part-way
through the epoch (resume). ``SeededDataset`` seeds torch/numpy/python RNGs from the
pair before running the transform, so a sample's views depend only on
(seed, epoch, position) and not on worker count, worker scheduling or where a run
was resumed — that is what makes a resumed run bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["ResumableSampler", "SeededDataset"]


class ResumableSampler(Sampler):
    """Shuffled, rank-sharded order of one epoch; ``set_epoch(e, start_batch)`` picks where to begin.

    Each rank gets ``num_batches * batch_size`` samples (the tail of the permutation that does
    not fill a global batch is dropped, the official ``drop_last=True`` behaviour)."""

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True) -> None:
        if num_samples < batch_size * world_size:
            raise ValueError(f"dataset has {num_samples} images, fewer than one global batch "
                             f"({batch_size} x {world_size} ranks)")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch, self.start_batch = 0, 0

    @property
    def num_batches(self) -> int:
        """Batches per epoch on each rank."""
        return self.num_samples // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_samples, generator=g)

    def __len__(self) -> int:
        return (self.num_batches - self.start_batch) * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        n_global = self.num_batches * self.batch_size * self.world_size
        order = self._order()[:n_global].view(self.num_batches, self.world_size, self.batch_size)
        for b in range(self.start_batch, self.num_batches):
            for j, idx in enumerate(order[b, self.rank].tolist()):
                # A seed unique to (seed, epoch, global position) of this sample.
                pos = (b * self.world_size + self.rank) * self.batch_size + j
                yield idx, (self.seed * 1_000_003 + self.epoch) * 10_000_019 + pos


class SeededDataset(Dataset):
    """Wraps a dataset indexed by ``(index, sample_seed)``: the RNGs are seeded per sample and
    restored afterwards, so the caller's random streams are untouched."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        index, sample_seed = key
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            random.seed(sample_seed)
            np.random.seed(sample_seed % (2 ** 32))
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)

    def __getattr__(self, name: str):
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
