"""Embedding extraction: images -> (N, D) rows, batched, optional multi-scale, on any device."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from lib.data.datasets import ImageList
from lib.data.transforms import EvalTransform
from lib.models.net import RetrievalNet
from lib.utils import autocast_context


def multiscale_power(net: RetrievalNet, scales: Sequence[float]) -> float:
    """The exponent used to average multi-scale descriptors: GeM's p for a plain GeM network (as in
    cirtorch), 1 otherwise. Multi-scale works with every pooling (the reference raised KeyError)."""
    if len(scales) > 1 and net.meta.get("pooling") == "gem" and not net.meta.get("whitening"):
        return float(net.pool.p.detach().mean())
    return 1.0


@torch.no_grad()
def embed_batch(net: RetrievalNet, images: Tensor, scales: Sequence[float] = (1.0,), power: float = 1.0,
                pooled: bool = False) -> Tensor:
    forward = net.pooled if pooled else net
    if len(scales) == 1 and scales[0] == 1:
        return forward(images).float()
    total = 0
    for s in scales:
        x = images if s == 1 else F.interpolate(images, scale_factor=s, mode="bilinear", align_corners=False)
        total = total + forward(x).float().pow(power)  # non-negative whenever power != 1 (plain GeM)
    return F.normalize((total / len(scales)).pow(1.0 / power), dim=-1)


def eval_transform(net: RetrievalNet, image_size: int) -> EvalTransform:
    """The test transform of ``net`` (its own mean/std) at ``image_size``: the one :func:`extract` uses and
    whose ``describe()`` enters the embedding cache key."""
    return EvalTransform(image_size, net.meta["mean"], net.meta["std"])


@torch.no_grad()
def extract(net: RetrievalNet, paths: Sequence[str], image_size: int, *, device: torch.device | str = "cpu",
            batch_size: int = 64, workers: int = 0, scales: Sequence[float] = (1.0,), amp: Optional[str] = None,
            channels_last: bool = False, progress: Optional[str] = None, pooled: bool = False) -> Tensor:
    """Embeddings (N, D) float32 on the CPU of ``paths`` with ``net``'s own mean/std at ``image_size``
    (``pooled``: the L2-normalised pooled descriptors that enter the whitening, (N, num_features))."""
    device = torch.device(device)
    transform = eval_transform(net, image_size)
    loader = DataLoader(ImageList(list(paths), transform=transform), batch_size=batch_size, shuffle=False,
                        num_workers=workers, pin_memory=device.type == "cuda",
                        # its own generator: extraction must not draw from the global RNG, or a teacher
                        # cache hit (no extraction) would change a training run that a miss would not
                        generator=torch.Generator().manual_seed(0))
    was_training = net.training
    net.eval()
    power = multiscale_power(net, scales)
    out = torch.empty(len(paths), int(net.meta["num_features"]) if pooled else net.outputdim)
    iterator = loader
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(loader, desc=progress, unit="batch", leave=False, dynamic_ncols=True, disable=None)
    start = 0
    for images, _, _ in iterator:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, amp):
            vecs = embed_batch(net, images, scales, power, pooled)
        out[start : start + len(vecs)] = vecs.float().cpu()
        start += len(vecs)
    net.train(was_training)
    return out


def embedding_key(net: RetrievalNet, paths: Sequence[str], image_size: int, *, scales: Sequence[float] = (1.0,),
                  amp: Optional[str] = None, pooled: bool = False) -> dict:
    """The cache key of ``extract(net, paths, image_size, ...)``: everything that changes its values.

    The network's content (tensors and the metadata that defines its function, not the file it came from
    nor the size it was trained at: ``lib.checkpoint.network_fingerprint``), the image list (absolute paths,
    so the dataset, its root and the subset), the size, the eval transform's own description, the scales,
    the autocast dtype (``--amp bf16`` embeddings differ from float32 ones) and whether the pooled
    descriptors or the embeddings are returned. Left out: batch size, workers, device and memory format,
    which change float rounding only (the last bits), not what is computed.
    """
    from lib.cache import network_fingerprint, paths_fingerprint

    return dict(network=network_fingerprint(net), paths=paths_fingerprint(paths), image_size=int(image_size),
                transform=eval_transform(net, image_size).describe(), scales=[float(s) for s in scales],
                amp=amp if amp and amp != "none" else "none", output="pooled" if pooled else "embedding")


def cached_extract(cache, net: RetrievalNet, paths: Sequence[str], image_size: int, *, scales: Sequence[float] = (1.0,),
                   amp: Optional[str] = None, pooled: bool = False, **kwargs) -> Tensor:
    """:func:`extract` through an :class:`~lib.cache.EmbeddingCache` (``None``: no cache), keyed by
    :func:`embedding_key`."""
    compute = lambda: extract(net, paths, image_size, scales=scales, amp=amp, pooled=pooled, **kwargs)  # noqa: E731
    if cache is None:
        return compute()
    return cache.get_or_compute(embedding_key(net, paths, image_size, scales=scales, amp=amp, pooled=pooled), compute)


__all__ = ["extract", "cached_extract", "embedding_key", "eval_transform", "embed_batch", "multiscale_power"]
