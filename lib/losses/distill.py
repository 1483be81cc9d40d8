"""The paper's objectives: absolute and relative distillation terms, and its triplet loss.

Suma & Tolias, "Large-to-small Image Resolution Asymmetry in Deep Metric Learning", WACV 2023, Sec. 3.
With student rows s_i and teacher rows t_i of the same views (unit norm):

* absolute:     L_abs = mean_i (1 - <s_i, t_i>)^2
* relative s-t: L_st  = mean over same-image pairs i != j of (<s_i, t_j> - <t_i, t_j>)^2      (lam-1)
* relative s-s: L_ss  = mean over same-image pairs i != j of (<s_i, s_j> - <t_i, t_j>)^2      (lam-2)

"same-image pairs" are the views of one training image (``Embeddings.groups``); without groups the
whole batch is one group. The reference sums its per-image terms over the images of a batch; we
average them, which only rescales the loss (AdamW is invariant to it) and keeps the loss independent
of the batch size. It also adds 1e-6 inside each square; we do not.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lib.embeddings import Embeddings
from lib.losses.base import OBJECTIVES, Objective


def absolute_loss(student: Tensor, teacher: Tensor) -> Tensor:
    return (1 - (student * teacher).sum(-1)).pow(2).mean()


def same_group_pairs(groups: Optional[Tensor], n: int, device) -> Tensor:
    """(N, N) bool mask of pairs i != j from the same group."""
    if groups is None:
        mask = torch.ones(n, n, dtype=torch.bool, device=device)
    else:
        mask = groups.view(-1, 1) == groups.view(1, -1)
    return mask & ~torch.eye(n, dtype=torch.bool, device=device)


def relative_loss(query: Tensor, reference: Tensor, teacher: Tensor, groups: Optional[Tensor] = None) -> Tensor:
    """Mean over same-group off-diagonal pairs of (<query_i, reference_j> - <t_i, t_j>)^2."""
    mask = same_group_pairs(groups, len(query), query.device)
    if not mask.any():
        return query.sum() * 0
    target = teacher @ teacher.T
    return (query @ reference.T - target)[mask].pow(2).mean()


def _teacher(batch: Embeddings, name: str) -> Tensor:
    if batch.teacher is None:
        raise ValueError(f"objective {name!r} needs teacher embeddings (modes ts_aug, ts_reg)")
    return batch.teacher.detach()


@OBJECTIVES.register("absolute")
class AbsoluteLoss(Objective):
    """L_abs: each student view onto the teacher's view of the same crop."""

    def forward(self, batch: Embeddings) -> Tensor:
        return absolute_loss(batch.student, _teacher(batch, "absolute"))


@OBJECTIVES.register("relative_st")
class RelativeStudentTeacher(Objective):
    """L_st: student-teacher similarities of the views of one image match the teacher's (lam-1)."""

    def forward(self, batch: Embeddings) -> Tensor:
        teacher = _teacher(batch, "relative_st")
        return relative_loss(batch.student, teacher, teacher, batch.groups)


@OBJECTIVES.register("relative_ss")
class RelativeStudentStudent(Objective):
    """L_ss: student-student similarities of the views of one image match the teacher's (lam-2)."""

    def forward(self, batch: Embeddings) -> Tensor:
        teacher = _teacher(batch, "relative_ss")
        return relative_loss(batch.student, batch.student, teacher, batch.groups)


@OBJECTIVES.register("regression")
class RegressionLoss(Objective):
    """Squared Euclidean distance student-teacher, mean over rows (the L2 regression of
    Budnik & Avrithis, "Asymmetric metric learning for knowledge transfer", CVPR 2021)."""

    def forward(self, batch: Embeddings) -> Tensor:
        return (batch.student - _teacher(batch, "regression")).pow(2).sum(-1).mean()


def mined_triplet_loss(anchors: Tensor, labels: Tensor, negatives: Optional[Tensor], margin: float = 0.7) -> Tensor:
    """The paper's ``sym`` triplet loss with squared Euclidean distances.

    Positive: the hardest (least similar) other image of the anchor's class in the batch.
    Negatives: ``negatives`` (B, K, D), mined per anchor (distance-weighted, ``lib.miners``); when
    K == 0 or ``negatives`` is None, every other-class image of the batch (the reference crashed).
    Loss: mean over anchors and negatives of ``max(0, d(a, p) - d(a, n) + margin)``; anchors without a
    positive in the batch are skipped.
    """
    sim = anchors @ anchors.T
    same = labels.view(-1, 1) == labels.view(1, -1)
    eye = torch.eye(len(anchors), dtype=torch.bool, device=anchors.device)
    pos_mask = same & ~eye
    has_pos = pos_mask.any(1)
    if not has_pos.any():
        return anchors.sum() * 0
    hardest = sim.masked_fill(~pos_mask, float("inf")).argmin(1)
    d_pos = (anchors - anchors[hardest]).pow(2).sum(-1)  # (B,)
    if negatives is not None and negatives.shape[1] > 0:
        d_neg = (anchors.unsqueeze(1) - negatives).pow(2).sum(-1)  # (B, K)
        hinge = (d_pos.unsqueeze(1) - d_neg + margin).clamp(min=0)
        return hinge[has_pos].mean()
    d_all = torch.cdist(anchors, anchors).pow(2)
    neg_mask = ~same & has_pos.view(-1, 1)
    if not neg_mask.any():
        return anchors.sum() * 0
    hinge = (d_pos.unsqueeze(1) - d_all + margin).clamp(min=0)
    return hinge[neg_mask].mean()


@OBJECTIVES.register("mined_triplet")
class MinedTriplet(Objective):
    """The ``sym`` mode's triplet loss (see :func:`mined_triplet_loss`), margin 0.7 by default."""

    def __init__(self, margin: float = 0.7, asymmetric: bool = False):
        super().__init__(asymmetric)
        self.margin = margin

    def forward(self, batch: Embeddings) -> Tensor:
        return mined_triplet_loss(batch.student, batch.labels, batch.negatives, self.margin)


__all__ = ["MinedTriplet", "absolute_loss", "relative_loss", "mined_triplet_loss", "AbsoluteLoss", "RelativeStudentTeacher",
           "RelativeStudentStudent", "RegressionLoss"]
