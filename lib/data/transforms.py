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
from PIL import Image, ImageFilter, ImageStat
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

# the random draws of one view: crop box (top, left, height, width), flip, and jitter (factors, order) or None
ViewDraws = Tuple[Tuple[int, int, int, int], bool, Optional[Tuple[Tuple[float, float, float, float], List[int]]]]


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


def _jitter_ops(image: Image.Image, factors: Tuple[float, float, float, float], order: Sequence[int],
                contrast_mean: Optional[int] = None) -> Image.Image:
    """Pillow's brightness, contrast, saturation and hue adjustments (torchvision's ``ColorJitter`` on
    PIL images) in ``order`` (0: brightness, ...); ``contrast_mean`` replaces the grey mean that
    contrast otherwise takes from the image it is given."""
    brightness, contrast, saturation, hue = factors
    for op in order:
        if op == 0:
            image = TF.adjust_brightness(image, brightness)
        elif op == 1:
            if contrast_mean is None:
                image = TF.adjust_contrast(image, contrast)
            else:  # ImageEnhance.Contrast with a given mean: blend towards a flat grey of that level
                image = Image.blend(Image.new("L", image.size, contrast_mean).convert(image.mode), image, contrast)
        elif op == 2:
            image = TF.adjust_saturation(image, saturation)
        else:
            image = TF.adjust_hue(image, hue)
    return image


def _grey_mean(image: Image.Image) -> int:
    """The grey level Pillow's contrast blends towards: the rounded mean of the image's "L" conversion."""
    return int(ImageStat.Stat(image.convert("L")).mean[0] + 0.5)


_LUT_NODES = {}


def _lut_nodes(size: int) -> Image.Image:
    """The ``size ** 3`` nodes of a Color3DLUT as one RGB image, red varying fastest (the table order)."""
    if size not in _LUT_NODES:
        levels = np.rint(np.arange(size) * 255 / (size - 1)).astype(np.uint8)
        b, g, r = np.meshgrid(levels, levels, levels, indexing="ij")
        _LUT_NODES[size] = Image.fromarray(np.stack([r, g, b], -1).reshape(size * size, size, 3))
    return _LUT_NODES[size]


def fused_jitter(image: Image.Image, factors: Tuple[float, float, float, float], order: Sequence[int],
                 lut_size: int = 18, mean_stride: int = 4) -> Image.Image:
    """The colour jitter of :func:`_jitter_ops` as one pass of a 3D colour table (``ImageFilter.Color3DLUT``,
    trilinear, ``lut_size`` nodes per channel).

    Brightness, saturation and hue are pointwise colour maps and contrast is one once its grey mean is
    known, so their composition is a single map RGB -> RGB. Its table is Pillow's own four operations
    applied to the table's nodes (exact there; with ``lut_size`` 16 or 18 every node is an integer
    level), and the image takes one interpolated pass instead of four (hue's HSV round trip alone costs
    nearly twice that pass). The grey mean of contrast is the image's own when contrast comes first (as
    in Pillow); otherwise it is that of every ``mean_stride``-th pixel of every ``mean_stride``-th row
    mapped by the preceding operations' table, an estimate of Pillow's mean of all pixels after the
    exact operations (within 1 level in tests/test_transforms.py).

    Where the four maps bend (clipping at 0 and 255, hue sextant borders) and where Pillow's uint8 HSV
    round trip is noisy, the interpolated value differs from Pillow's (the bound measured on views is
    stated in :class:`PairedViews`)."""
    contrast_at = list(order).index(1)
    nodes = _jitter_ops(_lut_nodes(lut_size), factors, order[:contrast_at])
    if contrast_at == 0:
        mean = _grey_mean(image)
    else:
        mean = _sampled_grey_mean(image, nodes, lut_size, mean_stride)
    return image.filter(_color_table(_jitter_ops(nodes, factors, order[contrast_at:], contrast_mean=mean), lut_size))


def _sampled_grey_mean(image: Image.Image, nodes: Image.Image, lut_size: int, stride: int = 4) -> int:
    """:func:`_grey_mean` of ``image`` mapped by the colour table ``nodes``, from every ``stride``-th
    pixel of every ``stride``-th row (an estimate of the mean over all pixels)."""
    sample = image.resize((max(1, image.width // stride), max(1, image.height // stride)), Image.NEAREST)
    return _grey_mean(sample.filter(_color_table(nodes, lut_size)))


def _color_table(nodes: Image.Image, size: int) -> ImageFilter.Color3DLUT:
    """The Color3DLUT whose node ``i`` maps to pixel ``i`` of ``nodes`` (the image of :func:`_lut_nodes` mapped)."""
    return ImageFilter.Color3DLUT(size, np.asarray(nodes, dtype=np.float32).reshape(-1) / 255, _copy_table=False)


class PairedViews:
    """One random crop, flip and colour jitter, rendered at several sizes (student's, teacher's, ...).

    The crop is taken and jittered at the image's own resolution and resized last, so the views at
    every size show exactly the same content (the paper's synchronised student/teacher views).

    ``backend`` says how the crop is jittered and becomes the views (crop, flip and jitter come from
    the same generator draws in both, so both see the same crop, flip and colour factors, and a
    resumed run draws the same):

    - ``"pil"``: Pillow's four jitter operations (torchvision's ``ColorJitter`` on PIL images), Pillow's
      bilinear resize, then float tensors normalised in the worker (``__call__``); bit-identical to the
      views of every recorded run;
    - ``"tensor"``: the jitter as one 3D colour-table pass (:func:`fused_jitter`, ``lut_size`` nodes per
      channel), torchvision's uint8 bilinear antialiased resize (``render_uint8``), normalising and
      mixup left to :func:`mix_and_normalize` on the training device; the worker ships uint8 (with
      mixup both images: half the bytes of one float32 view), and with mixup
      :class:`~lib.data.training.PairedViewDataset` skips components lighter than 1/510.

    Tolerance of ``"tensor"`` against ``"pil"`` (grey levels of 0-255 per pixel of the mixed views,
    checked by tests/test_transforms.py on colour JPEGs): mean difference under 1 level, at most 24
    levels at any pixel, fewer than 1% of the pixels more than 4 levels apart. Without jitter the
    difference is the resizers' rounding, at most 1 level (1.5 with mixup). The large differences sit
    where the jitter clips saturated colours at 0 or 255 (the table interpolates across the bend);
    at the paper's sizes (224 / 448 px, 500 x 375 JPEG, mixup 0.2; ``bench_pipeline.py
    --compare-samples 32``) the mean is 0.65 level.
    """

    def __init__(self, sizes: Sequence[int], norms: Sequence[Tuple[Sequence[float], Sequence[float]]],
                 scale: Tuple[float, float] = (0.08, 1.0), flip: float = 0.5,
                 jitter: Optional[Tuple[float, float, float, float]] = (0.4, 0.4, 0.4, 0.1), backend: str = "pil",
                 lut_size: int = 18):
        if len(sizes) != len(norms):
            raise ValueError("one (mean, std) per size")
        if backend not in VIEW_BACKENDS:
            raise ValueError(f"unknown view backend {backend!r}: choose one of {', '.join(VIEW_BACKENDS)}")
        self.sizes, self.norms, self.scale, self.flip, self.jitter = list(sizes), list(norms), scale, flip, jitter
        if not 2 <= lut_size <= 65:
            raise ValueError(f"lut_size must be in [2, 65] (Pillow's Color3DLUT), got {lut_size}")
        self.backend, self.lut_size = backend, int(lut_size)

    def draw(self, width: int, height: int, generator: torch.Generator) -> ViewDraws:
        """Every random draw of one view of a ``width`` x ``height`` image: the crop box (top, left,
        height, width), the flip, the jitter factors and order (None without jitter). Only the image's
        size is needed, so a view can be drawn before (or without) decoding its image."""
        box = random_resized_crop_params(width, height, generator, self.scale)
        flip = float(torch.rand((), generator=generator)) < self.flip
        return box, flip, (self._jitter_draws(generator) if self.jitter else None)

    def _jittered_crop(self, image: Image.Image, draws: ViewDraws, fused: bool = False) -> Image.Image:
        """The drawn crop of ``image``, flipped and jittered at its own resolution.

        ``fused``: the four jitter operations as one colour table (:func:`fused_jitter`) instead of
        Pillow's four passes; the same draws either way."""
        _require_tv()
        (top, left, h, w), flip, jitter = draws
        crop = image.crop((left, top, left + w, top + h))
        if flip:
            crop = TF.hflip(crop)
        if jitter is not None:
            factors, order = jitter
            crop = fused_jitter(crop, factors, order, self.lut_size) if fused else _jitter_ops(crop, factors, order)
        return crop

    def render(self, image: Image.Image, generator: torch.Generator) -> List[Image.Image]:
        """The un-normalised PIL views, one per size."""
        crop = self._jittered_crop(image, self.draw(image.width, image.height, generator))
        return [crop.resize((s, s), Image.BILINEAR) for s in self.sizes]

    def render_uint8(self, image: Image.Image, generator: torch.Generator) -> List[Tensor]:
        """The views as (3, s, s) uint8 tensors, one per size, resized by torchvision (``"tensor"`` backend)."""
        return self.render_drawn_uint8(image, self.draw(image.width, image.height, generator))

    def render_drawn_uint8(self, image: Image.Image, draws: ViewDraws) -> List[Tensor]:
        """:meth:`render_uint8` of views drawn beforehand by :meth:`draw`."""
        if TF2 is None:
            raise ImportError("the 'tensor' view backend needs torchvision.transforms.v2 (torchvision >= 0.16)")
        crop = torch.from_numpy(np.array(self._jittered_crop(image, draws, fused=True))).permute(2, 0, 1)  # (3, h, w)
        return [TF2.resize(crop, [s, s], interpolation=TF2.InterpolationMode.BILINEAR, antialias=True)
                for s in self.sizes]

    def _jitter_draws(self, generator: torch.Generator) -> Tuple[Tuple[float, float, float, float], List[int]]:
        """(brightness, contrast, saturation, hue) factors and the order of the four operations."""
        brightness, contrast, saturation, hue = self.jitter
        factors = torch.rand(4, generator=generator)
        order = torch.randperm(4, generator=generator).tolist()
        return (1 + brightness * (2 * float(factors[0]) - 1), 1 + contrast * (2 * float(factors[1]) - 1),
                1 + saturation * (2 * float(factors[2]) - 1), hue * (2 * float(factors[3]) - 1)), order

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
    scale = torch.tensor([1 / (255 * v) for v in std], device=device).view(3, 1, 1)
    shift = torch.tensor([m / v for m, v in zip(mean, std)], device=device).view(3, 1, 1)
    coefficients = weights.to(device, torch.float32)[..., None, None, None] * scale  # (..., K, 3, 1, 1)
    # one pass per view, in place (on the CPU a cast copy then in-place ops beat out-of-place promotion)
    mixed = torch.empty(views.shape[:-4] + views.shape[-3:], dtype=torch.float32, device=device)
    mixed.copy_(views[..., 0, :, :, :]).mul_(coefficients[..., 0, :, :, :])
    for k in range(1, views.shape[-4]):
        mixed.addcmul_(views[..., k, :, :, :], coefficients[..., k, :, :, :])
    return mixed.sub_(shift)


def sample_generator(seed: int, epoch: int, index: int, salt: int = 0) -> torch.Generator:
    """A generator for one sample of one epoch, independent of workers and of the sampling order."""
    mixed = (seed * 1_000_003 + epoch) * 1_000_033 + index * 7919 + salt
    return torch.Generator().manual_seed(mixed % (2**63 - 1))


__all__ = ["EvalTransform", "PairedViews", "VIEW_BACKENDS", "fused_jitter", "mix_and_normalize", "random_resized_crop_params", "sample_generator", "to_tensor_normalized"]
