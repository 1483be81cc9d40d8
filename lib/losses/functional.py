"""The maths the objectives and miners share: distances, masked log-sum-exp, the label-range check.

One home for each (they existed twice or three times under near-identical names). Pure functions on
row embeddings ``(N, D)``; nothing here holds state.
"""
from __future__ import annotations

import torch
from torch import Tensor

#: added under the square root of a distance a loss differentiates: the gradient of sqrt at 0 is
#: infinite, that of sqrt(d^2 + EPS) is finite (Revisiting-DML's losses add 1e-8 the same way)
EPS = 1e-8


def squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """(N, M) squared Euclidean distances between the rows of ``x`` and ``y`` by expansion
    (``|x|^2 + |y|^2 - 2 x.y``), clamped at 0 against the cancellation of the expansion."""
    return (x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1).unsqueeze(0) - 2 * x @ y.T).clamp(min=0)


def euclidean_distances(x: Tensor, y: Tensor, *, eps: float = 0.0, floor: float = 0.0) -> Tensor:
    """(N, M) Euclidean distances ``sqrt(max(|x_i - y_j|^2, floor) + eps)``.

    The callers differ only in how they keep the gradient finite at zero distance, each as the paper or
    code it is checked against: the metric losses add ``eps=EPS`` (Revisiting-DML), Realigned Softmax
    Warping floors the squared distance at ``floor=1e-12`` (its repository, matched to 1e-12), the miners
    need neither (they run without gradient).
    """
    squared = squared_distances(x, y)
    if floor:
        squared = squared.clamp(min=floor)
    return (squared + eps).sqrt() if eps else squared.sqrt()


def row_distances(u: Tensor, v: Tensor, eps: float = EPS) -> Tensor:
    """Row-wise Euclidean distances ``sqrt(|u_k - v_k|^2 + eps)`` of paired rows."""
    return ((u - v).pow(2).sum(-1) + eps).sqrt()


def masked_logsumexp(z: Tensor, mask: Tensor, dim: int = 1) -> Tensor:
    """``log sum_{j in mask} exp(z_j)`` along ``dim``; ``-inf`` where the mask is empty."""
    return torch.logsumexp(z.masked_fill(~mask, float("-inf")), dim=dim)


def masked_log1p_sum_exp(z: Tensor, mask: Tensor, dim: int = 1) -> Tensor:
    """``log(1 + sum_{j in mask} exp(z_j))`` along ``dim``, stable; 0 where the mask is empty."""
    masked = z.masked_fill(~mask, float("-inf"))
    shape = list(masked.shape)
    shape[dim] = 1
    zeros = torch.zeros(shape, dtype=masked.dtype, device=masked.device)
    return torch.logsumexp(torch.cat([zeros, masked], dim=dim), dim=dim)


def check_labels(labels: Tensor, num_classes: int, name: str) -> None:
    """Refuse labels outside ``0..num_classes-1`` (they would index past a per-class parameter)."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{name}: labels must lie in 0..{num_classes - 1} (num_classes={num_classes}), got "
                         f"{int(labels.min())}..{int(labels.max())}; the trainer maps classes to 0..C-1")


__all__ = ["EPS", "squared_distances", "euclidean_distances", "row_distances", "masked_logsumexp",
           "masked_log1p_sum_exp", "check_labels"]
