"""Batch samplers: P x K structure, determinism per (seed, epoch), rank partitioning."""
from collections import Counter

import pytest

from lib.data.samplers import SAMPLERS, ClassBalancedBatchSampler, RandomBatchSampler

LABELS = [c for c in range(10) for _ in range(6)] + [10, 10]  # 10 classes of 6 images, one of 2


def test_yields_p_by_k_distinct_classes_and_images():
    labels = LABELS[:60]  # classes of 6 images; the small class is tested below
    sampler = ClassBalancedBatchSampler(labels, 4, 3, num_batches=7, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 7
    for batch in batches:
        assert len(batch) == 12 and len(set(batch)) == 12
        counts = Counter(labels[i] for i in batch)
        assert sorted(counts.values()) == [3, 3, 3, 3]
        # class after class
        assert [labels[i] for i in batch[::3]] == [labels[i] for i in batch[2::3]]


def test_small_classes_train_with_every_image_and_repeats():
    sampler = ClassBalancedBatchSampler(LABELS, 11, 3, num_batches=20, seed=0)
    assert sampler.small_classes == [10]
    assert "1 classes have fewer than 3 images (2)" in sampler.describe()
    for batch in sampler:  # every class, including the 2-image one, in every batch, K slots each
        counts = Counter(LABELS[i] for i in batch)
        assert len(batch) == 33 and set(counts.values()) == {3}
        small = [i for i in batch if LABELS[i] == 10]
        assert set(small) == {60, 61}  # both images, one of them twice
    # the 2-image class is drawn as often as the others (it is never skipped)
    seen = Counter(LABELS[i] for b in ClassBalancedBatchSampler(LABELS, 4, 3, num_batches=300, seed=1) for i in b[::3])
    assert len(seen) == 11 and min(seen.values()) > 0.6 * max(seen.values())
    # a set of 2-image classes only (the case) trains at K = 4
    pairs = [c for c in range(6) for _ in range(2)]
    batches = list(ClassBalancedBatchSampler(pairs, 2, 4, seed=0))
    assert batches and all(sorted(Counter(pairs[i] for i in b).values()) == [4, 4] for b in batches)
    assert all(len(set(b)) == 4 for b in batches)  # 2 classes x their 2 distinct images
    with pytest.raises(ValueError, match="only 11 classes, fewer than classes_per_batch=12"):
        ClassBalancedBatchSampler(LABELS, 12, 3)


@pytest.mark.parametrize("world_size", [1, 2])
def test_small_classes_deterministic_resumable_and_sharded(world_size):
    labels = [c for c in range(8) for _ in range(1 + c % 3)]  # classes of 1, 2 and 3 images at K = 4
    def epoch_batches(epoch, rank=0):
        sampler = ClassBalancedBatchSampler(labels, 4, 4, num_batches=5, seed=7, rank=rank, world_size=world_size)
        sampler.set_epoch(epoch)
        return list(sampler)

    full = ClassBalancedBatchSampler(labels, 4, 4, num_batches=5, seed=7)
    for epoch in range(3):  # a fresh sampler at epoch e (a resumed run) draws what the running one draws
        full.set_epoch(epoch)
        batches = list(full)
        assert batches == epoch_batches(epoch, 0) if world_size == 1 else \
            [sum(parts, []) for parts in zip(*[epoch_batches(epoch, r) for r in range(world_size)])] == batches
    assert epoch_batches(0) != epoch_batches(1)


def test_default_length_and_errors():
    assert len(ClassBalancedBatchSampler(LABELS, 2, 4)) == len(LABELS) // 8
    assert len(ClassBalancedBatchSampler(LABELS, 2, 4, drop_last=False)) == -(-len(LABELS) // 8)
    with pytest.raises(ValueError, match="world_size"):
        ClassBalancedBatchSampler(LABELS, 3, 2, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        ClassBalancedBatchSampler(LABELS, 4, 2, rank=2, world_size=2)


def test_deterministic_and_epochs_differ():
    a = ClassBalancedBatchSampler(LABELS, 4, 2, num_batches=5, seed=3)
    b = ClassBalancedBatchSampler(LABELS, 4, 2, num_batches=5, seed=3)
    assert list(a) == list(b)
    a.set_epoch(1)
    first = list(a)
    assert first != list(b)
    b.set_epoch(1)
    assert first == list(b)
    assert list(ClassBalancedBatchSampler(LABELS, 4, 2, num_batches=5, seed=4)) != list(b)


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_partition_the_global_batch(world_size):
    full = list(ClassBalancedBatchSampler(LABELS, 4, 3, num_batches=6, seed=5))
    per_rank = [list(ClassBalancedBatchSampler(LABELS, 4, 3, num_batches=6, seed=5, rank=r, world_size=world_size))
                for r in range(world_size)]
    for step, batch in enumerate(full):
        parts = [per_rank[r][step] for r in range(world_size)]
        assert all(len(p) == 12 // world_size for p in parts)
        assert sum(parts, []) == batch
        classes = [set(LABELS[i] for i in p) for p in parts]
        for r in range(world_size):  # whole classes per rank
            for s in range(r + 1, world_size):
                assert not classes[r] & classes[s]


def test_random_sampler():
    sampler = SAMPLERS.build("random", labels=LABELS, batch_size=8, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == len(LABELS) // 8
    flat = sum(batches, [])
    assert len(set(flat)) == len(flat)  # one pass: no repeats
    sampler.set_epoch(1)
    assert list(sampler) != batches
    ranks = [list(RandomBatchSampler(LABELS, 8, seed=0, rank=r, world_size=2)) for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == batches
    assert SAMPLERS.get_class("class_random") is ClassBalancedBatchSampler
