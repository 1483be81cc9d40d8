"""Batch samplers: P x K structure, determinism per (seed, epoch), rank partitioning."""
from collections import Counter

import pytest

from lib.data.samplers import SAMPLERS, ClassBalancedBatchSampler, RandomBatchSampler

LABELS = [c for c in range(10) for _ in range(6)] + [10, 10]  # 10 classes of 6 images, one of 2


def test_yields_p_by_k_distinct_classes_and_images():
    sampler = ClassBalancedBatchSampler(LABELS, 4, 3, num_batches=7, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 7
    for batch in batches:
        assert len(batch) == 12 and len(set(batch)) == 12
        counts = Counter(LABELS[i] for i in batch)
        assert sorted(counts.values()) == [3, 3, 3, 3]
        # class after class
        assert [LABELS[i] for i in batch[::3]] == [LABELS[i] for i in batch[2::3]]


def test_small_class_skipped_or_repeated():
    sampler = ClassBalancedBatchSampler(LABELS, 4, 3, num_batches=50, seed=0)
    assert sampler.skipped_classes == [10]
    assert all(LABELS[i] != 10 for b in sampler for i in b)
    repeats = ClassBalancedBatchSampler(LABELS, 11, 3, num_batches=3, seed=0, allow_repeats=True)
    for batch in repeats:  # every class, including the 2-image one, present K times
        counts = Counter(LABELS[i] for i in batch)
        assert counts[10] == 3 and set(i for i in batch if LABELS[i] == 10) <= {60, 61}
    with pytest.raises(ValueError, match="classes_per_batch=11"):
        ClassBalancedBatchSampler(LABELS, 11, 3)


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
