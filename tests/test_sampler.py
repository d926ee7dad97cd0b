"""data/sampler.py: the training order is a function of (seed, position) only, and differs across positions
and epochs."""
from itertools import islice

import pytest
import torch

from data.deepfashion import PairDataset
from data.sampler import ResumableSampler, SeededDataset
from data.synthetic import make_synthetic


def stream(size, batch, seed=0, rank=0, world=1, start=0, count=None):
    return list(islice(iter(ResumableSampler(size, batch, seed, rank, world, start)), count or 3 * size))


def test_each_epoch_is_a_permutation_and_epochs_differ():
    items = [index for index, _ in stream(20, 4, count=60)]
    epochs = [items[0:20], items[20:40], items[40:60]]
    assert all(sorted(epoch) == list(range(20)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3
    assert [i for i, _ in stream(20, 4, seed=1, count=20)] != epochs[0]


def test_item_seeds_are_distinct_per_position_and_fixed_by_seed_and_position():
    first = stream(20, 4, count=60)
    assert len({s for _, s in first}) == 60
    assert stream(20, 4, count=60) == first
    assert not {s for _, s in stream(20, 4, seed=1, count=60)} & {s for _, s in first}


@pytest.mark.parametrize("start", [0, 4, 24, 40])
def test_resuming_at_a_position_continues_the_same_stream(start):
    assert stream(20, 4, start=start, count=20) == stream(20, 4, count=start + 20)[start:]


@pytest.mark.parametrize("world", [2, 4])
def test_processes_share_out_each_global_batch(world):
    """Rank r takes the r-th slice of every global batch: together they see exactly the 1-process stream."""
    single = stream(20, 8, count=40)
    per_rank = [stream(20, 8, rank=r, world=world, count=40 // world) for r in range(world)]
    per = 8 // world
    merged = [item for b in range(5) for r in range(world) for item in per_rank[r][b * per:(b + 1) * per]]
    assert merged == single


@pytest.fixture(scope="module")
def train_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    make_synthetic(root, num_identities=4, poses_per_identity=4, size=32, seed=2, test_fraction=0.25)
    return SeededDataset(PairDataset(root, size=32, split="train", scale_jitter=0.1))


def choices(item):
    return item["target_path"], item["source_path"], item["flip"]


def test_a_position_always_gives_the_same_item_and_augmentation(train_set):
    for index, seed in stream(len(train_set), 4, count=8):
        a, b = train_set[index, seed], train_set[index, seed]
        assert choices(a) == choices(b)
        assert all(torch.equal(a[k], b[k]) for k in ("target", "source", "target_skeleton"))


def test_positions_and_epochs_give_different_augmentations(train_set):
    """The same pair at 8 positions (one per epoch): its source, swap, flip and jitter are drawn anew."""
    positions = [(index, seed) for index, seed in stream(len(train_set), 4, count=8 * len(train_set)) if index == 0]
    assert len(positions) == 8
    items = [train_set[key] for key in positions]
    assert len({choices(item) for item in items}) >= 4
    assert len({item["target"].sum().item() for item in items}) >= 6  # the scale jitter and crop too
