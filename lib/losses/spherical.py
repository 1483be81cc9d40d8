"""Spherical embedding: norm regularisers and the normalized N-pair (tuplet) loss.

Zhang, Li, Zhang, "Deep Metric Learning with Spherical Embedding", NeurIPS 2020
(github Dyfine/SphericalEmbedding, ``learner.py`` and ``loss.py``).

The paper trains on unit-norm embeddings but regularises the norms of the embeddings *before* the
L2 normalisation (``Embeddings.student_raw``), which set the size of the gradients:

* ``sec`` -- spherical embedding constraint (SEC): ``L_sec = 1/N sum_i (||f_i|| - mu)^2``.
* ``l2reg`` -- the L2-norm regulariser it is compared with: ``1/N sum_i ||f_i||^2``.
* ``tuplet`` (alias ``normalized_npair``) -- the normalized N-pair loss, one of the paper's four
  base losses.

The paper's other base losses are not duplicated here; they are the DML losses of
``lib.losses.metric`` (``triplet``, ``multisimilarity``), to be combined with ``sec``, e.g.
``--objective multisimilarity --objective sec:1.0``. The repo's definitions, for checking those:

* semihard triplet: squared Euclidean distances of unit-norm rows, margin 0.2; for every ordered
  positive pair (a, p) the negative is the closest one farther than p, or the farthest negative if
  none is; hinge averaged over all positive pairs (FaceNet / TensorFlow ``triplet_semihard_loss``);
* triplet: squared distances, margin 1.0, all triplets, averaged including the zero terms;
* multi-similarity: ``thresh=0.5, margin=0.1, scale_pos=2, scale_neg=40`` with the MS pair mining,
  summed over anchors and divided by the batch size (Wang et al. CVPR 2019).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lib.embeddings import Embeddings
from lib.losses.base import OBJECTIVES, Objective


def _raw(batch: Embeddings, name: str) -> Tensor:
    if batch.student_raw is None:
        raise ValueError(f"objective {name!r} needs the un-normalised student embeddings "
                         "(Embeddings.student_raw), which this mode did not provide")
    raw = batch.student_raw
    # norms of un-normalised rows overflow float16 easily: compute them in float32 under AMP
    return raw.float() if raw.dtype in (torch.float16, torch.bfloat16) else raw


def _no_asymmetric(asymmetric: bool, name: str) -> None:
    if asymmetric:
        raise ValueError(f"objective {name!r} regularises the student's own embedding norms; "
                         "asymmetric=True has no meaning for it")


def spherical_embedding_constraint(raw: Tensor, mean_norm: Tensor | float | None = None) -> Tensor:
    """``1/N sum_i (||f_i|| - mu)^2`` with ``mu`` the given mean norm, or the batch's (detached) mean
    norm when None. Detaching the batch mean does not change the gradient: the sum of
    ``(||f_i|| - mu)`` over the batch is zero."""
    norms = raw.norm(dim=1)
    mu = norms.mean().detach() if mean_norm is None else mean_norm
    return (norms - mu).pow(2).mean()


def l2_norm_regularizer(raw: Tensor) -> Tensor:
    """``1/N sum_i ||f_i||^2``."""
    return raw.pow(2).sum(dim=1).mean()


@OBJECTIVES.register("sec")
class SphericalEmbeddingConstraint(Objective):
    """SEC. ``mu`` is the batch's mean norm (``ema=False``, the repo's default
    ``norm_momentum=1``) or an exponential moving average of it (``ema=True``, Appendix D):
    ``mu <- (1 - momentum) mu + momentum * mean_i ||f_i||`` after the first batch, which sets it.
    ``mu`` is a buffer (``mean_norm``), so it lands in checkpoints; it is updated in training mode
    only and is never differentiated. The paper weights SEC by 1 (``--sec_wei 1.0``)."""

    def __init__(self, ema: bool = False, momentum: float = 0.1, asymmetric: bool = False):
        _no_asymmetric(asymmetric, "sec")
        super().__init__()
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"sec momentum={momentum} must lie in (0, 1]")
        self.ema, self.momentum = ema, momentum
        self.register_buffer("mean_norm", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def forward(self, batch: Embeddings) -> Tensor:
        raw = _raw(batch, "sec")
        if not self.ema:
            return spherical_embedding_constraint(raw)
        if self.training:
            with torch.no_grad():
                batch_mean = raw.norm(dim=1).mean().to(self.mean_norm.dtype)
                if bool(self.initialized):
                    self.mean_norm.mul_(1 - self.momentum).add_(self.momentum * batch_mean)
                else:
                    self.mean_norm.copy_(batch_mean)
                    self.initialized.fill_(True)
        if not bool(self.initialized):  # evaluated before any training step
            return spherical_embedding_constraint(raw)
        return spherical_embedding_constraint(raw, self.mean_norm.to(raw.dtype))


@OBJECTIVES.register("l2reg")
class L2NormRegularizer(Objective):
    """Mean squared norm of the un-normalised embeddings (the paper's L2-reg baseline, weight 1e-4
    in its README example)."""

    def __init__(self, asymmetric: bool = False):
        _no_asymmetric(asymmetric, "l2reg")
        super().__init__()

    def forward(self, batch: Embeddings) -> Tensor:
        return l2_norm_regularizer(_raw(batch, "l2reg"))


def first_pairs(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Indices (anchor, positive) of the first two rows of every class with at least two rows, in
    increasing class order (the repo takes ``where(labels == c)[0][:2]``)."""
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order]
    start = torch.ones_like(sorted_labels, dtype=torch.bool)
    start[1:] = sorted_labels[1:] != sorted_labels[:-1]
    first = start.nonzero().squeeze(1)
    second = (first + 1).clamp(max=len(labels) - 1)
    has_pair = (first + 1 < len(labels)) & (sorted_labels[second] == sorted_labels[first])
    return order[first[has_pair]], order[second[has_pair]]


def tuplet_loss(anchors: Tensor, positives: Tensor, scale: float = 25.0) -> Tensor:
    """Normalized N-pair (tuplet) loss with scale ``s`` (inverse temperature): for N (anchor,
    positive) pairs of N distinct classes, with cosines ``c_ij = <a_i, p_j> / (||a_i|| ||p_j||)``::

        L = 1/N sum_i log(1 + sum_{j != i} exp(s (c_ij - c_ii)))  =  cross-entropy(s C, diag)
    """
    logits = scale * F.normalize(anchors, dim=-1) @ F.normalize(positives, dim=-1).T
    target = torch.arange(len(anchors), device=anchors.device)
    return F.cross_entropy(logits, target)


@OBJECTIVES.register("tuplet", "normalized_npair")
class TupletLoss(Objective):
    """Normalized N-pair loss on the first two rows of every class in the batch (classes with one
    row are skipped; at least one pair is required). ``scale=25``: the repo multiplies both unit-norm
    rows by 5 (``loss.py``, ``NpairLoss``), so the logits are ``25 cos``, i.e. temperature 0.04.
    ``asymmetric=True`` takes the positives (and thus the negatives) from the detached teacher
    embeddings of those rows: student queries against the database side."""

    def __init__(self, scale: float = 25.0, asymmetric: bool = False):
        super().__init__(asymmetric=asymmetric)
        self.scale = scale

    def forward(self, batch: Embeddings) -> Tensor:
        anchor_idx, positive_idx = first_pairs(batch.labels)
        if len(anchor_idx) == 0:
            raise ValueError("objective 'tuplet' needs at least two rows of one class in a batch; "
                             "use a class-balanced sampler")
        reference = self.reference(batch)
        return tuplet_loss(batch.student[anchor_idx], reference[positive_idx], self.scale)


__all__ = ["spherical_embedding_constraint", "l2_norm_regularizer", "first_pairs", "tuplet_loss",
           "SphericalEmbeddingConstraint", "L2NormRegularizer", "TupletLoss"]
