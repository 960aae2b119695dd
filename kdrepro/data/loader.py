"""Reproducible, resumable training data order.

Every sample's augmentation is seeded from ``(seed, epoch, index)`` and every epoch's order from ``(seed, epoch)``,
so a run's data stream is a pure function of the seed and the iteration number: it does not depend on the number of
loader workers, and resuming at iteration ``n`` continues exactly where an uninterrupted run would be, without
re-reading the skipped batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from kdrepro.data.io import SegmentationDataset

_EPOCH_STRIDE = 1_000_003


class SeededAugmentation(Dataset):
    """Wraps a dataset; item ``(epoch, index)`` is ``dataset.sample(index, generator)`` with a fresh generator seeded
    ``seed * 7919 + epoch * 1_000_003 + index``, so the sample never touches torch's global RNG."""

    def __init__(self, dataset: SegmentationDataset, seed: int):
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = key
        generator = torch.Generator().manual_seed(self.seed * 7919 + epoch * _EPOCH_STRIDE + index)
        return self.dataset.sample(index, generator)


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Infinite stream of batches of ``(epoch, index)`` keys, starting at a given iteration; drops the last partial
    batch of each epoch (as mmseg's ``InfiniteSampler`` + fixed batch size does in effect)."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, start_iteration: int = 0):
        if num_samples < batch_size:
            raise ValueError(f"the training set has {num_samples} images, fewer than the batch size {batch_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = int(seed)
        self.start_iteration = start_iteration
        self.batches_per_epoch = num_samples // batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        iteration = self.start_iteration
        while True:
            epoch, position = divmod(iteration, self.batches_per_epoch)
            generator = torch.Generator().manual_seed(self.seed * 104729 + epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
            for batch in range(position, self.batches_per_epoch):
                start = batch * self.batch_size
                yield [(epoch, index) for index in order[start : start + self.batch_size]]
            iteration = (epoch + 1) * self.batches_per_epoch

    def __len__(self) -> int:  # an infinite sampler; DataLoader only needs this for len(loader)
        return 2**62


def training_loader(
    dataset: SegmentationDataset,
    batch_size: int,
    seed: int,
    start_iteration: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader yielding ``(images, labels)`` batches forever, from ``start_iteration`` on."""
    sampler = ResumableBatchSampler(len(dataset), batch_size, seed, start_iteration)
    return DataLoader(
        SeededAugmentation(dataset, seed),
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        # its own generator: creating the iterator must not draw from the global RNG (exact resume)
        generator=torch.Generator().manual_seed(int(seed)),
    )
