"""Batch samplers: P classes x K images per batch (Roth et al., ICML 2020, ``datasampler/
class_random_sampler.py``, "class_random") and plain shuffled batches ("random").

Both are ``torch.utils.data`` batch samplers (iterables of index lists with ``len``), deterministic
given ``(seed, epoch)`` through :meth:`set_epoch`, and distributed-aware: every rank draws the same
global batch and keeps its own slice of it, so the ranks partition each global batch.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence

import torch

from lib.registry import Registry

SAMPLERS = Registry("sampler")


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def _generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))


@SAMPLERS.register("class_random")
class ClassBalancedBatchSampler:
    """Batches of ``classes_per_batch`` (P) distinct classes x ``samples_per_class`` (K) images.

    Each global batch draws P distinct classes uniformly among all classes, then K distinct images of
    each class uniformly (Revisiting's sampler draws classes and images *with* replacement, so a batch
    can repeat a class or an image; here neither repeats while a class has K images). A class with
    fewer than K images (``small_classes``, e.g. SOP's classes of 2-3 images at K = 4) still trains:
    its K slots hold every one of its images once, in random order, then repeats drawn uniformly with
    replacement among them, so the batch keeps its P x K shape (which DDP's per-rank slices need);
    :meth:`describe` says how many classes that concerns. A repeated image gets the same augmentation
    as its first copy (the views are seeded by (seed, epoch, index)), so it adds weight, not views.

    ``num_batches`` per epoch defaults to ``len(labels) / (P K)``, rounded down with ``drop_last``
    (every batch is full either way; the flag only picks the rounding). Distributed: the global batch
    has P K indices; rank r gets classes ``[r P/W, (r+1) P/W)`` of it, whole classes, P K / W
    indices (P must be divisible by ``world_size``). ``set_epoch(e)`` reseeds with ``(seed, e)``.
    """

    def __init__(self, labels: Sequence[int], classes_per_batch: int, samples_per_class: int, *,
                 num_batches: Optional[int] = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True):
        _check_rank(rank, world_size)
        if classes_per_batch < 1 or samples_per_class < 1:
            raise ValueError(f"classes_per_batch and samples_per_class must be >= 1, got "
                             f"{classes_per_batch}, {samples_per_class}")
        if classes_per_batch % world_size:
            raise ValueError(f"classes_per_batch={classes_per_batch} is not divisible by world_size={world_size}: "
                             "each rank takes whole classes of the global batch")
        labels = [int(v) for v in labels]
        by_class: Dict[int, List[int]] = {}
        for index, label in enumerate(labels):
            by_class.setdefault(label, []).append(index)
        self.classes = sorted(by_class)
        self.small_classes = [c for c in self.classes if len(by_class[c]) < samples_per_class]
        if len(self.classes) < classes_per_batch:
            raise ValueError(f"only {len(self.classes)} classes, fewer than classes_per_batch={classes_per_batch} "
                             f"(a batch takes distinct classes); lower the batch size or raise samples_per_class")
        self.indices = [torch.tensor(by_class[c]) for c in self.classes]
        self.P, self.K = classes_per_batch, samples_per_class
        self.seed, self.rank, self.world_size, self.drop_last = seed, rank, world_size, drop_last
        batch = classes_per_batch * samples_per_class
        if num_batches is None:
            num_batches = len(labels) // batch if drop_last else -(-len(labels) // batch)
        if num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches} (dataset of {len(labels)} images, "
                             f"batch {batch})")
        self.num_batches = int(num_batches)
        self.epoch = 0

    def describe(self) -> str:
        """One line for the log: the batch shape and what happens to the classes smaller than K."""
        text = f"class-balanced batches of {self.P} classes x {self.K} images from {len(self.classes)} classes"
        if self.small_classes:
            sizes = sorted({len(self.indices[self.classes.index(c)]) for c in self.small_classes})
            text += (f"; {len(self.small_classes)} classes have fewer than {self.K} images ({', '.join(map(str, sizes))}): "
                     f"their batches hold each of their images and repeat some to fill {self.K} slots")
        return text

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def global_batches(self) -> Iterator[List[int]]:
        """The epoch's global batches (P K indices each, class after class), identical on every rank."""
        gen = _generator(self.seed, self.epoch)
        for _ in range(self.num_batches):
            batch: List[int] = []
            for c in torch.randperm(len(self.classes), generator=gen)[: self.P].tolist():
                members = self.indices[c]
                pick = torch.randperm(len(members), generator=gen)[: self.K]
                if len(members) < self.K:  # every image once, then repeats to fill K slots
                    pick = torch.cat([pick, torch.randint(len(members), (self.K - len(members),), generator=gen)])
                batch.extend(members[pick].tolist())
            yield batch

    def __iter__(self) -> Iterator[List[int]]:
        share = self.P // self.world_size * self.K
        for batch in self.global_batches():
            yield batch[self.rank * share:(self.rank + 1) * share]


@SAMPLERS.register("random")
class RandomBatchSampler:
    """Shuffled batches of ``batch_size`` indices, ignoring classes (Revisiting's "full random"):
    each epoch walks a fresh permutation of the dataset (a new permutation starts when
    ``num_batches`` asks for more than one pass). Distributed: rank r takes the r-th contiguous
    ``batch_size / world_size`` slice of each global batch."""

    def __init__(self, labels: Sequence[int], batch_size: int, *, num_batches: Optional[int] = None, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = True):
        _check_rank(rank, world_size)
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} must be >= 1 and divisible by world_size={world_size}")
        self.size = len(labels)
        if self.size < batch_size:
            raise ValueError(f"dataset of {self.size} images is smaller than batch_size={batch_size}")
        self.batch_size, self.seed, self.rank, self.world_size, self.drop_last = batch_size, seed, rank, world_size, drop_last
        if num_batches is None:
            num_batches = self.size // batch_size if drop_last else -(-self.size // batch_size)
        self.num_batches = int(num_batches)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def global_batches(self) -> Iterator[List[int]]:
        gen = _generator(self.seed, self.epoch)
        order: List[int] = []
        for _ in range(self.num_batches):
            while len(order) < self.batch_size:
                order.extend(torch.randperm(self.size, generator=gen).tolist())
            batch, order = order[: self.batch_size], order[self.batch_size:]
            yield batch

    def __iter__(self) -> Iterator[List[int]]:
        share = self.batch_size // self.world_size
        for batch in self.global_batches():
            yield batch[self.rank * share:(self.rank + 1) * share]


__all__ = ["SAMPLERS", "ClassBalancedBatchSampler", "RandomBatchSampler"]
