"""Training datasets of the three modes. They only load and transform: no model, no global RNG.

Every random choice of a sample comes from ``sample_generator(seed, epoch, index)``; call
``set_epoch`` before iterating an epoch (data-loader workers are re-created per epoch and pick it up).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lib.data.datasets import image_size, load_image
from lib.data.transforms import PairedViews, random_resized_crop_params, sample_generator, to_tensor_normalized

try:
    from torchvision.transforms import functional as TF
except Exception:  # pragma: no cover
    TF = None


# mixup weight below which a component moves no pixel of the mix by half a grey level (the 'tensor'
# backend skips rendering it; 0 renders every component)
MIXUP_NEGLIGIBLE = 1 / 510


class _EpochDataset(Dataset):
    def __init__(self, paths: Sequence[str], labels: Sequence[int], seed: int):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths, self.labels, self.seed, self.epoch = list(paths), torch.as_tensor(labels), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)


class PairedViewDataset(_EpochDataset):
    """``ts_aug``: ``pos_num`` paired views of one image, each mixed up with a random other image.

    Returns ``(student_views (P, 3, s, s), teacher_views (P, 3, t, t), label, index)``. The mixup
    partner of each view is another random image of the dataset with its own paired crop; one lambda
    ~ Beta(alpha, alpha) per view is shared by both resolutions (alpha = 0 turns mixup off).

    With ``views.backend == "tensor"`` the views stay uint8 and unmixed, to be finished on the training
    device by :func:`lib.data.transforms.mix_and_normalize`: ``(student_views (P, K, 3, s, s) uint8,
    teacher_views (P, K, 3, t, t) uint8, weights (P, K), label, index)``, K = 2 (the image, its mixup
    partner; weights lambda, 1 - lambda) or 1 without mixup. The random draws are the same as with
    ``"pil"``, in the same order, so both backends crop, flip, jitter and mix alike; a component lighter
    than 1/510 is left out (weights 1 and 0, its slot zero), which moves no pixel by half a level.
    """

    def __init__(self, paths, labels, views: PairedViews, pos_num: int = 8, mixup_alpha: float = 0.2, seed: int = 0,
                 negligible_mixup: float = MIXUP_NEGLIGIBLE):
        super().__init__(paths, labels, seed)
        if pos_num < 1:
            raise ValueError(f"pos_num must be >= 1, got {pos_num}")
        if not 0 <= negligible_mixup < 0.5:
            raise ValueError(f"negligible_mixup must be in [0, 0.5), got {negligible_mixup}")
        self.views, self.pos_num, self.mixup_alpha = views, int(pos_num), float(mixup_alpha)
        self.negligible_mixup = float(negligible_mixup)

    def __getitem__(self, index: int):
        if getattr(self.views, "backend", "pil") == "tensor":
            return self._uint8_item(index)
        gen = sample_generator(self.seed, self.epoch, index)
        image = load_image(self.paths[index])
        per_size = [[] for _ in self.views.sizes]
        for _ in range(self.pos_num):
            rendered = self.views(image, gen)
            if self.mixup_alpha > 0:
                other = int(torch.randint(len(self.paths), (1,), generator=gen))
                mixed = self.views(load_image(self.paths[other]), gen)
                lam = _beta_sample(self.mixup_alpha, gen)
                rendered = [lam * a + (1 - lam) * b for a, b in zip(rendered, mixed)]
            for bucket, view in zip(per_size, rendered):
                bucket.append(view)
        stacks = [torch.stack(b) for b in per_size]
        return (*stacks, int(self.labels[index]), index)

    def _uint8_item(self, index: int):
        """The ``"tensor"`` backend: the same draws as ``__getitem__``, written into uint8 stacks.

        A mixup component lighter than ``negligible_mixup`` (default 1/510) moves no pixel of the mix by
        half a grey level, so it is not rendered (nor, for a partner, decoded): its weight goes to the other
        component and its slot is zero. Its draws are still taken, so every later draw is unchanged."""
        gen = sample_generator(self.seed, self.epoch, index)
        image = load_image(self.paths[index])
        k = 2 if self.mixup_alpha > 0 else 1
        stacks = [torch.empty(self.pos_num, k, 3, s, s, dtype=torch.uint8) for s in self.views.sizes]
        weights = torch.ones(self.pos_num, k, dtype=torch.float32)
        for p in range(self.pos_num):
            own = self.views.draw(image.width, image.height, gen)
            if k == 1:
                self._put_views(stacks, p, 0, image, own)
                continue
            partner_path = self.paths[int(torch.randint(len(self.paths), (1,), generator=gen))]
            partner = self.views.draw(*image_size(partner_path), gen)
            lam = _beta_sample(self.mixup_alpha, gen)
            if min(lam, 1 - lam) < self.negligible_mixup:
                lam = 1.0 if lam > 0.5 else 0.0
            weights[p] = torch.tensor([lam, 1 - lam], dtype=torch.float64).float()
            for slot, weight, draws in ((0, lam, own), (1, 1 - lam, partner)):
                if weight > 0:
                    self._put_views(stacks, p, slot, image if slot == 0 else load_image(partner_path), draws)
                else:
                    for stack in stacks:
                        stack[p, slot].zero_()
        return (*stacks, weights, int(self.labels[index]), index)

    def _put_views(self, stacks, p: int, slot: int, image, draws) -> None:
        for stack, view in zip(stacks, self.views.render_drawn_uint8(image, draws)):
            _put(stack[p, slot], view)


def _put(target: Tensor, view: Tensor) -> None:
    """``target[...] = view`` for uint8 CPU tensors; numpy copies the (3, s, s) view, which torchvision's
    resize returns channels-last, into the contiguous target in about half torch's time."""
    np.copyto(target.numpy(), view.numpy())


def _beta_sample(alpha: float, generator: torch.Generator) -> float:
    """Beta(alpha, alpha) from a seeded generator by Johnk's method (exact for any alpha > 0).

    Written here because torch.distributions samples from the global RNG only."""
    while True:
        u, v = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        x, y = u ** (1 / alpha), v ** (1 / alpha)
        if 0 < x + y <= 1:
            return x / (x + y)


class AugmentedImages(_EpochDataset):
    """``sym``: one random resized crop + flip per image at ``size`` (teacher training and baselines),
    plus the mined negatives of the image when ``negatives`` (N, K) indices are set for the epoch.

    Returns ``(image (3, s, s), label, index, negatives (K, 3, s, s))``.
    """

    def __init__(self, paths, labels, size: int, mean, std, seed: int = 0, scale: Tuple[float, float] = (0.08, 1.0)):
        super().__init__(paths, labels, seed)
        self.size, self.mean, self.std, self.scale = int(size), list(mean), list(std), scale
        self.negatives: Optional[Tensor] = None

    def view(self, index: int, salt: int = 0) -> Tensor:
        gen = sample_generator(self.seed, self.epoch, index, salt)
        image = load_image(self.paths[index])
        top, left, h, w = random_resized_crop_params(image.width, image.height, gen, self.scale)
        crop = image.crop((left, top, left + w, top + h)).resize((self.size, self.size), resample=2)  # bilinear
        if float(torch.rand((), generator=gen)) < 0.5:
            crop = TF.hflip(crop)
        return to_tensor_normalized(crop, self.mean, self.std)

    def __getitem__(self, index: int):
        negatives = torch.empty(0, 3, self.size, self.size)
        if self.negatives is not None and self.negatives.shape[1] > 0:
            negatives = torch.stack([self.view(int(j), salt=1 + k) for k, j in enumerate(self.negatives[index])])
        return self.view(index), int(self.labels[index]), index, negatives


__all__ = ["PairedViewDataset", "AugmentedImages"]

