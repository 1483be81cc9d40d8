"""The distillation peers: feature regression, relational and ranking distillers as objectives.

Every objective here compares the student's query embeddings ``Embeddings.student`` with the teacher's
embeddings of the same images ``Embeddings.teacher`` (detached: gradients reach the student only), so
each trains the asymmetric setting in any teacher mode (``ts_aug``, ``ts_reg``) and adds to the paper's
terms with ``--objective name[:weight][:key=value,...]``:

==============  =====================================================================================
``fitnet``      L2 or cosine regression of (optionally connector-mapped) student rows onto teacher rows
``rkd``         RKD distance and angle terms (Park et al., CVPR 2019)
``pkt``         probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018)
``cc``          correlation congruence (Peng et al., ICCV 2019)
``csd``         contextual similarity distillation over a teacher gallery (Wu et al., CVPR 2022)
``rop``         rank-order preservation over a teacher gallery (Wu et al., ICLR 2023)
``d3still``     decoupled differential distillation over a teacher gallery (Xie et al., CVPR 2024)
==============  =====================================================================================

The ranking distillers (``csd``, ``rop``, ``d3still``) rank a *gallery* of teacher embeddings of
training images: the batch's own teacher rows, followed by a FIFO memory of the teacher rows of the
previous ``gallery_size`` training views (:class:`TeacherMemory`; 0 = the batch alone, as AIR-Distiller
does). The memory is a buffer, so it is saved with the objective's ``state_dict`` in every training
checkpoint and a resumed run continues with the same gallery. Under ``torchrun`` the trainer hands
every rank the gathered global batch, so each rank computes the single-process loss and pushes the same
rows: the memories stay identical across ranks.

This module is self-contained on purpose (its small helpers are local), and each loss is a pure
function with a thin ``Objective`` wrapper. Embeddings are rows (N, D); the functions do not assume
float32 (the tests run them in float64).

Left out, because their losses need what a retrieval embedding does not have: BCT's influence loss
(Shen et al., CVPR 2020) trains through the old model's *classifier head*; UGD's distillation uses
*local (part) features* of intermediate layers; AIR-Distiller's vanilla KD distils *logits*. None of
them can be written on (N, D) embeddings alone, so none is faked here.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lib.embeddings import Embeddings
from lib.losses.base import OBJECTIVES, Objective


def _teacher_of(batch: Embeddings, name: str) -> Tensor:
    if batch.teacher is None:
        raise ValueError(f"objective {name!r} needs teacher embeddings: use a teacher mode (ts_aug, ts_reg), "
                         "not 'sym'")
    return batch.teacher.detach()


def _check_same_dim(student: Tensor, teacher: Tensor, name: str) -> None:
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(f"objective {name!r}: student embeddings have {student.shape[-1]} dimensions, the "
                         f"teacher's {teacher.shape[-1]}; they must share one space"
                         + (" (fitnet: set connector=True, teacher_dim=...)" if name == "fitnet" else ""))


# ---------------------------------------------------------------------------------------------------
# feature regression
# ---------------------------------------------------------------------------------------------------
def fitnet_loss(student: Tensor, teacher: Tensor, metric: str = "l2") -> Tensor:
    """``l2``: mean over rows of ``||s_i - t_i||^2``; ``cosine``: mean over rows of ``1 - cos(s_i, t_i)``."""
    if metric == "l2":
        return (student - teacher).pow(2).sum(-1).mean()
    if metric == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    raise ValueError(f"fitnet: metric {metric!r} is not one of 'l2', 'cosine'")


@OBJECTIVES.register("fitnet")
class FitNetLoss(Objective):
    """Feature regression of the student's embedding onto the teacher's: FitNets' hint loss (Romero et al.,
    "FitNets: Hints for Thin Deep Nets", ICLR 2015, Eq. 2: ``1/2 ||u_h(x) - r(v_g(x))||^2`` with a learned
    regressor ``r``), applied to the final embeddings as the plain regression that Budnik & Avrithis
    ("Asymmetric Metric Learning for Knowledge Transfer", CVPR 2021) found strongest for asymmetric tests.

    Parameters: ``metric`` ``l2`` (squared Euclidean, mean over rows; without the factor 1/2, which only
    rescales the weight) or ``cosine`` (``1 - cos``); ``connector=True`` learns a linear map from the
    student's ``embedding_dim`` to ``teacher_dim`` (default: the same) before the comparison, initialised
    to the identity when the dimensions agree. Its parameters are the objective's, so the trainer's
    optimizer and checkpoints hold them. Note: the connector is not part of the saved student, whose own
    embedding is what retrieval uses; with ``teacher_dim != embedding_dim`` the student does not live in
    the teacher's space and only a symmetric test is meaningful.

    AIR-Distiller's FitNet is ``nn.MSELoss`` (a mean over the N x D elements): its value is ours (``l2``)
    divided by D (tests/test_losses_peers.py holds its figures).
    """

    def __init__(self, metric: str = "l2", connector: bool = False, teacher_dim: Optional[int] = None,
                 embedding_dim: int = 0):
        super().__init__()
        if metric not in ("l2", "cosine"):
            raise ValueError(f"fitnet: metric {metric!r} is not one of 'l2', 'cosine'")
        self.metric = metric
        teacher_dim = int(teacher_dim or embedding_dim)
        if teacher_dim != embedding_dim and not connector:
            raise ValueError(f"fitnet: teacher_dim {teacher_dim} differs from the student's {embedding_dim}; "
                             "set connector=True to learn a linear map between them")
        self.connector = None
        if connector:
            if embedding_dim <= 0:
                raise ValueError("fitnet: connector=True needs the student's embedding_dim")
            self.connector = nn.Linear(embedding_dim, teacher_dim)
            if teacher_dim == embedding_dim:
                with torch.no_grad():
                    self.connector.weight.copy_(torch.eye(teacher_dim))
                    self.connector.bias.zero_()

    def forward(self, batch: Embeddings) -> Tensor:
        teacher = _teacher_of(batch, "fitnet")
        student = batch.student
        if self.connector is not None:
            student = self.connector(student.to(self.connector.weight.dtype)).to(teacher.dtype)
        _check_same_dim(student, teacher, "fitnet")
        return fitnet_loss(student, teacher, self.metric)


# ---------------------------------------------------------------------------------------------------
# relational distillers (the batch's own relations)
# ---------------------------------------------------------------------------------------------------
def _pair_distances(x: Tensor) -> Tensor:
    """(N, N) Euclidean distances; the diagonal is exactly 0 and its gradient is kept finite (clamp
    before the square root: ``sqrt`` has an infinite derivative at 0)."""
    squared = (x.unsqueeze(1) - x.unsqueeze(0)).pow(2).sum(-1)
    eye = torch.eye(len(x), dtype=torch.bool, device=x.device)
    return squared.clamp(min=1e-12).sqrt().masked_fill(eye, 0.0)


def rkd_distance_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD-D (Park et al., Eqs. 4-5): Huber (smooth L1, delta 1) between the pair distances of each side,
    each divided by its mean over the pairs i != j; mean over the N (N - 1) ordered pairs."""
    n = len(student)
    off = ~torch.eye(n, dtype=torch.bool, device=student.device)
    d_s, d_t = _pair_distances(student)[off], _pair_distances(teacher)[off]
    return F.smooth_l1_loss(d_s / d_s.mean(), d_t / d_t.mean())


def _angles(x: Tensor) -> Tensor:
    """(N, N, N): entry [j, i, k] is the cosine of the angle at x_j between x_i and x_k, i.e.
    ``<e_ij, e_kj>`` with ``e_ij = (x_i - x_j) / ||x_i - x_j||`` (Park et al., Eq. 6)."""
    diff = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), dim=-1)  # [j, i] = unit(x_i - x_j)
    return diff @ diff.transpose(1, 2)


def rkd_angle_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD-A (Park et al., Eqs. 6-7): Huber between the angles of each side, mean over the triplets of
    three distinct indices."""
    n = len(student)
    idx = torch.arange(n, device=student.device)
    distinct = ((idx.view(-1, 1, 1) != idx.view(1, -1, 1)) & (idx.view(1, -1, 1) != idx.view(1, 1, -1))
                & (idx.view(-1, 1, 1) != idx.view(1, 1, -1)))
    if not distinct.any():
        return student.sum() * 0
    return F.smooth_l1_loss(_angles(student)[distinct], _angles(teacher)[distinct])


@OBJECTIVES.register("rkd")
class RKDLoss(Objective):
    """Relational Knowledge Distillation (Park, Kim, Lu & Cho, CVPR 2019): the student's pairwise distances
    (RKD-D) and triplet angles (RKD-A) match the teacher's, ``distance_weight * L_D + angle_weight * L_A``.
    Defaults 1 and 2: the paper's weights for its metric-learning experiments (AIR-Distiller uses 25 and 50).

    Differences from AIR-Distiller (whose figures are in the tests): the paper sums over pairs i != j and
    triplets of distinct indices; AIR-Distiller's ``smooth_l1_loss`` averages over all N^2 pairs and N^3
    triplets, whose degenerate entries are 0 on both sides. Its distance term is therefore ours times
    (N - 1) / N, its angle term ours times (N - 1)(N - 2) / N^2.

    Note: a relation-only distiller does not tie the student to the teacher's space, so alone it cannot
    give asymmetric retrieval (add ``absolute`` or ``fitnet``).
    """

    def __init__(self, distance_weight: float = 1.0, angle_weight: float = 2.0):
        super().__init__()
        self.distance_weight, self.angle_weight = float(distance_weight), float(angle_weight)

    def forward(self, batch: Embeddings) -> Tensor:
        teacher = _teacher_of(batch, "rkd")
        loss = batch.student.sum() * 0
        if self.distance_weight:
            loss = loss + self.distance_weight * rkd_distance_loss(batch.student, teacher)
        if self.angle_weight:
            loss = loss + self.angle_weight * rkd_angle_loss(batch.student, teacher)
        return loss


def pkt_loss(student: Tensor, teacher: Tensor, eps: float = 1e-7, exclude_self: bool = True) -> Tensor:
    """PKT (Passalis & Tefas, Eqs. 6-9): cosine kernel ``K(a, b) = (cos(a, b) + 1) / 2``; conditional
    probabilities ``p_{j|i} = K(t_i, t_j) / sum_{k != i} K(t_i, t_k)`` (``q`` from the student alike);
    loss: mean over rows i of ``sum_{j != i} p_{j|i} log((p_{j|i} + eps) / (q_{j|i} + eps))``.
    ``exclude_self=False`` keeps j = i in the sums, as the authors' code does."""
    def probabilities(x):
        x = F.normalize(x, dim=-1)
        kernel = (x @ x.T + 1) / 2
        if exclude_self:
            kernel = kernel.masked_fill(torch.eye(len(x), dtype=torch.bool, device=x.device), 0.0)
        return kernel / kernel.sum(1, keepdim=True)

    p, q = probabilities(teacher), probabilities(student)
    terms = p * torch.log((p + eps) / (q + eps))  # p == 0 on the excluded diagonal: those terms are 0
    return terms.sum(1).mean()


@OBJECTIVES.register("pkt")
class PKTLoss(Objective):
    """Probabilistic Knowledge Transfer (Passalis & Tefas, "Learning Deep Representations with
    Probabilistic Knowledge Transfer", ECCV 2018): the student's cosine-kernel neighbour distributions
    match the teacher's (KL divergence, see :func:`pkt_loss`).

    Differences from the authors' code (which AIR-Distiller reuses; its figures are in the tests): it
    keeps j = i in the sums and averages the N^2 terms (``torch.mean``) instead of summing each row's KL
    and averaging the rows; with ``exclude_self=False`` its value is ours divided by N. Relation only:
    alone, it does not tie the student to the teacher's space.
    """

    def __init__(self, eps: float = 1e-7, exclude_self: bool = True):
        super().__init__()
        self.eps, self.exclude_self = float(eps), bool(exclude_self)

    def forward(self, batch: Embeddings) -> Tensor:
        return pkt_loss(batch.student, _teacher_of(batch, "pkt"), self.eps, self.exclude_self)


def correlation_matrix(x: Tensor, gamma: float = 0.4, order: Optional[int] = 2) -> Tensor:
    """CC's kernel correlation (Peng et al., Eqs. 7-9) of the L2-normalised rows: the Gaussian RBF
    ``exp(-gamma ||f_i - f_j||^2)``, exactly (``order=None``) or by the paper's order-P Taylor
    expansion ``sum_{p=0}^{P} exp(-2 gamma) (2 gamma)^p / p! (f_i . f_j)^p`` (exact for unit rows as
    P grows, since ``||f_i - f_j||^2 = 2 - 2 f_i . f_j``)."""
    x = F.normalize(x, dim=-1)
    cos = x @ x.T
    if order is None:
        return torch.exp(-gamma * (2 - 2 * cos))
    return sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * cos.pow(p) for p in range(int(order) + 1))


def cc_loss(student: Tensor, teacher: Tensor, gamma: float = 0.4, order: Optional[int] = 2) -> Tensor:
    """``1 / N^2 ||C(student) - C(teacher)||_F^2`` (Peng et al., Eq. 6)."""
    return (correlation_matrix(student, gamma, order) - correlation_matrix(teacher, gamma, order)).pow(2).mean()


@OBJECTIVES.register("cc")
class CCLoss(Objective):
    """Correlation Congruence (Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019):
    the student's kernel correlation matrix of the batch matches the teacher's (:func:`cc_loss`), with the
    paper's Gaussian RBF kernel and its order-2 Taylor expansion (``gamma``, ``order``; ``order=None`` for
    the exact kernel). The paper's full loss also has cross-entropy and logit-KD terms, which need a
    classifier head: left out.

    AIR-Distiller's "CC" is another loss (the mean over consecutive rows of ``<|s_i - t_i|, |s_{i+1} -
    t_{i+1}|>``, from the CRD repository), not the paper's correlation congruence, so no figure of it is
    compared here. Relation only: alone, it does not tie the student to the teacher's space.
    """

    def __init__(self, gamma: float = 0.4, order: Optional[int] = 2):
        super().__init__()
        if order is not None and int(order) < 0:
            raise ValueError(f"cc: order {order!r} must be >= 0 or None (the exact kernel)")
        self.gamma, self.order = float(gamma), order

    def forward(self, batch: Embeddings) -> Tensor:
        return cc_loss(batch.student, _teacher_of(batch, "cc"), self.gamma, self.order)


# ---------------------------------------------------------------------------------------------------
# ranking distillers over a gallery of teacher embeddings
# ---------------------------------------------------------------------------------------------------
class TeacherMemory(nn.Module):
    """A FIFO memory of the teacher embeddings of the last ``size`` training views, newest first.

    ``gallery(teacher)`` is the batch's teacher rows followed by the remembered rows, less those that are
    copies of a batch row (``ts_reg`` meets the same precomputed embedding again in a later epoch; a copy
    would tie with the query's own row). ``push(teacher)`` remembers the batch. Both live in buffers
    (``rows``, ``filled``), hence in the objective's ``state_dict`` and in training checkpoints.
    """

    DUPLICATE_COS = 1 - 1e-6

    def __init__(self, size: int, dim: int):
        super().__init__()
        if int(size) < 0:
            raise ValueError(f"gallery_size {size!r} must be >= 0")
        if int(size) > 0 and int(dim) <= 0:
            raise ValueError("a teacher memory needs the embedding dimension (embedding_dim)")
        self.size = int(size)
        self.register_buffer("rows", torch.zeros(self.size, max(int(dim), 0)))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def gallery(self, teacher: Tensor) -> Tensor:
        filled = int(self.filled)
        if filled == 0:
            return teacher
        if teacher.shape[1] != self.rows.shape[1]:
            raise ValueError(f"teacher embeddings have {teacher.shape[1]} dimensions, the gallery memory "
                             f"{self.rows.shape[1]}")
        memory = self.rows[:filled].to(teacher.dtype)
        copy = (memory @ teacher.T).max(1).values > self.DUPLICATE_COS
        return torch.cat([teacher, memory[~copy]])

    @torch.no_grad()
    def push(self, teacher: Tensor) -> None:
        if self.size == 0:
            return
        if teacher.shape[1] != self.rows.shape[1]:
            raise ValueError(f"teacher embeddings have {teacher.shape[1]} dimensions, the gallery memory "
                             f"{self.rows.shape[1]} (embedding_dim)")
        newest = torch.cat([teacher.detach().to(self.rows.dtype), self.rows[: int(self.filled)]])[: self.size]
        self.rows[: len(newest)] = newest
        self.filled.fill_(len(newest))


class GalleryObjective(Objective):
    """Base of the ranking distillers: ``loss(student, teacher, gallery)``, then the memory takes the batch
    (in training mode)."""

    name = "gallery"

    def __init__(self, gallery_size: int = 0, embedding_dim: int = 0):
        super().__init__()
        self.memory = TeacherMemory(gallery_size, embedding_dim)

    def loss(self, student: Tensor, teacher: Tensor, gallery: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, batch: Embeddings) -> Tensor:
        teacher = _teacher_of(batch, self.name)
        _check_same_dim(batch.student, teacher, self.name)
        value = self.loss(batch.student, teacher, self.memory.gallery(teacher))
        if self.training:
            self.memory.push(teacher)
        return value


def _teacher_top_k(student: Tensor, teacher: Tensor, gallery: Tensor, k: int, exclude_self: bool = False):
    """The k gallery rows most similar to each teacher row: (teacher sims, student sims) of them, (N, k),
    in the teacher's order. ``exclude_self`` drops column i of row i (the batch comes first in the gallery)."""
    t_sim, s_sim = teacher @ gallery.T, student @ gallery.T
    if exclude_self:
        n = len(teacher)
        own = torch.zeros_like(t_sim, dtype=torch.bool)
        own[:, :n] = torch.eye(n, dtype=torch.bool, device=teacher.device)
        t_sim = t_sim.masked_fill(own, float("-inf"))
    k = min(int(k), t_sim.shape[1] - (1 if exclude_self else 0))
    t_top, index = t_sim.topk(k, dim=1)
    return t_top, s_sim.gather(1, index)


def csd_loss(student: Tensor, teacher: Tensor, gallery: Tensor, k: int = 96, temp_student: float = 1.0,
             temp_teacher: float = 0.01) -> Tensor:
    """CSD (Wu et al., CVPR 2022): the teacher's k nearest gallery neighbours of each query (its own row
    included), and the KL divergence ``KL(softmax(t_top / temp_teacher) || softmax(s_top / temp_student))``
    of the teacher's and the student's similarities to them, mean over queries."""
    t_top, s_top = _teacher_top_k(student, teacher, gallery, k)
    return F.kl_div(F.log_softmax(s_top / temp_student, dim=1), F.softmax(t_top / temp_teacher, dim=1),
                    reduction="batchmean")


@OBJECTIVES.register("csd")
class CSDLoss(GalleryObjective):
    """Contextual Similarity Distillation (Wu, Wang, Zhang, Huang, Tian, Li, Li; "Contextual Similarity
    Distillation for Asymmetric Image Retrieval", CVPR 2022): for each query, the teacher's k nearest
    neighbours in a gallery of teacher embeddings of training images define a similarity distribution
    that the student's query embedding must reproduce (:func:`csd_loss`).

    The paper's gallery is the whole training set embedded offline by the teacher; here it is the batch
    plus a memory of the last ``gallery_size`` teacher rows (:class:`TeacherMemory`; AIR-Distiller uses
    the batch alone, ``gallery_size=0``). Defaults k = 96, temperatures 1 (student) and 0.01 (teacher):
    AIR-Distiller's. ``k`` is capped at the gallery's size. With the batch as gallery, the value equals
    AIR-Distiller's ``csd_loss`` (figures in the tests).
    """

    name = "csd"

    def __init__(self, k: int = 96, temp_student: float = 1.0, temp_teacher: float = 0.01, gallery_size: int = 1024,
                 embedding_dim: int = 0):
        super().__init__(gallery_size, embedding_dim)
        self.k, self.temp_student, self.temp_teacher = int(k), float(temp_student), float(temp_teacher)

    def loss(self, student, teacher, gallery):
        return csd_loss(student, teacher, gallery, self.k, self.temp_student, self.temp_teacher)


def rop_loss(student: Tensor, teacher: Tensor, gallery: Tensor, k: int = 96, temperature: float = 0.1,
             rank_weight: float = 0.2) -> Tensor:
    """ROP over the teacher's k nearest gallery neighbours ``g_1..g_k`` of each query (own row included),
    teacher similarities ``t_a``, student similarities ``s_a``:

    * teacher indicator ``I_g[a, b] = step(t_b - t_a)``: 1 where the teacher ranks b above a, 0 below,
      1/2 at a tie (a = b);
    * student indicator ``I_q[a, b] = sigmoid((s_b - t_a) / temperature)``,
    * rank weights ``w_a = softmax_a(rank_weight * t_a) * a`` (a = 1..k),

    loss: mean over queries of ``sum_{a, b} w_a (I_g[a, b] - I_q[a, b])^2 / k``."""
    t_top, s_top = _teacher_top_k(student, teacher, gallery, k)
    k = t_top.shape[1]
    indicator_teacher = torch.heaviside(t_top.unsqueeze(1) - t_top.unsqueeze(2), t_top.new_tensor(0.5))
    indicator_student = torch.sigmoid((s_top.unsqueeze(1) - t_top.unsqueeze(2)) / temperature)
    position = torch.arange(1, k + 1, dtype=t_top.dtype, device=t_top.device)
    weights = F.softmax(rank_weight * t_top, dim=1) * position  # (N, k), indexed by a
    return ((indicator_teacher - indicator_student).pow(2) * weights.unsqueeze(2)).sum((1, 2)).mean() / k


@OBJECTIVES.register("rop")
class ROPLoss(GalleryObjective):
    """Rank-Order Preservation ("A General Rank Preserving Framework for Asymmetric Image Retrieval",
    Wu et al., ICLR 2023): the student's similarity to each of the teacher's top-k gallery neighbours
    must fall on the same side of every teacher similarity as in the teacher's ranking, with smooth
    (sigmoid) indicators and rank weights (:func:`rop_loss`).

    The formula follows AIR-Distiller's implementation, whose comments name the paper's Eqs. (8)-(10)
    (the paper's text was not at hand here), with one deliberate difference: the teacher's indicator is
    the exact step of its ranking, where theirs is ``sigmoid(diff / 1e-6)``, which is not a step for
    teacher similarities closer than about 1e-5 (it then mixes in a fraction of the wrong order). Away
    from such near-ties, and with the batch as gallery, the value equals theirs (figures in the tests). The gallery: as :class:`CSDLoss` (the paper embeds the
    training set offline). Defaults (k 96, temperature 0.1, rank weight 0.2): AIR-Distiller's.
    """

    name = "rop"

    def __init__(self, k: int = 96, temperature: float = 0.1, rank_weight: float = 0.2, gallery_size: int = 1024,
                 embedding_dim: int = 0):
        super().__init__(gallery_size, embedding_dim)
        self.k, self.temperature, self.rank_weight = int(k), float(temperature), float(rank_weight)

    def loss(self, student, teacher, gallery):
        return rop_loss(student, teacher, gallery, self.k, self.temperature, self.rank_weight)


def d3still_loss(student: Tensor, teacher: Tensor, gallery: Tensor, k: int = 10, alpha: float = 50.0,
                 beta: float = 2.0, gamma: float = 1.0, offset: float = 0.1) -> Tensor:
    """D3still on a gallery whose first N rows are the batch's teacher rows:

    * feature term ``alpha * ||(<t_i, t_i> - <s_i, t_i>)_i||_2 / N`` (the L2 norm over the batch of the
      query's own similarity gap);
    * the m = k - 1 nearest *other* gallery rows of each teacher query, teacher similarities ``t_a``,
      student similarities ``s_a``; differences ``dt[a, b] = t_b - t_a``, ``ds[a, b] = s_b - s_a``;
      ``r[a, b] = (ds - dt) / (offset + |dt|)`` on the pairs with ``dt != 0``;
    * hard pairs (the student flips the teacher's order, ``ds * dt < 0``) and simple pairs (it keeps it,
      ``ds * dt > 0``); per query the L2 norm of ``r`` over each set;
    * loss = feature term + ``beta`` * mean over queries of the hard norm / m + ``gamma`` * the same for
      the simple norm.
    """
    n = len(student)
    feature = alpha * torch.linalg.vector_norm((teacher * teacher).sum(1) - (student * teacher).sum(1)) / n
    t_top, s_top = _teacher_top_k(student, teacher, gallery, k - 1, exclude_self=True)
    m = t_top.shape[1]
    if m < 2:
        return feature
    dt = t_top.unsqueeze(1) - t_top.unsqueeze(2)
    ds = s_top.unsqueeze(1) - s_top.unsqueeze(2)
    relative = (ds - dt) / (offset + dt.abs())
    agree = ds * dt
    valid = dt != 0
    hard = torch.where(valid & (agree < 0), relative, torch.zeros_like(relative)).flatten(1)
    simple = torch.where(valid & (agree > 0), relative, torch.zeros_like(relative)).flatten(1)
    return (feature + beta * torch.linalg.vector_norm(hard, dim=1).mean() / m
            + gamma * torch.linalg.vector_norm(simple, dim=1).mean() / m)


@OBJECTIVES.register("d3still")
class D3stillLoss(GalleryObjective):
    """D3still (Xie, Hu, Tang, Wu, Yu; "D3still: Decoupled Differential Distillation for Asymmetric Image
    Retrieval", CVPR 2024): a feature-distillation term on each query's similarity to its own teacher
    embedding, plus differential terms on the k - 1 nearest gallery neighbours that compare the student's
    pairwise similarity *differences* with the teacher's, decoupled into pairs whose order the student
    breaks (hard, ``beta``) and keeps (simple, ``gamma``) (:func:`d3still_loss`). Defaults k 10, alpha 50,
    beta 2, gamma 1: the authors' (AIR-Distiller ``config/defaults.py``); the gallery is the batch
    (``gallery_size=0``), as the authors' code does, or the batch plus a memory.

    Deliberate differences from the authors' ``d3_loss`` (its figures on fixed tensors are in the tests
    and match ours): (1) the query's own row is taken explicitly for the feature term and excluded from
    the neighbours, where theirs takes rank 1 of a sort (the same unless another gallery row ties with
    the query's own similarity); (2) pairs with a teacher tie ``t_a == t_b`` (a != b) are left out, where
    theirs replaces the zero difference by 1 and so regresses the student's difference onto 1; (3) the
    differential terms divide by the number of neighbours used, ``min(k, gallery) - 1``, where theirs
    divides by ``k - 1`` even when the batch is smaller than k.
    """

    name = "d3still"

    def __init__(self, k: int = 10, alpha: float = 50.0, beta: float = 2.0, gamma: float = 1.0, offset: float = 0.1,
                 gallery_size: int = 0, embedding_dim: int = 0):
        super().__init__(gallery_size, embedding_dim)
        if int(k) < 2:
            raise ValueError(f"d3still: k {k!r} must be >= 2 (the query and at least one neighbour)")
        self.k, self.alpha, self.beta, self.gamma, self.offset = int(k), float(alpha), float(beta), float(gamma), float(offset)

    def loss(self, student, teacher, gallery):
        return d3still_loss(student, teacher, gallery, self.k, self.alpha, self.beta, self.gamma, self.offset)


__all__ = ["FitNetLoss", "RKDLoss", "PKTLoss", "CCLoss", "CSDLoss", "ROPLoss", "D3stillLoss", "TeacherMemory",
           "GalleryObjective", "fitnet_loss", "rkd_distance_loss", "rkd_angle_loss", "pkt_loss", "correlation_matrix",
           "cc_loss", "csd_loss", "rop_loss", "d3still_loss"]
