"""Paired views share their crop exactly; samples are pure functions of (seed, epoch, index)."""
import numpy as np
import pytest
import torch
from PIL import Image

from lib.data.training import _beta_sample
from lib.data.transforms import EvalTransform, PairedViews, random_resized_crop_params, sample_generator


def gradient_image(w=96, h=80):
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (w + h - 2)], -1).astype(np.uint8)
    return Image.fromarray(rgb)


def test_paired_views_show_the_same_content_at_two_sizes():
    image = gradient_image()
    views = PairedViews([16, 64], [((0, 0, 0), (1, 1, 1))] * 2, jitter=(0.4, 0.4, 0.4, 0.1))
    for index in range(20):
        small, large = views(image, sample_generator(1, 0, index))
        # downsample the large view to the small size: the two views must agree pixel by pixel
        pooled = torch.nn.functional.avg_pool2d(large.unsqueeze(0), 4).squeeze(0)
        assert (pooled - small).abs().mean() < 0.03, index


def test_views_are_deterministic_per_sample_and_vary_across_epochs():
    image = gradient_image()
    views = PairedViews([24, 48], [((0.5,) * 3, (0.5,) * 3)] * 2)
    a = views(image, sample_generator(7, 3, 11))
    b = views(image, sample_generator(7, 3, 11))
    c = views(image, sample_generator(7, 4, 11))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_crop_params_stay_inside_and_follow_the_scale():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_params(50, 30, gen, scale=(0.5, 1.0))
        assert 0 <= top <= 30 - h and 0 <= left <= 50 - w and h * w >= 0.45 * 1500 * 0.9


def test_eval_transform_shape_and_normalisation():
    out = EvalTransform(28, [0.5] * 3, [0.5] * 3)(gradient_image())
    assert out.shape == (3, 28, 28) and -1 <= float(out.min()) and float(out.max()) <= 1


def test_beta_sampler_moments():
    gen = torch.Generator().manual_seed(0)
    samples = torch.tensor([_beta_sample(0.2, gen) for _ in range(20000)])
    # Beta(0.2, 0.2): mean 1/2, variance ab/((a+b)^2 (a+b+1)) = 0.04 / (0.16 * 1.4)
    assert float(samples.mean()) == pytest.approx(0.5, abs=0.01)
    assert float(samples.var()) == pytest.approx(0.04 / (0.16 * 1.4), rel=0.03)

