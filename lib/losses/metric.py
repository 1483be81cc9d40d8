"""Deep-metric-learning objectives of Roth et al., *Revisiting Training Strategies and Generalization
Performance in Deep Metric Learning* (ICML 2020; reference code
Confusezius/Revisiting_Deep_Metric_Learning_PyTorch, MIT, ``criteria/`` and ``parameters.py``), and
the quadruplet loss of Chen et al., *Beyond Triplet Loss* (CVPR 2017).

Defaults are those of the Revisiting-DML ``parameters.py``; where its code departs from the paper it
implements (a bug, not a choice), the paper is followed and the docstring says so.

Conventions (see :class:`~lib.losses.base.Objective`):

* anchors / queries are ``batch.student`` (N, D) with ``batch.labels``; the reference (database) side
  is ``self.reference(batch)``: the student itself, or with ``asymmetric=True`` the detached teacher
  rows. In the symmetric case the self-pair (i, i) is never a positive; in the asymmetric case it is
  (student query vs the teacher's embedding of the same view), and the teacher gets no gradient.
* distances are Euclidean, ``sqrt(|u - v|^2 + 1e-8)`` (finite gradient at u = v), unless a docstring
  says "squared"; similarities are dot products of unit vectors.
* proxy losses (proxynca, softmax, arcface, softtriple): proxies are the reference; ``asymmetric``
  is not meaningful there and raises ``ValueError``. Labels must be class ids in ``[0, num_classes)``:
  the trainer maps the training classes to 0..C-1.
* learnable parameters (proxies, margin beta) are ``nn.Parameter`` of the objective; the trainer
  optimises them at ``lr * lr_multiplier``. The Revisiting code gives absolute learning rates
  relative to its base lr 1e-5; the multipliers below keep those ratios.
* a batch without any valid tuple gives a zero that is still connected to the graph.

The math is written here (vectorised torch) rather than delegated to pytorch-metric-learning: the
reductions, distances and self-pair rules of Revisiting-DML differ from PML's defaults in most
losses, and the core must run without PML. ``tests/test_losses_metric.py`` checks every loss
against a plain loop written from the paper and, where PML has the same loss, against PML.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lib.embeddings import Embeddings
from lib.losses.base import OBJECTIVES, Objective, ProxyObjective
from lib.losses.functional import EPS, check_labels, euclidean_distances, row_distances
from lib.losses.functional import masked_log1p_sum_exp as _log1p_sum_exp
from lib.losses.functional import masked_logsumexp as _masked_logsumexp
from lib.miners import Miner, _random_choice, build_miner


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _zero(x: Tensor) -> Tensor:
    return x.sum() * 0.0


def pair_distances(x: Tensor, y: Tensor) -> Tensor:
    """(N, M) Euclidean distances ``sqrt(|x_i - y_j|^2 + 1e-8)`` (``lib.losses.functional``)."""
    return euclidean_distances(x, y, eps=EPS)


def pair_masks(labels: Tensor, asymmetric: bool, num_ref: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """(positive, negative) boolean (N, N) masks; the diagonal is a positive only when asymmetric."""
    same = labels.view(-1, 1) == labels.view(1, -1)
    pos = same.clone()
    if not asymmetric:
        pos.fill_diagonal_(False)
    return pos, ~same




# --------------------------------------------------------------------------------------------------
# tuple losses: pure functions on (anchors x, reference y, index tensors)
# --------------------------------------------------------------------------------------------------
def triplet_loss(x: Tensor, y: Tensor, a: Tensor, p: Tensor, n: Tensor, margin: float = 0.2) -> Tensor:
    """Triplet loss (Schroff et al., CVPR 2015, Eq. 1; Revisiting-DML ``criteria/triplet.py``):
    mean over the mined triplets of ``max(0, |x_a - y_p|^2 - |x_a - y_n|^2 + margin)``, *squared*
    Euclidean distances, plain mean (PML's default reducer averages over non-zero triplets only)."""
    if len(a) == 0:
        return _zero(x)
    xa = x[a]
    return F.relu((xa - y[p]).pow(2).sum(-1) - (xa - y[n]).pow(2).sum(-1) + margin).mean()


def margin_loss(x: Tensor, y: Tensor, a: Tensor, p: Tensor, n: Tensor, beta: Tensor, margin: float = 0.2,
                nu: float = 0.0) -> Tensor:
    """Margin loss (Wu et al., *Sampling Matters*, ICCV 2017, Eq. 5): per triplet
    ``max(0, d_ap - beta + margin) + max(0, beta - d_an + margin)``, summed and divided by the number
    of non-zero terms (Revisiting ``criteria/margin.py``), plus ``nu * sum(beta)`` over the triplets.
    ``beta`` holds one value per triplet (the anchor's class beta, or the global one)."""
    if len(a) == 0:
        return _zero(x) + _zero(beta)
    d_ap, d_an = row_distances(x[a], y[p]), row_distances(x[a], y[n])
    pos, neg = F.relu(d_ap - beta + margin), F.relu(beta - d_an + margin)
    count = (pos > 0).sum() + (neg > 0).sum()
    loss = (pos + neg).sum() / count.clamp(min=1).to(x.dtype)
    if nu:
        loss = loss + nu * beta.sum()
    return loss


def contrastive_loss(x: Tensor, y: Tensor, a: Tensor, p: Tensor, n: Tensor, pos_margin: float = 0.0,
                     neg_margin: float = 1.0) -> Tensor:
    """Contrastive loss (Hadsell et al., CVPR 2006) on the pairs of mined triplets (Revisiting
    ``criteria/contrastive.py``): ``mean max(0, d_ap - pos_margin) + mean max(0, neg_margin - d_an)``."""
    if len(a) == 0:
        return _zero(x)
    xa = x[a]
    return F.relu(row_distances(xa, y[p]) - pos_margin).mean() + F.relu(neg_margin - row_distances(xa, y[n])).mean()


def snr_distance(anchor: Tensor, other: Tensor) -> Tensor:
    """Signal-to-noise-ratio distance (Yuan et al., CVPR 2019, Eq. 4): ``var(h_o - h_a) / var(h_a)``,
    variances over the feature dimension (unbiased, as ``torch.var``, PML and Revisiting)."""
    return torch.var(other - anchor, dim=-1) / torch.var(anchor, dim=-1)


def snr_triplet_loss(x: Tensor, y: Tensor, a: Tensor, p: Tensor, n: Tensor, margin: float = 0.2,
                     reg_lambda: float = 0.0) -> Tensor:
    """SNR triplet loss (Yuan et al., *Signal-to-Noise Ratio: A Robust Distance Metric for Deep
    Metric Learning*, CVPR 2019; Revisiting ``criteria/snr.py``): ``max(0, snr(a,p) - snr(a,n) +
    margin)`` summed over triplets and divided by the number of non-zero ones (0 when none: the
    reference divides by zero), plus ``reg_lambda * mean |sum_d x_a|`` (zero-mean regulariser)."""
    if len(a) == 0:
        return _zero(x)
    xa = x[a]
    hinge = F.relu(snr_distance(xa, y[p]) - snr_distance(xa, y[n]) + margin)
    loss = hinge.sum() / (hinge > 0).sum().clamp(min=1).to(x.dtype)
    if reg_lambda:
        loss = loss + reg_lambda * xa.sum(1).abs().mean()
    return loss


def quadruplet_loss(x: Tensor, y: Tensor, a: Tensor, p: Tensor, n: Tensor, k: Tensor, margin_1: float = 0.2,
                    margin_2: float = 0.2) -> Tensor:
    """Quadruplet loss (Chen et al., *Beyond Triplet Loss*, CVPR 2017, Eq. 5, with Euclidean distances as
    Revisiting ``criteria/quadruplet.py``): ``mean max(0, d(a,p) - d(a,n) + margin_1)`` over triplets
    ``+ mean max(0, d(a,p) - d(n,k) + margin_2)`` over the quadruplets with a valid ``k`` (``k < 0``
    marks none), where ``k`` is of a third class (neither the anchor's nor the negative's), so the second
    term compares the positive pair with a negative pair that does not contain the anchor."""
    if len(a) == 0:
        return _zero(x)
    d_ap = row_distances(x[a], y[p])
    loss = F.relu(d_ap - row_distances(x[a], y[n]) + margin_1).mean()
    valid = k >= 0
    if bool(valid.any()):
        d_nk = row_distances(y[n[valid]], y[k[valid]])
        loss = loss + F.relu(d_ap[valid] - d_nk + margin_2).mean()
    return loss


def npair_loss(x: Tensor, y: Tensor, labels: Tensor, a: Tensor, p: Tensor, l2_weight: float = 0.005) -> Tensor:
    """N-pair loss (Sohn, NeurIPS 2016, Eq. 6; Revisiting ``criteria/npair.py``): for each anchor a with
    one positive p, ``log(1 + sum_n exp(x_a . (y_n - y_p)))`` over every reference row n of another
    class; mean over anchors, plus ``l2_weight * mean_i |x_i|`` (a constant on unit-norm embeddings, as
    in the reference, which feeds it normalised embeddings)."""
    reg = l2_weight * x.norm(dim=1).mean() if l2_weight else _zero(x)
    if len(a) == 0:
        return _zero(x) + reg
    xa = x[a]
    z = xa @ y.T - (xa * y[p]).sum(1, keepdim=True)
    neg = labels[a].view(-1, 1) != labels.view(1, -1)
    return _log1p_sum_exp(z, neg).mean() + reg


def angular_term(x: Tensor, y: Tensor, labels: Tensor, a: Tensor, p: Tensor, alpha_degrees: float = 45.0) -> Tensor:
    """Angular loss (Wang et al., *Deep Metric Learning with Angular Loss*, ICCV 2017, Eq. 8, the N-pair
    form): ``log(1 + sum_n exp(4 tan^2(alpha) (x_a + y_p) . y_n - 2 (1 + tan^2(alpha)) x_a . y_p))``
    on L2-normalised vectors, mean over anchors."""
    xa, yp, yn = F.normalize(x[a], dim=1), F.normalize(y[p], dim=1), F.normalize(y, dim=1)
    t2 = math.tan(math.radians(alpha_degrees)) ** 2
    z = 4 * t2 * (xa + yp) @ yn.T - 2 * (1 + t2) * (xa * yp).sum(1, keepdim=True)
    neg = labels[a].view(-1, 1) != labels.view(1, -1)
    return _log1p_sum_exp(z, neg).mean()


# --------------------------------------------------------------------------------------------------
# all-pairs losses
# --------------------------------------------------------------------------------------------------
def lifted_structure_loss(x: Tensor, y: Tensor, labels: Tensor, *, asymmetric: bool = False, margin: float = 1.0,
                          l2_weight: float = 0.005) -> Tensor:
    """Generalised lifted-structure loss (Hermans et al. 2017, Eq. 4, generalising Oh Song et al., CVPR
    2016; Revisiting ``criteria/lifted.py``): per anchor with a positive and a negative,
    ``max(0, logsumexp_P d(a,p) + logsumexp_N (margin - d(a,n)))``; mean over those anchors, plus
    ``l2_weight * mean_i |x_i|`` (as in :func:`npair_loss`)."""
    reg = l2_weight * x.norm(dim=1).mean() if l2_weight else _zero(x)
    pos, neg = pair_masks(labels, asymmetric)
    keep = pos.any(1) & neg.any(1)
    if not bool(keep.any()):
        return _zero(x) + reg
    d = pair_distances(x[keep], y)
    pos, neg = pos[keep], neg[keep]
    return F.relu(_masked_logsumexp(d, pos) + _masked_logsumexp(margin - d, neg)).mean() + reg


def histogram_loss(x: Tensor, y: Tensor, labels: Tensor, *, asymmetric: bool = False, num_bins: int = 65) -> Tensor:
    """Histogram loss (Ustinova & Lempitsky, NeurIPS 2016, Eqs. 2-4; Revisiting ``criteria/histogram.py``).

    Similarities ``s = x . y`` of the positive and of the negative pairs are spread over ``num_bins``
    nodes evenly spaced on [-1, 1] (step ``2 / (num_bins - 1)``) by linear interpolation, giving
    histograms ``h+`` and ``h-`` (each summing to 1); the loss is ``sum_r h-_r * sum_{q <= r} h+_q``,
    the probability that a random negative pair is more similar than a random positive one.
    Symmetric: the unordered pairs i < j; asymmetric: every ordered (query i, reference j) pair, with
    (i, i) a positive."""
    if num_bins < 2:
        raise ValueError(f"histogram: num_bins must be >= 2, got {num_bins}")
    sim = x @ y.T
    same = labels.view(-1, 1) == labels.view(1, -1)
    if asymmetric:
        pairs = torch.ones_like(same)
    else:
        pairs = torch.ones_like(same).triu(1)
    s_pos, s_neg = sim[pairs & same], sim[pairs & ~same]
    if len(s_pos) == 0 or len(s_neg) == 0:
        return _zero(x)
    h_pos, h_neg = _soft_histogram(s_pos, num_bins), _soft_histogram(s_neg, num_bins)
    return (h_neg * h_pos.cumsum(0)).sum()


def _soft_histogram(s: Tensor, num_bins: int) -> Tensor:
    step = 2.0 / (num_bins - 1)
    t = (s.clamp(-1, 1) + 1) / step
    low = t.detach().floor().long().clamp(max=num_bins - 2)
    frac = t - low.to(t.dtype)
    hist = torch.zeros(num_bins, dtype=s.dtype, device=s.device)
    hist = hist.index_add(0, low, 1 - frac).index_add(0, low + 1, frac)
    return hist / len(s)


def multisimilarity_loss(x: Tensor, y: Tensor, labels: Tensor, *, asymmetric: bool = False, alpha: float = 2.0,
                         beta: float = 40.0, margin: float = 0.1, threshold: float = 0.5) -> Tensor:
    """Multi-similarity loss (Wang et al., CVPR 2019, Eqs. 10-11 with the pair mining of Eqs. 7-8;
    Revisiting ``criteria/multisimilarity.py``). Per anchor: keep the negatives with
    ``s_an + margin > min s_ap`` and the positives with ``s_ap - margin < max s_an``, then
    ``1/alpha log(1 + sum_P exp(-alpha (s_ap - threshold))) + 1/beta log(1 + sum_N exp(beta (s_an - threshold)))``;
    mean over the anchors that keep at least one positive and one negative (others are skipped, as
    in the reference; PML averages over all anchors, counting skipped ones as 0)."""
    sim = x @ y.T
    pos, neg = pair_masks(labels, asymmetric)
    has = pos.any(1) & neg.any(1)
    if not bool(has.any()):
        return _zero(x)
    sim, pos, neg = sim[has], pos[has], neg[has]
    with torch.no_grad():
        min_pos = sim.masked_fill(~pos, float("inf")).amin(1, keepdim=True)
        max_neg = sim.masked_fill(~neg, float("-inf")).amax(1, keepdim=True)
        keep_neg = neg & (sim + margin > min_pos)
        keep_pos = pos & (sim - margin < max_neg)
        valid = keep_neg.any(1) & keep_pos.any(1)
    if not bool(valid.any()):
        return _zero(x)
    sim, keep_pos, keep_neg = sim[valid], keep_pos[valid], keep_neg[valid]
    pos_term = _log1p_sum_exp(-alpha * (sim - threshold), keep_pos) / alpha
    neg_term = _log1p_sum_exp(beta * (sim - threshold), keep_neg) / beta
    return (pos_term + neg_term).mean()


# --------------------------------------------------------------------------------------------------
# proxy losses
# --------------------------------------------------------------------------------------------------
def proxynca_loss(x: Tensor, proxies: Tensor, labels: Tensor, scale: float = 3.0) -> Tensor:
    """ProxyNCA (Movshovitz-Attias et al., ICCV 2017, Eq. 9; Revisiting ``criteria/proxynca.py``):
    with ``x' = scale * x/|x|`` and ``p' = scale * p/|p|``, the mean of
    ``|x' - p'_y|^2 + log sum_{z != y} exp(-|x' - p'_z|^2)``. The positive proxy is *not* in the
    denominator (PML's ProxyNCALoss includes it, i.e. it computes a softmax cross-entropy instead)."""
    xs, ps = scale * F.normalize(x, dim=1), scale * F.normalize(proxies, dim=1)
    d = (xs.pow(2).sum(1, keepdim=True) + ps.pow(2).sum(1).unsqueeze(0) - 2 * xs @ ps.T).clamp(min=0)
    onehot = F.one_hot(labels, len(proxies)).bool()
    d_pos = d[onehot]
    return (d_pos + _masked_logsumexp(-d, ~onehot)).mean()


def normalized_softmax_loss(x: Tensor, proxies: Tensor, labels: Tensor, temperature: float = 0.05) -> Tensor:
    """Normalised softmax (Zhai & Wu, *Classification is a Strong Baseline for DML*, BMVC 2019, Eq. 2;
    Revisiting ``criteria/softmax.py``): cross-entropy of ``cos(x, w_c) / temperature``."""
    logits = F.normalize(x, dim=1) @ F.normalize(proxies, dim=1).T
    return F.cross_entropy(logits / temperature, labels)


def arcface_loss(x: Tensor, proxies: Tensor, labels: Tensor, margin: float = 0.5, scale: float = 16.0) -> Tensor:
    """ArcFace (Deng et al., CVPR 2019, Eq. 3 and Alg. 1): cross-entropy of ``scale * cos(theta_c)``
    with the target logit replaced by ``scale * cos(theta_y + margin)`` (margin in radians).
    Cosines are clamped to [-1 + 1e-7, 1 - 1e-7] for acos; the Revisiting code clamps at 1e-10 from
    below, which zeroes every negative cosine, a bug not followed here."""
    cos = (F.normalize(x, dim=1) @ F.normalize(proxies, dim=1).T).clamp(-1 + 1e-7, 1 - 1e-7)
    onehot = F.one_hot(labels, len(proxies)).bool()
    target = torch.cos(torch.acos(cos[onehot]) + margin)
    logits = torch.where(onehot, target.unsqueeze(1).expand_as(cos), cos)
    return F.cross_entropy(scale * logits, labels)


def softtriple_loss(x: Tensor, centers: Tensor, labels: Tensor, num_classes: int, centers_per_class: int = 2,
                    margin: float = 0.01, gamma: float = 0.1, la: float = 8.0, reg_weight: float = 0.2) -> Tensor:
    """SoftTriple (Qian et al., ICCV 2019, Eqs. 8, 10, 12). ``centers`` (D, C*K), column ``c*K + k`` the
    k-th centre of class c, each L2-normalised. Relaxed class similarity
    ``S_c = sum_k softmax_k(<x, w_ck> / gamma) <x, w_ck>``; loss = cross-entropy of ``la * (S - margin
    * onehot)`` + ``reg_weight * sum_c sum_{k < k'} sqrt(2 + 1e-5 - 2 <w_ck, w_ck'>) / (C K (K-1))``
    (zero when K = 1). Follows the paper and its authors' code: the Revisiting code normalises the
    centres along the wrong axis and takes the softmax over classes with ``gamma * s`` instead of over
    a class's centres with ``s / gamma``."""
    w = F.normalize(centers, dim=0)
    sim = (x @ w).view(len(x), num_classes, centers_per_class)
    weights = torch.softmax(sim / gamma, dim=2)
    class_sim = (weights * sim).sum(2)
    delta = margin * F.one_hot(labels, num_classes).to(class_sim.dtype)
    loss = F.cross_entropy(la * (class_sim - delta), labels)
    if reg_weight and centers_per_class > 1:
        wk = w.T.reshape(num_classes, centers_per_class, -1)
        inner = wk @ wk.transpose(1, 2)  # (C, K, K)
        upper = torch.ones(centers_per_class, centers_per_class, dtype=torch.bool, device=x.device).triu(1)
        reg = torch.sqrt(2.0 + 1e-5 - 2.0 * inner[:, upper]).sum()
        loss = loss + reg_weight * reg / (num_classes * centers_per_class * (centers_per_class - 1))
    return loss


# --------------------------------------------------------------------------------------------------
# objectives
# --------------------------------------------------------------------------------------------------
class _MinedObjective(Objective):
    """An objective on mined triplets. ``miner``: a registered name (``lib.miners.MINERS``) or a
    ``Miner``; ``miner_kwargs`` go to its constructor; ``seed`` seeds the miner's generator (None:
    torch's default generator). ``last_tuples`` holds the indices used by the last call.
    Asymmetric: the miner draws positives and negatives among the teacher
    rows (including the anchor's own teacher row as a positive)."""

    def __init__(self, miner: Union[str, Miner] = "distance", miner_kwargs: Optional[Mapping[str, Any]] = None,
                 seed: Optional[int] = None, asymmetric: bool = False):
        super().__init__(asymmetric)
        kwargs = dict(miner_kwargs or {})
        if isinstance(miner, str):
            kwargs.setdefault("seed", seed)
            if miner == "semihard" and hasattr(self, "margin"):
                kwargs.setdefault("margin", self.margin)  # as Revisiting: the loss's own margin
        self.miner = build_miner(miner, **kwargs)

    def mine(self, batch: Embeddings) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        ref = self.reference(batch)
        a, p, n = self.miner(batch.student, batch.labels, ref=ref if self.asymmetric else None, ref_labels=batch.labels)
        self.last_tuples = (a, p, n)  # for inspection and tests
        return ref, a, p, n


@OBJECTIVES.register("triplet")
class TripletLoss(_MinedObjective):
    """Triplet loss, :func:`triplet_loss`. Revisiting defaults: margin 0.2, miner 'distance' (its
    ``--batch_mining`` default; the paper also reports 'random', 'semihard', 'softhard', 'rho_distance').
    Asymmetric: anchor student, positive and negative teacher rows."""

    def __init__(self, margin: float = 0.2, miner: Union[str, Miner] = "distance",
                 miner_kwargs: Optional[Mapping[str, Any]] = None, seed: Optional[int] = None, asymmetric: bool = False):
        self.margin = margin
        super().__init__(miner, miner_kwargs, seed, asymmetric)

    def forward(self, batch: Embeddings) -> Tensor:
        ref, a, p, n = self.mine(batch)
        return triplet_loss(batch.student, ref, a, p, n, self.margin)


@OBJECTIVES.register("margin")
class MarginLoss(_MinedObjective):
    """Margin loss with learnable boundary ``beta`` (Wu et al. 2017), :func:`margin_loss`. Revisiting
    defaults: margin 0.2, beta 1.2 (initial), nu 0, miner 'distance', one beta per class
    (``per_class=True``, ``num_classes`` of them; False: one global beta). ``learn_beta=False`` keeps
    beta fixed. ``lr_multiplier`` 50 = Revisiting's beta lr 5e-4 over its base lr 1e-5.
    Asymmetric: anchor student, positive and negative teacher rows."""

    def __init__(self, num_classes: int = 1, margin: float = 0.2, beta: float = 1.2, nu: float = 0.0,
                 per_class: bool = True, learn_beta: bool = True, lr_multiplier: float = 50.0,
                 miner: Union[str, Miner] = "distance", miner_kwargs: Optional[Mapping[str, Any]] = None,
                 seed: Optional[int] = None, asymmetric: bool = False):
        self.margin = margin
        super().__init__(miner, miner_kwargs, seed, asymmetric)
        self.nu, self.per_class, self.num_classes = nu, per_class, num_classes
        init = torch.full((num_classes if per_class else 1,), float(beta))
        if learn_beta:
            self.beta = nn.Parameter(init)
        else:
            self.register_buffer("beta", init)
        self.lr_multiplier = lr_multiplier

    def forward(self, batch: Embeddings) -> Tensor:
        if self.per_class:
            check_labels(batch.labels, self.num_classes, "margin")
        ref, a, p, n = self.mine(batch)
        beta = self.beta[batch.labels[a]] if self.per_class else self.beta.expand(len(a))
        return margin_loss(batch.student, ref, a, p, n, beta, self.margin, self.nu)


@OBJECTIVES.register("contrastive")
class ContrastiveLoss(_MinedObjective):
    """Contrastive loss, :func:`contrastive_loss`. Revisiting defaults: pos_margin 0, neg_margin 1,
    miner 'distance'. Asymmetric: student anchor, teacher positive and negative."""

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0, miner: Union[str, Miner] = "distance",
                 miner_kwargs: Optional[Mapping[str, Any]] = None, seed: Optional[int] = None, asymmetric: bool = False):
        self.margin = neg_margin
        super().__init__(miner, miner_kwargs, seed, asymmetric)
        self.pos_margin, self.neg_margin = pos_margin, neg_margin

    def forward(self, batch: Embeddings) -> Tensor:
        ref, a, p, n = self.mine(batch)
        return contrastive_loss(batch.student, ref, a, p, n, self.pos_margin, self.neg_margin)


@OBJECTIVES.register("snr")
class SNRLoss(_MinedObjective):
    """SNR triplet loss, :func:`snr_triplet_loss`. Revisiting defaults: margin 0.2, reg_lambda 0.005,
    miner 'distance'; ``reg_lambda=None`` reproduces Revisiting's rule (0.005, but 0 with the
    'distance' miner). Asymmetric: SNR of teacher positive/negative against the student anchor."""

    def __init__(self, margin: float = 0.2, reg_lambda: Optional[float] = None, miner: Union[str, Miner] = "distance",
                 miner_kwargs: Optional[Mapping[str, Any]] = None, seed: Optional[int] = None, asymmetric: bool = False):
        self.margin = margin
        super().__init__(miner, miner_kwargs, seed, asymmetric)
        if reg_lambda is None:
            reg_lambda = 0.0 if miner == "distance" else 0.005
        self.reg_lambda = reg_lambda

    def forward(self, batch: Embeddings) -> Tensor:
        ref, a, p, n = self.mine(batch)
        return snr_triplet_loss(batch.student, ref, a, p, n, self.margin, self.reg_lambda)


@OBJECTIVES.register("quadruplet")
class QuadrupletLoss(_MinedObjective):
    """Quadruplet loss (Chen et al. 2017), :func:`quadruplet_loss`. Revisiting defaults: margin_1 0.2,
    margin_2 0.2, miner 'distance'. The fourth sample k is drawn uniformly among the reference rows
    whose class is neither the anchor's nor the negative's (Chen et al.; the Revisiting code indexes
    the batch with a triplet index instead). Asymmetric: anchor student; p, n and k teacher rows."""

    def __init__(self, margin_1: float = 0.2, margin_2: float = 0.2, miner: Union[str, Miner] = "distance",
                 miner_kwargs: Optional[Mapping[str, Any]] = None, seed: Optional[int] = None, asymmetric: bool = False):
        self.margin = margin_1
        super().__init__(miner, miner_kwargs, seed, asymmetric)
        self.margin_1, self.margin_2 = margin_1, margin_2

    def forward(self, batch: Embeddings) -> Tensor:
        ref, a, p, n = self.mine(batch)
        labels = batch.labels
        third = (labels.view(1, -1) != labels[a].view(-1, 1)) & (labels.view(1, -1) != labels[n].view(-1, 1))
        has = third.any(1)
        k = torch.full_like(a, -1)
        if bool(has.any()):
            k[has] = _random_choice(third[has], self.miner._gen(None, labels.device))
        self.last_tuples = (a, p, n, k)
        return quadruplet_loss(batch.student, ref, a, p, n, k, self.margin_1, self.margin_2)


class _NPairObjective(Objective):
    """Anchors with a positive and a negative, one random positive each (Revisiting's 'npair' miner)."""

    def __init__(self, seed: Optional[int] = None, asymmetric: bool = False):
        super().__init__(asymmetric)
        self.seed = seed
        self._generator = None if seed is None else torch.Generator().manual_seed(int(seed))

    def pairs(self, labels: Tensor) -> Tuple[Tensor, Tensor]:
        pos, neg = pair_masks(labels, self.asymmetric)
        a = torch.nonzero(pos.any(1) & neg.any(1)).flatten()
        p = _random_choice(pos[a], self._generator) if len(a) else a
        self.last_tuples = (a, p)  # for inspection and tests
        return a, p


@OBJECTIVES.register("npair")
class NPairLoss(_NPairObjective):
    """N-pair loss (Sohn 2016), :func:`npair_loss`. Revisiting default: l2_weight 0.005.
    Asymmetric: anchor student, positive and the negatives teacher rows (the anchor's own teacher row
    can be its positive)."""

    def __init__(self, l2_weight: float = 0.005, seed: Optional[int] = None, asymmetric: bool = False):
        super().__init__(seed, asymmetric)
        self.l2_weight = l2_weight

    def forward(self, batch: Embeddings) -> Tensor:
        a, p = self.pairs(batch.labels)
        return npair_loss(batch.student, self.reference(batch), batch.labels, a, p, self.l2_weight)


@OBJECTIVES.register("angular")
class AngularLoss(_NPairObjective):
    """Angular loss (Wang et al. 2017) as in Revisiting ``criteria/angular.py``:
    ``npair + npair_angular_weight * angular + l2``, i.e. :func:`npair_loss` (with ``l2_weight``)
    plus ``npair_angular_weight`` times :func:`angular_term`. Revisiting defaults: alpha 45 degrees,
    weight 2, l2 0.005. Asymmetric: anchor student, positive and negatives teacher rows."""

    def __init__(self, alpha: float = 45.0, npair_angular_weight: float = 2.0, l2_weight: float = 0.005,
                 seed: Optional[int] = None, asymmetric: bool = False):
        super().__init__(seed, asymmetric)
        self.alpha, self.npair_angular_weight, self.l2_weight = alpha, npair_angular_weight, l2_weight

    def forward(self, batch: Embeddings) -> Tensor:
        x, y, labels = batch.student, self.reference(batch), batch.labels
        a, p = self.pairs(labels)
        loss = npair_loss(x, y, labels, a, p, self.l2_weight)
        if len(a) == 0:
            return loss
        return loss + self.npair_angular_weight * angular_term(x, y, labels, a, p, self.alpha)


@OBJECTIVES.register("lifted")
class LiftedStructureLoss(Objective):
    """Generalised lifted structure, :func:`lifted_structure_loss`. Revisiting defaults: margin 1,
    l2_weight 0.005. Asymmetric: anchor student, positive and negative sets teacher rows."""

    def __init__(self, margin: float = 1.0, l2_weight: float = 0.005, asymmetric: bool = False):
        super().__init__(asymmetric)
        self.margin, self.l2_weight = margin, l2_weight

    def forward(self, batch: Embeddings) -> Tensor:
        return lifted_structure_loss(batch.student, self.reference(batch), batch.labels, asymmetric=self.asymmetric,
                                     margin=self.margin, l2_weight=self.l2_weight)


@OBJECTIVES.register("histogram")
class HistogramLoss(Objective):
    """Histogram loss, :func:`histogram_loss`. Revisiting default: 65 bins (nodes).
    Asymmetric: the histograms of student-query vs teacher-reference similarities."""

    def __init__(self, num_bins: int = 65, asymmetric: bool = False):
        super().__init__(asymmetric)
        self.num_bins = num_bins

    def forward(self, batch: Embeddings) -> Tensor:
        return histogram_loss(batch.student, self.reference(batch), batch.labels, asymmetric=self.asymmetric,
                              num_bins=self.num_bins)


@OBJECTIVES.register("multisimilarity", "ms")
class MultiSimilarityLoss(Objective):
    """Multi-similarity loss, :func:`multisimilarity_loss`. Revisiting defaults: alpha (pos weight) 2,
    beta (neg weight) 40, margin 0.1, threshold 0.5. Asymmetric: student-query vs teacher-reference
    similarities, the anchor's own teacher row a positive."""

    def __init__(self, alpha: float = 2.0, beta: float = 40.0, margin: float = 0.1, threshold: float = 0.5,
                 asymmetric: bool = False):
        super().__init__(asymmetric)
        self.alpha, self.beta, self.margin, self.threshold = alpha, beta, margin, threshold

    def forward(self, batch: Embeddings) -> Tensor:
        return multisimilarity_loss(batch.student, self.reference(batch), batch.labels, asymmetric=self.asymmetric,
                                    alpha=self.alpha, beta=self.beta, margin=self.margin, threshold=self.threshold)


@OBJECTIVES.register("proxynca")
class ProxyNCALoss(ProxyObjective):
    """ProxyNCA, :func:`proxynca_loss`. Revisiting defaults: one proxy per class initialised
    ``N(0, 1) / 8``, scale 3, proxy ``lr_multiplier`` 50. ``asymmetric=True`` raises ValueError."""

    def __init__(self, embedding_dim: int, num_classes: int, scale: float = 3.0, lr_multiplier: float = 50.0,
                 asymmetric: bool = False):
        super().__init__(embedding_dim, num_classes, lr_multiplier, asymmetric)
        self.scale = scale
        self.proxies = nn.Parameter(torch.randn(num_classes, embedding_dim) / 8)

    def forward(self, batch: Embeddings) -> Tensor:
        return proxynca_loss(batch.student, self.proxies, self.class_labels(batch.labels), self.scale)


def _uniform_proxies(rows: int, cols: int, fan: int) -> nn.Parameter:
    bound = 1.0 / math.sqrt(fan)
    return nn.Parameter(torch.empty(rows, cols).uniform_(-bound, bound))


@OBJECTIVES.register("softmax")
class NormalizedSoftmaxLoss(ProxyObjective):
    """Normalised softmax, :func:`normalized_softmax_loss`. Revisiting defaults: temperature 0.05,
    proxies ``U(-1/sqrt(D), 1/sqrt(D))``, ``lr_multiplier`` 1 (its proxy lr 1e-5 = its base lr).
    ``asymmetric=True`` raises ValueError."""

    def __init__(self, embedding_dim: int, num_classes: int, temperature: float = 0.05, lr_multiplier: float = 1.0,
                 asymmetric: bool = False):
        super().__init__(embedding_dim, num_classes, lr_multiplier, asymmetric)
        self.temperature = temperature
        self.proxies = _uniform_proxies(num_classes, embedding_dim, embedding_dim)

    def forward(self, batch: Embeddings) -> Tensor:
        return normalized_softmax_loss(batch.student, self.proxies, self.class_labels(batch.labels), self.temperature)


@OBJECTIVES.register("arcface")
class ArcFaceLoss(ProxyObjective):
    """ArcFace, :func:`arcface_loss`. Revisiting defaults: angular margin 0.5 rad, scale 16, proxies
    ``U(-1/sqrt(D), 1/sqrt(D))``, ``lr_multiplier`` 50 (proxy lr 5e-4 over base lr 1e-5).
    ``asymmetric=True`` raises ValueError."""

    def __init__(self, embedding_dim: int, num_classes: int, margin: float = 0.5, scale: float = 16.0,
                 lr_multiplier: float = 50.0, asymmetric: bool = False):
        super().__init__(embedding_dim, num_classes, lr_multiplier, asymmetric)
        self.margin, self.scale = margin, scale
        self.proxies = _uniform_proxies(num_classes, embedding_dim, embedding_dim)

    def forward(self, batch: Embeddings) -> Tensor:
        return arcface_loss(batch.student, self.proxies, self.class_labels(batch.labels), self.margin, self.scale)


@OBJECTIVES.register("softtriple")
class SoftTripleLoss(ProxyObjective):
    """SoftTriple, :func:`softtriple_loss`. Revisiting defaults: 2 centres per class, margin (delta)
    0.01, gamma 0.1, lambda (``la``) 8, reg_weight (tau) 0.2, ``lr_multiplier`` 1 (``--loss_softtriplet_lrmulti``);
    centres ``U(-1/sqrt(C K), 1/sqrt(C K))``. ``asymmetric=True`` raises ValueError."""

    def __init__(self, embedding_dim: int, num_classes: int, centers_per_class: int = 2, margin: float = 0.01,
                 gamma: float = 0.1, la: float = 8.0, reg_weight: float = 0.2, lr_multiplier: float = 1.0,
                 asymmetric: bool = False):
        super().__init__(embedding_dim, num_classes, lr_multiplier, asymmetric)
        if centers_per_class < 1:
            raise ValueError(f"softtriple: centers_per_class must be >= 1, got {centers_per_class}")
        self.centers_per_class, self.margin, self.gamma, self.la, self.reg_weight = (
            centers_per_class, margin, gamma, la, reg_weight)
        self.centers = _uniform_proxies(embedding_dim, num_classes * centers_per_class, num_classes * centers_per_class)

    def forward(self, batch: Embeddings) -> Tensor:
        return softtriple_loss(batch.student, self.centers, self.class_labels(batch.labels), self.num_classes,
                               self.centers_per_class, self.margin, self.gamma, self.la, self.reg_weight)


__all__ = [
    "triplet_loss", "margin_loss", "contrastive_loss", "snr_distance", "snr_triplet_loss", "quadruplet_loss",
    "npair_loss", "angular_term", "lifted_structure_loss", "histogram_loss", "multisimilarity_loss",
    "proxynca_loss", "normalized_softmax_loss", "arcface_loss", "softtriple_loss", "pair_distances",
    "TripletLoss", "MarginLoss", "ContrastiveLoss", "SNRLoss", "QuadrupletLoss", "NPairLoss", "AngularLoss",
    "LiftedStructureLoss", "HistogramLoss", "MultiSimilarityLoss", "ProxyNCALoss", "NormalizedSoftmaxLoss",
    "ArcFaceLoss", "SoftTripleLoss",
]
