"""Training modes: each turns a data-loader batch into ``Embeddings`` for the objectives.

* ``ts_aug``: paired views at the student's and the teacher's sizes, teacher run online (no grad).
* ``ts_reg``: student views against teacher embeddings precomputed (and cached) on eval-transformed images.
* ``sym``:    the student alone; triplet loss with the hardest in-batch positive and negatives mined
              at the start of each epoch by distance-weighted sampling from a random pool.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

from lib.cache import EmbeddingCache
from lib.data.datasets import ImageList
from lib.data.training import AugmentedImages, PairedViewDataset
from lib.data.transforms import EvalTransform, PairedViews, mix_and_normalize
from lib.embeddings import Embeddings
from lib.extract import cached_extract, extract
from lib.losses.base import ObjectiveSpec
from lib.models.net import RetrievalNet
from lib.registry import Registry

MODES = Registry("mode")


class Mode:
    """Holds the training dataset and knows how to embed one of its batches."""

    needs_teacher = True

    def __init__(self, cfg, student: RetrievalNet, teacher: Optional[RetrievalNet], paths: Sequence[str],
                 labels: Sequence[int], *, device: torch.device, teacher_device: torch.device,
                 cache: Optional[EmbeddingCache] = None, rank: int = 0, world_size: int = 1):
        if self.needs_teacher and teacher is None:
            raise ValueError(f"mode {cfg.mode!r} needs a teacher (--teacher or --teacher-path)")
        self.cfg, self.teacher, self.device, self.teacher_device = cfg, teacher, device, teacher_device
        self.paths, self.labels = list(paths), torch.as_tensor(labels)
        self.rank, self.world_size = rank, world_size
        self.cache = cache  # None: teacher embeddings are computed, not cached
        self.dataset = self.build_dataset(student)
        self.batch_sampler = self.build_sampler()

    # -- hooks -----------------------------------------------------------------------------------
    def build_dataset(self, student: RetrievalNet):
        raise NotImplementedError

    def build_sampler(self):
        cfg = self.cfg
        if cfg.samples_per_class > 0:
            return self.class_balanced(cfg.samples_per_class)
        from lib.data.samplers import RandomBatchSampler

        return RandomBatchSampler(self.labels.tolist(), cfg.batch_size, num_batches=self.num_batches(), seed=cfg.seed,
                                  rank=self.rank, world_size=self.world_size)

    def num_batches(self) -> int:
        """``--query-size`` images per epoch (at most the dataset), in full batches."""
        return max(1, -(-min(self.cfg.query_size, len(self.paths)) // self.cfg.batch_size))

    def class_balanced(self, samples_per_class: int):
        from lib.data.samplers import ClassBalancedBatchSampler

        cfg = self.cfg
        if cfg.batch_size % samples_per_class:
            raise ValueError(f"--batch-size {cfg.batch_size} is not a multiple of --samples-per-class {samples_per_class}")
        sampler = ClassBalancedBatchSampler(self.labels.tolist(), cfg.batch_size // samples_per_class, samples_per_class,
                                            num_batches=self.num_batches(),
                                            seed=cfg.seed, rank=self.rank, world_size=self.world_size)
        if self.rank == 0:
            print(f">> sampler: {sampler.describe()}")
        return sampler

    def base_objectives(self) -> List[ObjectiveSpec]:
        raise NotImplementedError

    def set_epoch(self, epoch: int, student: RetrievalNet) -> None:
        self.dataset.set_epoch(epoch)
        self.batch_sampler.set_epoch(epoch)

    def embed(self, batch, student: nn.Module, epoch: int) -> Embeddings:
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------------
    def _to(self, x: Tensor, device: torch.device) -> Tensor:
        x = x.to(device, non_blocking=True)
        if self.cfg.channels_last and device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x


@MODES.register("ts_aug")
class TSAug(Mode):
    def build_dataset(self, student):
        cfg, teacher = self.cfg, self.teacher
        views = PairedViews([cfg.image_size, cfg.teacher_image_size],
                            [(student.meta["mean"], student.meta["std"]), (teacher.meta["mean"], teacher.meta["std"])],
                            scale=(cfg.crop_scale, 1.0), backend=cfg.view_backend)
        return PairedViewDataset(self.paths, self.labels.tolist(), views, cfg.pos_num, cfg.mixup_alpha, cfg.seed)

    def build_sampler(self):
        if self.cfg.lam_label and self.cfg.samples_per_class == 0:
            return self.class_balanced(2)  # the label term needs same-class images in the batch
        return super().build_sampler()

    def base_objectives(self):
        """The paper's three terms and, with ``--lam-label``, a label term: asymmetric multi-similarity
        (Wang et al., CVPR 2019) of each student view against the teacher's views of the batch, the
        views of same-class images positives. The paper's terms only ask each view to land on its own
        teacher embedding; on many classes with a few images each this term also asks the student's
        query to rank the teacher's embeddings of the *other* images of its class above those of other
        classes, which is what the asymmetric test measures (experiments/README.md: the default's
        student goes from 86.9% to 90.5% of the teacher at the same cost). With ``--lam-csd``, CSD
        (:class:`lib.losses.peers.CSDLoss`: the batch and a memory of the last 1024 teacher views as
        its gallery) asks each query to reproduce the teacher's similarities to its nearest neighbours,
        which lets one epoch do what two did without it (experiments/README.md, "The default in one
        student epoch")."""
        specs = [ObjectiveSpec("absolute", 1.0)]
        if self.cfg.lam_1:
            specs.append(ObjectiveSpec("relative_st", self.cfg.lam_1))
        if self.cfg.lam_2:
            specs.append(ObjectiveSpec("relative_ss", self.cfg.lam_2))
        if self.cfg.lam_label:
            specs.append(ObjectiveSpec("ms", self.cfg.lam_label, {"asymmetric": True}))
        if self.cfg.lam_csd:
            specs.append(ObjectiveSpec("csd", self.cfg.lam_csd))
        return specs

    def embed(self, batch, student, epoch):
        if len(batch) == 5:  # the 'tensor' view backend: uint8 views, mixed and normalised here on the device
            student_views, teacher_views, weights, labels, _ = batch
            (s_mean, s_std), (t_mean, t_std) = self.dataset.views.norms
            student_views = mix_and_normalize(student_views.to(self.device, non_blocking=True), weights, s_mean, s_std)
            teacher_views = mix_and_normalize(teacher_views.to(self.teacher_device, non_blocking=True), weights, t_mean, t_std)
        else:
            student_views, teacher_views, labels, _ = batch
        b, p = student_views.shape[:2]
        with torch.no_grad():
            teacher = self.teacher(self._to(teacher_views.flatten(0, 1), self.teacher_device)).float()
        normalized, raw = _embed(student, self._to(student_views.flatten(0, 1), self.device))
        groups = torch.arange(b, device=self.device).repeat_interleave(p)
        return Embeddings(student=normalized, labels=labels.to(self.device).repeat_interleave(p),
                          teacher=teacher.to(self.device), groups=groups, student_raw=raw, epoch=epoch)


@MODES.register("ts_reg")
class TSReg(Mode):
    def build_dataset(self, student):
        cfg, teacher = self.cfg, self.teacher
        self.teacher_embeddings = cached_extract(
            self.cache, teacher, self.paths, cfg.teacher_image_size, device=self.teacher_device, workers=cfg.workers,
            progress="teacher embeddings of the training images")
        dataset = ImageList(self.paths, self.labels.tolist(), EvalTransform(cfg.image_size, student.meta["mean"], student.meta["std"]))
        dataset.set_epoch = lambda epoch: None  # deterministic images: nothing to reseed
        return dataset

    def base_objectives(self):
        return [ObjectiveSpec("absolute", 1.0)]

    def embed(self, batch, student, epoch):
        images, labels, index = batch
        normalized, raw = _embed(student, self._to(images, self.device))
        return Embeddings(student=normalized, labels=labels.to(self.device),
                          teacher=self.teacher_embeddings[index].to(self.device), student_raw=raw, epoch=epoch)


@MODES.register("sym")
class Sym(Mode):
    needs_teacher = False

    def build_dataset(self, student):
        return AugmentedImages(self.paths, self.labels.tolist(), self.cfg.image_size, student.meta["mean"],
                               student.meta["std"], seed=self.cfg.seed)

    def build_sampler(self):
        return self.class_balanced(self.cfg.samples_per_class or 4)

    def base_objectives(self):
        return [ObjectiveSpec("mined_triplet", 1.0, {"margin": self.cfg.loss_margin})]

    def set_epoch(self, epoch, student):
        super().set_epoch(epoch, student)
        self.dataset.negatives = self.mine(epoch, student) if self.cfg.neg_num > 0 else None

    @torch.no_grad()
    def mine(self, epoch: int, student: RetrievalNet) -> Tensor:
        """``neg_num`` distance-weighted negatives for every query of the epoch, from a random pool of
        ``pool_size`` images, embedded with the current student (eval transform)."""
        from lib.miners import sample_distance_weighted

        cfg = self.cfg
        queries = sorted({i for batch in self.batch_sampler for i in batch})
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch + 17)
        pool = torch.randperm(len(self.paths), generator=gen)[: cfg.pool_size]
        needed = sorted(set(queries) | set(pool.tolist()))
        position = {idx: k for k, idx in enumerate(needed)}
        vecs = extract(student, [self.paths[i] for i in needed], cfg.image_size, device=self.device,
                       workers=cfg.workers, progress=f"mining negatives (epoch {epoch + 1})" if self.rank == 0 else None)
        q = torch.tensor(queries)
        chosen = sample_distance_weighted(vecs[[position[i] for i in queries]], vecs[[position[int(i)] for i in pool]],
                                          self.labels[q], self.labels[pool], cfg.neg_num, generator=gen)
        negatives = torch.zeros(len(self.paths), cfg.neg_num, dtype=torch.long)
        negatives[q] = pool[chosen]
        return negatives

    def embed(self, batch, student, epoch):
        images, labels, _, negatives = batch
        k = negatives.shape[1]
        inputs = images if k == 0 else torch.cat([images, negatives.flatten(0, 1)])
        normalized, raw = _embed(student, self._to(inputs, self.device))
        b = len(images)
        return Embeddings(student=normalized[:b], labels=labels.to(self.device), student_raw=raw[:b], epoch=epoch,
                          negatives=normalized[b:].view(b, k, -1) if k else None)


def _embed(student: nn.Module, x: Tensor):
    """(normalised, raw) through ``forward`` (so a DDP wrapper synchronises gradients)."""
    normalized, raw = student(x, return_raw=True)
    return normalized.float(), raw.float()


__all__ = ["MODES", "Mode", "TSAug", "TSReg", "Sym"]
