"""Global pooling of a (N, C, H, W) feature map into (N, C) descriptors.

Functional forms follow cirtorch (Radenovic et al., "Fine-tuning CNN image retrieval with no human
annotation", TPAMI 2018): MAC (max), SPoC (average), GeM (generalised mean with exponent p), and
R-MAC (Tolias et al., ICLR 2016: sum of MACs over a multi-scale grid of square regions).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lib.registry import Registry

POOLING = Registry("pooling")


def mac(x: Tensor) -> Tensor:
    return x.amax(dim=(-2, -1))


def spoc(x: Tensor) -> Tensor:
    return x.mean(dim=(-2, -1))


def gem(x: Tensor, p: Tensor | float = 3.0, eps: float = 1e-6) -> Tensor:
    """(mean over H, W of clamp(x, eps)^p)^(1/p); ``p`` is a scalar or a (C,) tensor."""
    if isinstance(p, Tensor) and p.numel() > 1:
        p = p.view(1, -1, 1, 1)
        return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p.view(1, -1))
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def rmac_regions(height: int, width: int, levels: int = 3, overlap: float = 0.4):
    """Square regions ``(top, left, size)`` of R-MAC's multi-scale grid (Tolias et al. 2016).

    Level ``l`` uses squares of side ``floor(2 * min(H, W) / (l + 1))``: ``l`` of them along the short
    side and ``l + extra`` along the long side, ``extra`` chosen so consecutive regions overlap by
    about ``overlap`` (the rule of cirtorch's ``rmac``).
    """
    short = min(height, width)
    extra = 0
    if height != width:
        steps = torch.arange(2, 8, dtype=torch.float64)
        stride = (max(height, width) - short) / (steps - 1)
        extra = int(torch.argmin(((short**2 - short * stride) / short**2 - overlap).abs())) + 1
    extra_h, extra_w = (extra, 0) if height > width else (0, extra)
    regions = []
    for level in range(1, levels + 1):
        size = math.floor(2 * short / (level + 1))
        if size == 0:
            continue
        half = math.floor(size / 2 - 1)

        def starts(length: int, count: int):
            step = 0.0 if count == 1 else (length - size) / (count - 1)
            return [math.floor(half + i * step) - half for i in range(count)]

        regions += [(t, l, size) for t in starts(height, level + extra_h) for l in starts(width, level + extra_w)]
    return regions


def rmac(x: Tensor, levels: int = 3, eps: float = 1e-6) -> Tensor:
    """Sum over regions of the L2-normalised regional MAC (plus the global MAC), as cirtorch."""
    out = F.normalize(mac(x), dim=-1, eps=eps)
    for top, left, size in rmac_regions(x.shape[-2], x.shape[-1], levels):
        out = out + F.normalize(mac(x[..., top : top + size, left : left + size]), dim=-1, eps=eps)
    return out


@POOLING.register("mac")
class MAC(nn.Module):
    def __init__(self, num_features: int | None = None):
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return mac(x)


@POOLING.register("spoc")
class SPoC(nn.Module):
    def __init__(self, num_features: int | None = None):
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return spoc(x)


@POOLING.register("gem")
class GeM(nn.Module):
    """GeM with one learnable exponent ``p`` (initial value 3)."""

    def __init__(self, num_features: int | None = None, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.full((1,), float(p)))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return gem(x, self.p, self.eps)

    def extra_repr(self) -> str:
        return f"p={self.p.detach().flatten().tolist()}, eps={self.eps}"


@POOLING.register("gemmp")
class GeMmp(nn.Module):
    """GeM with one learnable exponent per channel ("multi-p")."""

    def __init__(self, num_features: int, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        if not num_features:
            raise ValueError("gemmp pooling needs the number of feature channels")
        self.p = nn.Parameter(torch.full((num_features,), float(p)))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return gem(x, self.p, self.eps)


@POOLING.register("rmac")
class RMAC(nn.Module):
    def __init__(self, num_features: int | None = None, levels: int = 3, eps: float = 1e-6):
        super().__init__()
        self.levels, self.eps = levels, eps

    def forward(self, x: Tensor) -> Tensor:
        return rmac(x, self.levels, self.eps)


__all__ = ["POOLING", "mac", "spoc", "gem", "rmac", "rmac_regions", "MAC", "SPoC", "GeM", "GeMmp", "RMAC"]
