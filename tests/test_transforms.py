"""Paired views share their crop exactly; samples are pure functions of (seed, epoch, index)."""
import numpy as np
import pytest
import torch
from PIL import Image

from lib.data.training import _beta_sample
from lib.data.transforms import (EvalTransform, PairedViews, _jitter_ops, _lut_nodes, fused_jitter,
                                  random_resized_crop_params, sample_generator)


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



# -- the 'tensor' view backend (issue 13) --------------------------------------------------------------


def _jpegs(tmp_path, count=5):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        w, h = (61 + 17 * i, 47 + 9 * i)  # odd sizes: crops get up- and down-sampled
        field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        pixels = np.asarray(field, dtype=np.int16) + rng.integers(-20, 21, (h, w, 3))
        path = tmp_path / f"{i}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


NORMS = [((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]


def _level_differences(tmp_path, mixup, jitter, sizes=(24, 56), count=5, pos_num=3):
    """|tensor - pil| in grey levels (0-255) of every view pixel, mixed and normalised, seed 5 epoch 2."""
    from lib.data.training import PairedViewDataset
    from lib.data.transforms import mix_and_normalize

    paths = _jpegs(tmp_path, count)
    make = lambda backend: PairedViewDataset(paths, list(range(len(paths))), PairedViews(
        list(sizes), NORMS, scale=(0.08, 1.0), jitter=jitter, backend=backend), pos_num=pos_num, mixup_alpha=mixup, seed=5)
    old, new = make("pil"), make("tensor")
    for ds in (old, new):
        ds.set_epoch(2)
    levels = []
    for index in range(len(paths)):
        reference, ours = old[index], new[index]
        assert ours[3:] == reference[2:]  # label, index
        weights = ours[2]
        assert weights.shape == (pos_num, 2 if mixup else 1)
        assert torch.allclose(weights.sum(1), torch.ones(pos_num))
        for k, (mean, std) in enumerate(NORMS):
            assert ours[k].dtype == torch.uint8
            got = mix_and_normalize(ours[k], weights, mean, std)
            assert got.shape == reference[k].shape
            levels.append((((got - reference[k]) * torch.tensor(std).view(3, 1, 1)).abs() * 255).flatten())
    return torch.cat(levels)


@pytest.mark.parametrize("mixup", [0.2, 0.0])
def test_tensor_backend_resizes_like_pil_within_one_level(tmp_path, mixup):
    """Without colour jitter the backends differ only in the resizer (1/255 at most) and, with mixup, in
    the components lighter than 1/510 that 'tensor' drops (under half a level): every pixel of every
    view, mixed and normalised, within 1/255 (1.5/255 with mixup; plus float32 rounding) of the 'pil'
    one; most pixels equal."""
    levels = _level_differences(tmp_path, mixup, jitter=None)
    assert float(levels.max()) <= (1.5 if mixup else 1) + 1e-3
    assert float((levels > 1e-3).float().mean()) < 0.2


@pytest.mark.parametrize("mixup", [0.2, 0.0])
def test_tensor_backend_gives_the_pil_views_within_the_stated_tolerance(tmp_path, mixup):
    """The tolerance stated in PairedViews' docstring and the README, on colour JPEGs (smooth random
    colour fields plus noise) with the default jitter: mean |tensor - pil| per pixel under 1 grey level,
    the largest difference at most 24 levels, fewer than 1 pixel in 100 more than 4 levels apart."""
    levels = _level_differences(tmp_path, mixup, jitter=(0.4, 0.4, 0.4, 0.1), sizes=(56, 112), count=6, pos_num=4)
    assert float(levels.mean()) < 1.0
    assert float(levels.max()) <= 24
    assert float((levels > 4).float().mean()) < 0.01


def test_pil_jitter_is_torchvision_colour_ops_in_the_drawn_order():
    """The 'pil' backend's jitter stays torchvision's four PIL operations (its views reproduce recorded runs)."""
    from torchvision.transforms import functional as TF

    image, views = gradient_image(90, 70), PairedViews([16], NORMS[:1])
    for index in range(12):
        factors, order = views._jitter_draws(sample_generator(2, 0, index))
        expected = image
        for op in order:
            expected = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue][op](expected, factors[op])
        assert np.array_equal(np.asarray(_jitter_ops(image, factors, order)), np.asarray(expected)), index


def test_fused_jitter_is_pillows_at_the_table_nodes():
    """On the colours of the table's nodes the fused jitter is Pillow's exactly (contrast first, so its mean
    is the image's own); between nodes it interpolates (the bound is the test above)."""
    nodes, views = _lut_nodes(18), PairedViews([16], NORMS[:1])
    for index in range(12):
        factors, order = views._jitter_draws(sample_generator(4, 0, index))
        order = [1] + [op for op in order if op != 1]
        assert np.array_equal(np.asarray(fused_jitter(nodes, factors, order, 18)),
                              np.asarray(_jitter_ops(nodes, factors, order))), index
    with pytest.raises(ValueError, match="lut_size must be in"):
        PairedViews([8], NORMS[:1], backend="tensor", lut_size=1)


def test_fused_jitter_estimates_the_contrast_mean_within_one_level(tmp_path):
    """When contrast is not first, its grey mean comes from the preceding operations' table on a 1/16
    sample of the crop; Pillow takes it from all pixels after the exact operations."""
    from lib.data.transforms import _grey_mean, _sampled_grey_mean

    images = [Image.open(p).convert("RGB").resize((250, 190)) for p in _jpegs(tmp_path, 4)]
    views, checked = PairedViews([16], NORMS[:1]), 0
    for index in range(60):
        gen = sample_generator(6, 0, index)
        image = images[index % len(images)]
        top, left, h, w = random_resized_crop_params(image.width, image.height, gen)
        crop = image.crop((left, top, left + w, top + h))
        factors, order = views._jitter_draws(gen)
        before = order[:order.index(1)]
        if before:
            exact = _grey_mean(_jitter_ops(crop, factors, before))
            estimate = _sampled_grey_mean(crop, _jitter_ops(_lut_nodes(18), factors, before), 18)
            assert abs(estimate - exact) <= 1, (index, estimate, exact)
            checked += 1
    assert checked > 30


def test_tensor_backend_draws_exactly_what_the_pil_backend_draws():
    """Both backends consume the per-sample generator identically, so a resumed run (which re-creates
    the generator from (seed, epoch, index)) sees the same crops, flips, jitter and mixup either way."""
    image = gradient_image(90, 70)
    views = PairedViews([16, 32], NORMS)
    for index in range(10):
        a, b = sample_generator(3, 1, index), sample_generator(3, 1, index)
        views.render(image, a)
        views.render_uint8(image, b)
        assert torch.equal(a.get_state(), b.get_state()), index


def test_tensor_backend_samples_are_pure_functions_of_seed_epoch_index(tmp_path):
    from lib.data.training import PairedViewDataset

    paths = _jpegs(tmp_path, 3)
    ds = PairedViewDataset(paths, [0, 1, 2], PairedViews([16, 32], NORMS, backend="tensor"), 2, 0.2, seed=1)
    ds.set_epoch(4)
    first = ds[1]
    ds.set_epoch(5)
    other = ds[1]
    ds.set_epoch(4)
    again = ds[1]
    assert all(torch.equal(x, y) for x, y in zip(first[:3], again[:3]))
    assert not torch.equal(first[0], other[0])


def test_mix_and_normalize_is_normalize_then_mix():
    g = torch.Generator().manual_seed(0)
    views = torch.randint(0, 256, (4, 2, 3, 5, 6), generator=g, dtype=torch.uint8)
    lam = torch.rand(4, generator=g)
    weights = torch.stack([lam, 1 - lam], 1)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.2)
    from torchvision.transforms import functional as TF
    from lib.data.transforms import mix_and_normalize

    expected = torch.stack([lam[i] * TF.normalize(views[i, 0].float() / 255, mean, std)
                            + (1 - lam[i]) * TF.normalize(views[i, 1].float() / 255, mean, std) for i in range(4)])
    assert torch.allclose(mix_and_normalize(views, weights, mean, std), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="uint8"):
        mix_and_normalize(views.float(), weights, mean, std)
    with pytest.raises(ValueError, match="unknown view backend 'gpu'"):
        PairedViews([8], NORMS[:1], backend="gpu")
