"""The retrieval network: backbone -> pooling -> L2 -> optional whitening Linear -> L2, rows out."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lib.models.backbones import create_backbone
from lib.models.pooling import POOLING

META_VERSION = 1


class RetrievalNet(nn.Module):
    """Image batch (N, 3, H, W) -> unit-norm embeddings (N, D).

    ``meta`` is a plain dict (architecture, pooling, whitening, mean, std, outputdim, image_size, ...)
    that, stored beside the state dict, is enough to rebuild the network (see ``lib.checkpoint``).
    """

    def __init__(self, backbone: nn.Module, pool: nn.Module, whiten: Optional[nn.Linear], meta: Dict[str, Any]):
        super().__init__()
        self.backbone = backbone
        self.pool = pool
        self.whiten = whiten
        self.meta = dict(meta)

    def embed(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """(normalised, raw): ``raw`` is the output before the final L2 normalisation, for objectives
        that act on the norm (SEC, L2-norm regularisation, softmax warping)."""
        features = self.backbone(x)
        pooled = self.pool(features).float()  # pooling and whitening in fp32 also under autocast
        raw = pooled
        if self.whiten is not None:
            raw = self.whiten(F.normalize(pooled, dim=-1).to(self.whiten.weight.dtype)).float()
        return F.normalize(raw, dim=-1), raw

    def pooled(self, x: Tensor) -> Tensor:
        """The L2-normalised pooled descriptor, the whitening's input."""
        return F.normalize(self.pool(self.backbone(x)).float(), dim=-1)

    def forward(self, x: Tensor, return_raw: bool = False):
        normalized, raw = self.embed(x)
        return (normalized, raw) if return_raw else normalized

    @property
    def outputdim(self) -> int:
        return int(self.meta["outputdim"])

    def extra_repr(self) -> str:
        keys = ("architecture", "pooling", "whitening", "outputdim", "image_size")
        return ", ".join(f"{k}={self.meta.get(k)}" for k in keys)


def build_network(
    architecture: str,
    pooling: str = "gem",
    whitening: int = 0,
    pretrained: bool = True,
    weights: Optional[str] = None,
    image_size: Optional[int] = None,
) -> RetrievalNet:
    """A retrieval network from a timm or torchvision backbone name (see ``create_backbone``)."""
    backbone = create_backbone(architecture, pretrained=pretrained, weights=weights)
    pool = POOLING.build(pooling, num_features=backbone.num_features)
    whiten = nn.Linear(backbone.num_features, whitening, bias=True) if whitening else None
    meta = {
        "version": META_VERSION,
        "architecture": architecture,
        "library": backbone.library,
        "pooling": pooling,
        "whitening": int(whitening or 0),
        "mean": [float(v) for v in backbone.mean],
        "std": [float(v) for v in backbone.std],
        "num_features": int(backbone.num_features),
        "outputdim": int(whitening or backbone.num_features),
        "image_size": image_size,
    }
    return RetrievalNet(backbone.module, pool, whiten, meta)


def network_from_meta(meta: Dict[str, Any]) -> RetrievalNet:
    """An untrained network of the architecture that ``meta`` describes (weights come from a state dict)."""
    for key in ("architecture", "pooling"):
        if key not in meta:
            raise ValueError(f"network metadata lacks {key!r}: {sorted(meta)}")
    net = build_network(meta["architecture"], meta["pooling"], meta.get("whitening") or 0, pretrained=False)
    net.meta.update({k: v for k, v in meta.items() if k not in ("num_features",)})
    net.meta["mean"] = list(meta.get("mean", net.meta["mean"]))
    net.meta["std"] = list(meta.get("std", net.meta["std"]))
    return net


def set_batchnorm_eval(module: nn.Module) -> nn.Module:
    """Freeze BatchNorm running statistics (call after ``.train()``); affine parameters still learn.

    The paper trains with few images per batch, so batch statistics would be noisy; it keeps the
    ImageNet statistics instead.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return module


@torch.no_grad()
def pca_whitening(embeddings: Tensor, dim: int, eps: float = 1e-6) -> Tuple[Tensor, Tensor]:
    """PCA whitening learned from pooled, L2-normalised descriptors (N, C).

    Returns ``(weight (dim, C), bias (dim,))`` such that ``weight @ (x - mean)`` projects onto the top
    ``dim`` principal directions, each scaled to unit variance (Jegou & Chum, ECCV 2012), for
    initialising the whitening ``Linear`` from data.
    """
    x = embeddings.double()
    if dim > min(x.shape):
        raise ValueError(f"PCA whitening to {dim} dimensions needs at least {dim} descriptors of size >= {dim}; "
                         f"got {tuple(x.shape)}")
    mean = x.mean(0)
    cov = (x - mean).T @ (x - mean) / max(len(x) - 1, 1)
    eigval, eigvec = torch.linalg.eigh(cov)
    order = eigval.argsort(descending=True)[:dim]
    weight = (eigvec[:, order] / (eigval[order].clamp(min=0) + eps).sqrt()).T
    bias = -weight @ mean
    return weight.to(embeddings.dtype), bias.to(embeddings.dtype)


@torch.no_grad()
def init_whitening_from_data(net: RetrievalNet, pooled: Tensor) -> None:
    """Set ``net.whiten`` to the PCA whitening of ``pooled`` (N, C) L2-normalised pooled descriptors."""
    if net.whiten is None:
        raise ValueError("the network has no whitening layer (build it with whitening=DIM)")
    set_whitening(net, *pca_whitening(pooled, net.whiten.out_features))


@torch.no_grad()
def regression_whitening(pooled: Tensor, targets: Tensor, ridge: float = 1e-3) -> Tuple[Tensor, Tensor]:
    """The affine map that best sends ``pooled`` (N, C) L2-normalised descriptors onto ``targets`` (N, D).

    Ridge least squares on centred data, ``min ||(X - mx) W^T - (T - mt)||^2 + ridge * N * ||W||^2``, solved
    in closed form (float64); ``bias = mt - W mx``. With ``targets`` the teacher's embeddings of the same
    images, a student's whitening starts in the teacher's space: the linear connector of FitNet
    (Romero et al., ICLR 2015) fitted in one solve instead of by gradient descent. ``ridge`` is relative to
    the mean eigenvalue of the descriptors' covariance, so it does not depend on their scale.
    """
    if pooled.dim() != 2 or targets.dim() != 2 or len(pooled) != len(targets):
        raise ValueError(f"regression whitening needs paired rows, got {tuple(pooled.shape)} and {tuple(targets.shape)}")
    x, t = pooled.double(), targets.double()
    mx, mt = x.mean(0), t.mean(0)
    xc, tc = x - mx, t - mt
    gram = xc.T @ xc
    reg = ridge * max(float(gram.diagonal().mean()), 1e-12)
    weight = torch.linalg.solve(gram + reg * torch.eye(len(gram), dtype=gram.dtype), xc.T @ tc).T
    bias = mt - weight @ mx
    return weight.to(pooled.dtype), bias.to(pooled.dtype)


@torch.no_grad()
def set_whitening(net: RetrievalNet, weight: Tensor, bias: Tensor) -> None:
    if net.whiten is None:
        raise ValueError("the network has no whitening layer (build it with whitening=DIM)")
    if tuple(weight.shape) != tuple(net.whiten.weight.shape):
        raise ValueError(f"whitening of shape {tuple(weight.shape)} does not fit the network's "
                         f"{tuple(net.whiten.weight.shape)}")
    net.whiten.weight.copy_(weight)
    net.whiten.bias.copy_(bias)


__all__ = ["RetrievalNet", "build_network", "network_from_meta", "set_batchnorm_eval",
           "pca_whitening", "init_whitening_from_data", "regression_whitening", "set_whitening"]
