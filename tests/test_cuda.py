"""Checks that need a CUDA device: the same numbers on the GPU as on the CPU. Skipped without CUDA;
``benchmarks/gpu_check.sh`` runs them (``pytest -m cuda``)."""
import pytest
import torch

from lib.data.transforms import mix_and_normalize
from lib.evaluation.metrics import retrieval_metrics

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def clustered(n, dim, classes, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (n,), generator=g)
    centroids = torch.nn.functional.normalize(torch.randn(classes, dim, generator=g), dim=1)
    x = torch.nn.functional.normalize(centroids[labels] + 0.3 * torch.randn(n, dim, generator=g), dim=1)
    return x, labels


@pytest.mark.parametrize("classes", [40, 400])  # CUB-like (dense path, large classes) and SOP-like
def test_metrics_on_cuda_equal_the_cpu_ones(classes):
    """Embeddings rounded to multiples of 1/64 make every similarity exact in float32 on both devices,
    so the ranks, hence the metrics, must agree exactly."""
    x, labels = clustered(3000, 64, classes, 0)
    x = (x * 8).round() / 64
    cpu = retrieval_metrics(x, x, labels, labels, exclude_self=True)
    gpu = retrieval_metrics(x.cuda(), x.cuda(), labels.cuda(), labels.cuda(), exclude_self=True)
    assert gpu == pytest.approx(cpu, abs=1e-12)


def test_metrics_on_cuda_are_close_on_real_valued_embeddings():
    x, labels = clustered(5000, 128, 100, 1)
    cpu = retrieval_metrics(x, x, labels, labels, exclude_self=True)
    gpu = retrieval_metrics(x.cuda(), x.cuda(), labels.cuda(), labels.cuda(), exclude_self=True)
    for name in ("mAP", "R@1", "MAP@R"):
        assert gpu[name] == pytest.approx(cpu[name], abs=2e-4), name


def test_mix_and_normalize_on_cuda():
    g = torch.Generator().manual_seed(0)
    views = torch.randint(0, 256, (4, 8, 2, 3, 32, 32), generator=g, dtype=torch.uint8)
    lam = torch.rand(4, 8, generator=g)
    weights = torch.stack([lam, 1 - lam], -1)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    cpu = mix_and_normalize(views, weights, mean, std)
    gpu = mix_and_normalize(views.cuda(), weights, mean, std)
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-5, rtol=0)


def test_ts_aug_step_with_amp_and_channels_last_matches_fp32():
    """One training step's student embeddings under AMP + channels_last stay close to float32's."""
    from lib.models import build_network

    torch.manual_seed(0)
    net = build_network("timm:resnet18", "gem", 64, pretrained=False).eval()
    images = torch.randn(8, 3, 96, 96)
    reference = net(images)
    gpu_net = net.cuda().to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16):
        got = gpu_net(images.cuda().contiguous(memory_format=torch.channels_last)).float()
    cos = torch.nn.functional.cosine_similarity(got.cpu(), reference, dim=1)
    assert float(cos.min()) > 0.99
