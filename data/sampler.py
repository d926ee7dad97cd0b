"""Resumable, distributed sample order with per-item seeds.

The order is a function of (seed, epoch) only, and each item's augmentation randomness is seeded by its
global position in that order. So a run resumed at step k sees exactly the items and augmentations an
uninterrupted run would, for any number of DataLoader workers, and the global batch is the same whatever
the number of processes (each rank takes its contiguous slice of every global batch).
"""
import torch
from torch.utils.data import Dataset, Sampler


def item_seed(seed, position):
    """The seed of the item at `position` (of the training order, or of the test pairs) in a run seeded `seed`.
    Training's augmentations and inference's noise both draw from it, so neither depends on batching."""
    return seed * 1_000_003 + position


class ResumableSampler(Sampler):
    """Yields (index, item_seed) forever, starting at global position `start` (samples already consumed)."""

    def __init__(self, size, global_batch, seed=0, rank=0, world_size=1, start=0):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} must be divisible by the {world_size} processes")
        self.size, self.global_batch, self.seed = size, global_batch, seed
        self.rank, self.world_size, self.start = rank, world_size, start

    def __iter__(self):
        per_rank = self.global_batch // self.world_size
        position = self.start - self.start % self.global_batch
        order, epoch = None, -1
        while True:
            for slot in range(self.global_batch):
                if position >= self.start and slot // per_rank == self.rank:
                    if position // self.size != epoch:
                        epoch = position // self.size
                        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))
                    yield int(order[position % self.size]), item_seed(self.seed, position)
                position += 1

    def __len__(self):
        return self.size


class SeededDataset(Dataset):
    """Wraps a dataset whose randomness comes from torch's global RNG: item (index, seed) is computed under
    a private RNG seeded with `seed`, leaving the caller's RNG untouched."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]
