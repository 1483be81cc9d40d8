"""Image transforms: the evaluation transform and the paired views of ``ts_aug``.

Every random choice takes an explicit ``torch.Generator``, so a sample is a pure function of
(seed, epoch, index): data-loader workers, resumed runs and several processes all see the same
views without reseeding global RNGs.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

try:  # the core must import where torchvision is broken (CPU-only torch wheels)
    from torchvision.transforms import functional as TF
except Exception:  # pragma: no cover
    TF = None
try:  # torchvision >= 0.16; its uint8 bilinear resize is 5-6x faster than Pillow's (one thread)
    from torchvision.transforms.v2 import functional as TF2
except Exception:  # pragma: no cover
    TF2 = None

VIEW_BACKENDS = ("pil", "tensor")


def _require_tv():
    if TF is None:
        raise ImportError("torchvision is needed for image transforms; install the pinned torch/torchvision pair")


def to_tensor_normalized(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    _require_tv()
    return TF.normalize(TF.to_tensor(image), list(mean), list(std))


class EvalTransform:
    """Resize the shorter side to ``size * 8 / 7``, centre-crop ``size``, normalise (the paper's test
    transform)."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]):
        self.size, self.mean, self.std = int(size), list(mean), list(std)

    def __call__(self, image: Image.Image) -> Tensor:
        _require_tv()
        image = TF.resize(image, round(self.size * 8 / 7), interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        return to_tensor_normalized(TF.center_crop(image, [self.size, self.size]), self.mean, self.std)

    def describe(self) -> str:
        return f"eval(size={self.size},resize=8/7,center,mean={self.mean},std={self.std})"


def random_resized_crop_params(width: int, height: int, generator: torch.Generator,
                               scale: Tuple[float, float] = (0.08, 1.0),
                               ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> Tuple[int, int, int, int]:
    """(top, left, height, width) by the algorithm of torchvision's ``RandomResizedCrop.get_params``.

    Written here because torchvision's version draws from the global RNG; this one takes a generator.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(3, generator=generator).tolist()
        target_area = area * (scale[0] + u[0] * (scale[1] - scale[0]))
        aspect = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    # fallback: the central crop at the nearest admissible aspect ratio
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class PairedViews:
    """One random crop, flip and colour jitter, rendered at several sizes (student's, teacher's, ...).

    The crop is taken and jittered at the image's own resolution and resized last, so the views at
    every size show exactly the same content (the paper's synchronised student/teacher views).

    ``backend`` says how the jittered crop becomes the views (crop, flip and jitter are Pillow's in
    both, from the same generator draws, so both see the same crop and colours):

    - ``"pil"``: Pillow's bilinear resize, then float tensors normalised in the worker (``__call__``);
    - ``"tensor"``: torchvision's uint8 bilinear antialiased resize (``render_uint8``), normalising
      and mixup left to :func:`mix_and_normalize` on the training device. A pixel differs from the
      ``"pil"`` one by at most 1/255 before normalisation (the two resizers round differently; checked
      by tests/test_transforms.py), and the worker ships uint8 (with mixup both images: half the bytes
      of one float32 view).
    """

    def __init__(self, sizes: Sequence[int], norms: Sequence[Tuple[Sequence[float], Sequence[float]]],
                 scale: Tuple[float, float] = (0.08, 1.0), flip: float = 0.5,
                 jitter: Optional[Tuple[float, float, float, float]] = (0.4, 0.4, 0.4, 0.1), backend: str = "pil"):
        if len(sizes) != len(norms):
            raise ValueError("one (mean, std) per size")
        if backend not in VIEW_BACKENDS:
            raise ValueError(f"unknown view backend {backend!r}: choose one of {', '.join(VIEW_BACKENDS)}")
        self.sizes, self.norms, self.scale, self.flip, self.jitter = list(sizes), list(norms), scale, flip, jitter
        self.backend = backend

    def _jittered_crop(self, image: Image.Image, generator: torch.Generator) -> Image.Image:
        """The random crop of ``image``, flipped and jittered at its own resolution (every random draw)."""
        _require_tv()
        top, left, h, w = random_resized_crop_params(image.width, image.height, generator, self.scale)
        crop = image.crop((left, top, left + w, top + h))
        if float(torch.rand((), generator=generator)) < self.flip:
            crop = TF.hflip(crop)
        if self.jitter:
            crop = self._jitter(crop, generator)
        return crop

    def render(self, image: Image.Image, generator: torch.Generator) -> List[Image.Image]:
        """The un-normalised PIL views, one per size."""
        crop = self._jittered_crop(image, generator)
        return [crop.resize((s, s), Image.BILINEAR) for s in self.sizes]

    def render_uint8(self, image: Image.Image, generator: torch.Generator) -> List[Tensor]:
        """The views as (3, s, s) uint8 tensors, one per size, resized by torchvision (``"tensor"`` backend)."""
        if TF2 is None:
            raise ImportError("the 'tensor' view backend needs torchvision.transforms.v2 (torchvision >= 0.16)")
        crop = torch.from_numpy(np.array(self._jittered_crop(image, generator))).permute(2, 0, 1)  # (3, h, w) view
        return [TF2.resize(crop, [s, s], interpolation=TF2.InterpolationMode.BILINEAR, antialias=True)
                for s in self.sizes]

    def _jitter(self, image: Image.Image, generator: torch.Generator) -> Image.Image:
        brightness, contrast, saturation, hue = self.jitter
        factors = torch.rand(4, generator=generator)
        order = torch.randperm(4, generator=generator).tolist()
        b = 1 + brightness * (2 * float(factors[0]) - 1)
        c = 1 + contrast * (2 * float(factors[1]) - 1)
        s = 1 + saturation * (2 * float(factors[2]) - 1)
        hh = hue * (2 * float(factors[3]) - 1)
        ops = [lambda im: TF.adjust_brightness(im, b), lambda im: TF.adjust_contrast(im, c),
               lambda im: TF.adjust_saturation(im, s), lambda im: TF.adjust_hue(im, hh)]
        for i in order:
            image = ops[i](image)
        return image

    def __call__(self, image: Image.Image, generator: torch.Generator) -> List[Tensor]:
        return [to_tensor_normalized(v, m, s) for v, (m, s) in zip(self.render(image, generator), self.norms)]


def mix_and_normalize(views: Tensor, weights: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(..., K, 3, s, s)`` uint8 views and ``(..., K)`` mixup weights -> ``(..., 3, s, s)`` float32:
    ``sum_k weights_k * views_k / 255``, normalised by ``mean`` / ``std``, on the views' device.

    The same value as normalising each view (``to_tensor_normalized``) and mixing afterwards, as the
    ``"pil"`` backend does (normalising is affine and the weights sum to 1), up to float32 rounding."""
    if views.dtype != torch.uint8 or views.dim() < 4 or weights.shape != views.shape[:-3]:
        raise ValueError(f"views must be (..., K, 3, s, s) uint8 and weights (..., K); got {tuple(views.shape)} "
                         f"{views.dtype} and {tuple(weights.shape)}")
    device = views.device
    w = weights.to(device, torch.float32)[..., None, None, None]
    mixed = (views[..., 0, :, :, :].float() * w[..., 0, :, :, :])
    for k in range(1, views.shape[-4]):
        mixed.add_(views[..., k, :, :, :].float() * w[..., k, :, :, :])
    scale = torch.tensor([1 / (255 * v) for v in std], device=device).view(3, 1, 1)
    shift = torch.tensor([m / v for m, v in zip(mean, std)], device=device).view(3, 1, 1)
    return mixed.mul_(scale).sub_(shift)


def sample_generator(seed: int, epoch: int, index: int, salt: int = 0) -> torch.Generator:
    """A generator for one sample of one epoch, independent of workers and of the sampling order."""
    mixed = (seed * 1_000_003 + epoch) * 1_000_033 + index * 7919 + salt
    return torch.Generator().manual_seed(mixed % (2**63 - 1))


__all__ = ["EvalTransform", "PairedViews", "VIEW_BACKENDS", "mix_and_normalize", "random_resized_crop_params", "sample_generator", "to_tensor_normalized"]
