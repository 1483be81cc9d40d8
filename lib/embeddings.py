"""The value that flows from a training mode to the objectives."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor


@dataclass
class Embeddings:
    """One training batch, embedded.

    Every tensor has one row per *view* (a student input image). Rows are L2-normalised unless
    stated otherwise.

    Attributes:
        student: (N, D) student (query-side) embeddings, unit norm.
        labels: (N,) integer class labels.
        teacher: (N, D) teacher (database-side) embeddings; row i is the teacher's view of the
            same crop as ``student[i]``. ``None`` in ``sym`` mode.
        groups: (N,) index of the source image of each view, for per-image relational terms
            (``ts_aug`` renders several views of one image). ``None`` when every row is its own image.
        student_raw: (N, D) student embeddings *before* the final L2 normalisation, for objectives
            that need the norm (SEC, L2-norm regularisation, softmax warping).
        epoch: the current 0-based epoch, for objectives with warm-up or phase changes.
        negatives: (N, K, D) mined negatives of each row (``sym`` mode), or ``None``.
    """

    student: Tensor
    labels: Tensor
    teacher: Optional[Tensor] = None
    groups: Optional[Tensor] = None
    student_raw: Optional[Tensor] = None
    epoch: int = 0
    negatives: Optional[Tensor] = None
