"""Triplet miners of Roth et al., *Revisiting Training Strategies and Generalization Performance in
Deep Metric Learning* (ICML 2020; reference code Confusezius/Revisiting_Deep_Metric_Learning_PyTorch,
``batchminer/``), and the distance-weighted negative sampler used by the ``sym`` mode.

Interface of every miner::

    anchors, positives, negatives = miner(embeddings, labels, ref=None, ref_labels=None, generator=None)

``embeddings`` (N, D) are the anchors/queries; ``ref`` (M, D) with ``ref_labels`` (M,) the reference
(database) rows, by default the embeddings themselves. ``anchors`` index ``embeddings``; ``positives``
and ``negatives`` index the reference rows. Self-pairs: with ``ref=None`` the pair (i, i) is never a
positive; with a ``ref`` it is, because the reference is then taken to be another embedding of the
same images (row i of ``ref`` is the teacher's view of anchor i). ``exclude_self`` overrides this
explicitly; nothing depends on object identity. Anchors without any positive are skipped (the
reference code crashes or misaligns its lists there).

Randomness comes from ``generator`` (a ``torch.Generator``), else from the miner's own generator when
it was built with ``seed=...``, else from torch's default generator. Distances are Euclidean and
computed without gradient. Sampling "proportionally to w" is done with the Gumbel-max trick on
``log w`` (exactly equivalent, and immune to underflow of ``w`` in high dimension).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from lib.registry import Registry

MINERS = Registry("miner")

Triplets = Tuple[Tensor, Tensor, Tensor]


# --------------------------------------------------------------------------------------------------
# pure functions
# --------------------------------------------------------------------------------------------------
def pairwise_distances(x: Tensor, y: Tensor) -> Tensor:
    """Euclidean distances (N, M) between the rows of ``x`` and ``y``, clamped at 0 before the root
    (mining needs no gradient, so no epsilon: ``lib.losses.functional.euclidean_distances``)."""
    from lib.losses.functional import euclidean_distances

    return euclidean_distances(x, y)


def log_inverse_sphere_density(distances: Tensor, dim: int) -> Tensor:
    """``-log q(d)``: minus the log density of the distance between two points drawn uniformly on the
    unit sphere in R^dim, ``log q(d) = (dim-2) log d + (dim-3)/2 log(1 - d^2/4)`` (Wu et al., ICCV
    2017, Eq. 3). ``1 - d^2/4`` is clamped at 1e-8 so that d = 2 stays finite."""
    d = distances
    return -(dim - 2.0) * torch.log(d) - (dim - 3.0) / 2.0 * torch.log((1.0 - 0.25 * d * d).clamp(min=1e-8))


def _uniform(shape, device, generator: Optional[torch.Generator]) -> Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def gumbel_topk(log_weights: Tensor, k: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Indices (rows, k) of ``k`` draws without replacement per row, each row sampled with probability
    proportional to ``exp(log_weights)`` (Gumbel-top-k; ``-inf`` entries are never drawn). The caller
    makes sure every row has at least ``k`` finite entries."""
    u = _uniform(log_weights.shape, log_weights.device, generator).clamp(min=1e-20, max=1 - 1e-7)
    keys = log_weights - torch.log(-torch.log(u))
    return keys.topk(k, dim=-1).indices


def _random_choice(mask: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """One uniformly drawn True column per row of a boolean (R, M) mask (each row has a True)."""
    log_w = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))
    return gumbel_topk(log_w, 1, generator).squeeze(1)


def sample_distance_weighted(query: Tensor, pool: Tensor, query_labels: Tensor, pool_labels: Tensor, num: int, *,
                             cutoff: float = 0.5, upper_cutoff: Optional[float] = None,
                             generator: Optional[torch.Generator] = None, chunk_size: int = 1024) -> Tensor:
    """``num`` negatives per query drawn by distance-weighted sampling (Wu et al., ICCV 2017) from a pool.

    Each pool item of another class is drawn with probability proportional to ``q(d)^-1`` (see
    :func:`log_inverse_sphere_density`), ``d`` the Euclidean distance clamped below at ``cutoff``;
    with ``upper_cutoff`` items farther than it get weight 0 (Wu et al.'s "nonzero-loss cutoff"; off by
    default here). Draws are without replacement and never of the query's class.

    Args:
        query: (Q, D) unit-norm query embeddings; pool: (P, D) unit-norm pool embeddings.
        query_labels: (Q,); pool_labels: (P,).
        num: negatives per query; 0 gives a (Q, 0) tensor.
    Returns:
        (Q, num) LongTensor of indices into ``pool`` (on ``query``'s device).
    Raises:
        ValueError: when a query has fewer than ``num`` eligible pool items (other class, and within
            ``upper_cutoff`` if given): asking for more distinct negatives than exist is a configuration
            error (raise ``pool_size`` or lower ``neg_num``), not something to paper over.
    """
    if num < 0:
        raise ValueError(f"num (negatives per query) must be >= 0, got {num}")
    q_n, dim = query.shape
    device = query.device
    if num == 0 or q_n == 0:
        return torch.zeros(q_n, num, dtype=torch.long, device=device)
    pool = pool.to(device=device, dtype=query.dtype)
    query_labels, pool_labels = query_labels.to(device), pool_labels.to(device)
    out = []
    with torch.no_grad():
        for start in range(0, q_n, chunk_size):
            q = query[start:start + chunk_size]
            dist = pairwise_distances(q, pool)
            eligible = query_labels[start:start + chunk_size].view(-1, 1) != pool_labels.view(1, -1)
            if upper_cutoff is not None:
                eligible &= dist <= upper_cutoff
            counts = eligible.sum(1)
            if bool((counts < num).any()):
                row = int(torch.nonzero(counts < num)[0]) + start
                raise ValueError(
                    f"query {row} has only {int(counts.min())} eligible negatives in a pool of {len(pool)}, "
                    f"fewer than num={num}; enlarge the pool (pool_size) or lower neg_num")
            log_w = log_inverse_sphere_density(dist.clamp(min=cutoff).float(), dim)
            log_w = log_w.masked_fill(~eligible, float("-inf"))
            out.append(gumbel_topk(log_w, num, generator))
    return torch.cat(out)


distance_weighted_negatives = sample_distance_weighted


# --------------------------------------------------------------------------------------------------
# miners
# --------------------------------------------------------------------------------------------------
class Miner(nn.Module):
    """Base class: resolves the reference side, the masks and the random generator; subclasses
    implement :meth:`mine` on the distance matrix. An ``nn.Module`` so that a learnable miner
    (PADS) is saved with the objective that owns it."""

    def __init__(self, seed: Optional[int] = None):
        super().__init__()
        self.seed = seed
        self._generator = None if seed is None else torch.Generator().manual_seed(int(seed))

    def _gen(self, generator, device):
        """The call's generator, else the miner's own (a CPU generator: random numbers are drawn on
        its device and moved, so results do not depend on the tensors' device), else None."""
        return generator if generator is not None else self._generator

    def forward(self, embeddings: Tensor, labels: Tensor, ref: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None, *, exclude_self: Optional[bool] = None,
                generator: Optional[torch.Generator] = None) -> Triplets:
        if ref is None:
            ref, ref_labels = embeddings, labels if ref_labels is None else ref_labels
            exclude_self = True if exclude_self is None else exclude_self
        else:
            if ref_labels is None:
                if len(ref) != len(embeddings):
                    raise ValueError(f"ref has {len(ref)} rows but embeddings {len(embeddings)}; pass ref_labels")
                ref_labels = labels
            exclude_self = False if exclude_self is None else exclude_self
        if exclude_self and len(ref) != len(embeddings):
            raise ValueError("exclude_self needs ref rows aligned with the embeddings (same N)")
        with torch.no_grad():
            emb, ref_d = embeddings.detach(), ref.detach().to(embeddings.dtype)
            dist = pairwise_distances(emb, ref_d)
            same = labels.view(-1, 1).to(ref_labels.device) == ref_labels.view(1, -1)
            pos = same.clone()
            if exclude_self:
                pos.fill_diagonal_(False)
            neg = ~same
            a, p, n = self.mine(dist, pos, neg, dim=emb.shape[1], generator=self._gen(generator, emb.device))
        return a.long(), p.long(), n.long()

    def mine(self, dist: Tensor, pos: Tensor, neg: Tensor, *, dim: int,
             generator: Optional[torch.Generator]) -> Triplets:  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def _valid_anchors(pos: Tensor, neg: Tensor) -> Tensor:
        return torch.nonzero(pos.any(1) & neg.any(1)).flatten()


@MINERS.register("random")
class RandomMiner(Miner):
    """Uniformly random triplets (Revisiting-DML ``batchminer/random.py``): ``N`` triplets drawn without
    replacement from all valid (anchor, positive, negative) triplets of the batch (fewer if fewer exist)."""

    def __init__(self, num_triplets: Optional[int] = None, seed: Optional[int] = None):
        super().__init__(seed)
        self.num_triplets = num_triplets

    def mine(self, dist, pos, neg, *, dim, generator):
        device = dist.device
        pa, pp = torch.nonzero(pos, as_tuple=True)  # all (anchor, positive) pairs
        n_neg = neg.sum(1)[pa]
        keep = n_neg > 0
        pa, pp, n_neg = pa[keep], pp[keep], n_neg[keep]
        total = int(n_neg.sum())
        want = min(self.num_triplets or dist.shape[0], total)
        if want == 0:
            return (torch.zeros(0, dtype=torch.long, device=device),) * 3
        gen_device = generator.device if generator is not None else device
        flat = torch.randperm(total, generator=generator, device=gen_device)[:want].to(device)
        ends = n_neg.cumsum(0)
        k = torch.searchsorted(ends, flat, right=True)  # which (anchor, positive) pair
        offset = flat - (ends[k] - n_neg[k])              # which of that anchor's negatives
        rows = neg[pa[k]]
        rank = rows.long().cumsum(1) - 1
        n = ((rank == offset.view(-1, 1)) & rows).float().argmax(1)
        return pa[k], pp[k], n


@MINERS.register("semihard")
class SemihardMiner(Miner):
    """Semi-hard negatives (Schroff et al., CVPR 2015; Revisiting-DML ``batchminer/semihard.py``): per
    anchor a random positive p, then a random negative n with ``d(a,p) < d(a,n) < d(a,p) + margin``,
    else a random negative. ``margin`` 0.2 as the triplet loss's (Euclidean, not squared, distances
    as in the reference)."""

    def __init__(self, margin: float = 0.2, seed: Optional[int] = None):
        super().__init__(seed)
        self.margin = margin

    def mine(self, dist, pos, neg, *, dim, generator):
        a = self._valid_anchors(pos, neg)
        d, pos, neg = dist[a], pos[a], neg[a]
        p = _random_choice(pos, generator)
        d_ap = d.gather(1, p.view(-1, 1))
        semi = neg & (d > d_ap) & (d < d_ap + self.margin)
        n = _random_choice(torch.where(semi.any(1, keepdim=True), semi, neg), generator)
        return a, p, n


@MINERS.register("softhard")
class SofthardMiner(Miner):
    """Soft-hard mining (Revisiting-DML ``batchminer/softhard.py``): a random positive among those
    farther than the closest negative, and a random negative among those closer than the farthest
    positive; either falls back to a uniform draw when its candidate set is empty."""

    def mine(self, dist, pos, neg, *, dim, generator):
        a = self._valid_anchors(pos, neg)
        d, pos, neg = dist[a], pos[a], neg[a]
        far_pos = d.masked_fill(~pos, float("-inf")).amax(1, keepdim=True)
        near_neg = d.masked_fill(~neg, float("inf")).amin(1, keepdim=True)
        hard_pos, hard_neg = pos & (d > near_neg), neg & (d < far_pos)
        p = _random_choice(torch.where(hard_pos.any(1, keepdim=True), hard_pos, pos), generator)
        n = _random_choice(torch.where(hard_neg.any(1, keepdim=True), hard_neg, neg), generator)
        return a, p, n


def _distance_weighted_log_weights(d: Tensor, neg: Tensor, dim: int, lower_cutoff: float,
                                   upper_cutoff: Optional[float]) -> Tensor:
    """log q(d)^-1 on the negatives, -inf elsewhere; beyond ``upper_cutoff`` -inf unless that leaves
    a row without candidates, in which case the row falls back to uniform over its negatives."""
    log_w = log_inverse_sphere_density(d.clamp(min=lower_cutoff).float(), dim).masked_fill(~neg, float("-inf"))
    if upper_cutoff is not None:
        inside = neg & (d <= upper_cutoff)
        empty = ~inside.any(1, keepdim=True)
        log_w = torch.where(empty, torch.zeros_like(log_w).masked_fill(~neg, float("-inf")),
                            log_w.masked_fill(~inside, float("-inf")))
    return log_w


@MINERS.register("distance")
class DistanceWeightedMiner(Miner):
    """Distance-weighted sampling (Wu et al., *Sampling Matters in Deep Embedding Learning*, ICCV 2017;
    Revisiting-DML ``batchminer/distance.py``): per anchor a random positive, and a negative drawn with
    probability ``~ q(d)^-1`` (inverse of the distance density on the unit sphere), distances clamped
    below at ``lower_cutoff`` 0.5 and negatives beyond ``upper_cutoff`` 1.4 excluded (as in Wu et al.;
    the Revisiting code parses this cutoff but ignores it). When every negative of an anchor lies beyond
    the upper cutoff the negative is drawn uniformly."""

    def __init__(self, lower_cutoff: float = 0.5, upper_cutoff: Optional[float] = 1.4, seed: Optional[int] = None):
        super().__init__(seed)
        self.lower_cutoff, self.upper_cutoff = lower_cutoff, upper_cutoff

    def mine(self, dist, pos, neg, *, dim, generator):
        a = self._valid_anchors(pos, neg)
        d, pos, neg = dist[a], pos[a], neg[a]
        p = _random_choice(pos, generator)
        log_w = _distance_weighted_log_weights(d, neg, dim, self.lower_cutoff, self.upper_cutoff)
        n = gumbel_topk(log_w, 1, generator).squeeze(1)
        return a, p, n


@MINERS.register("rho_distance")
class RhoDistanceMiner(DistanceWeightedMiner):
    """Distance-weighted sampling with Roth et al.'s spectral regularisation ("rho-distance", ICML 2020,
    Sec. 5; ``batchminer/rho_distance.py``): with probability ``rho`` (0.2, ``--miner_rho_distance_cp``)
    an anchor's triplet is replaced by (a, a, p'): the anchor itself (its reference row) as "positive"
    and a random other positive p' as "negative", so the loss pushes a same-class sample away and
    keeps the embedding spectrum from collapsing. Otherwise as :class:`DistanceWeightedMiner`.
    ``last_num_flipped`` records how many triplets were flipped in the last call."""

    def __init__(self, rho: float = 0.2, lower_cutoff: float = 0.5, upper_cutoff: Optional[float] = 1.4,
                 seed: Optional[int] = None):
        super().__init__(lower_cutoff, upper_cutoff, seed)
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"rho must lie in [0, 1], got {rho}")
        self.rho = rho
        self.last_num_flipped = 0

    def mine(self, dist, pos, neg, *, dim, generator):
        a, p, n = super().mine(dist, pos, neg, dim=dim, generator=generator)
        if pos.shape[1] != dist.shape[0]:
            raise ValueError("rho_distance flips to (a, a, p'): the reference rows must be aligned with the anchors")
        # the flipped "negative" is a positive other than the anchor's own (reference) row
        rows = torch.arange(len(a), device=a.device)
        other = pos[a].clone()
        other[rows, a] = False
        flip = (_uniform((len(a),), a.device, generator) < self.rho) & other.any(1)
        if bool(flip.any()):
            p = torch.where(flip, a, p)
            n = torch.where(flip, _random_choice(torch.where(other.any(1, keepdim=True), other, pos[a]), generator), n)
        self.last_num_flipped = int(flip.sum())
        return a, p, n


@MINERS.register("parametric")
class ParametricMiner(Miner):
    """Learnable negative-sampling distribution over distance bins (PADS: Roth, Milbich, Ommer,
    *PADS: Policy-Adapted Sampling for Visual Similarity Learning*, CVPR 2020), in a reduced form.

    The distance range ``[support_min, support_max]`` is cut into ``num_bins`` bins; ``logits``
    (an ``nn.Parameter``) define p(bin) = softmax(logits). Per anchor a random positive is drawn and a
    negative with probability proportional to p(bin of d(a, n)) (distances outside the range go to the
    first/last bin). ``init`` sets the starting distribution: 'uniform', or 'distance' (log q(d)^-1 at
    the bin centres, i.e. distance-weighted sampling).

    PADS adapts the distribution with a policy trained by REINFORCE on the change of a validation
    metric. Here the policy *is* the bin distribution: :meth:`update` takes a scalar ``reward`` (e.g.
    the recall gain since the last update) and does one REINFORCE ascent step on
    ``(reward - baseline) * mean log p(bin of each negative drawn since the last update)``, with an
    exponential-moving-average baseline. The paper's policy network, state and multiplicative actions
    are not reproduced. The trainer's optimiser leaves ``logits`` alone (it gets no gradient from the
    loss); only :meth:`update` changes it. The trainer calls :meth:`update` after every validation with
    the change of the validation score since the previous one (``learns_from_validation``), and refuses
    to train it without validation.
    """

    #: the trainer feeds :meth:`update` the validation score's change (``lib.trainer.learned_miners``)
    learns_from_validation = True

    def __init__(self, num_bins: int = 30, support_min: float = 0.1, support_max: float = 1.4,
                 init: str = "uniform", policy_lr: float = 0.1, baseline_momentum: float = 0.9,
                 dim: int = 128, seed: Optional[int] = None):
        super().__init__(seed)
        if num_bins < 1 or not support_max > support_min:
            raise ValueError(f"need num_bins >= 1 and support_max > support_min, got {num_bins}, "
                             f"[{support_min}, {support_max}]")
        self.num_bins, self.support_min, self.support_max = num_bins, support_min, support_max
        self.policy_lr, self.baseline_momentum = policy_lr, baseline_momentum
        edges = torch.linspace(support_min, support_max, num_bins + 1)
        self.register_buffer("edges", edges)
        if init == "uniform":
            logits = torch.zeros(num_bins)
        elif init == "distance":
            logits = log_inverse_sphere_density((edges[:-1] + edges[1:]) / 2, dim)
            logits = logits - logits.max()
        else:
            raise ValueError(f"init must be 'uniform' or 'distance', got {init!r}")
        self.logits = nn.Parameter(logits)
        self.register_buffer("baseline", torch.zeros(()))
        self.register_buffer("bin_counts", torch.zeros(num_bins))  # negatives drawn since the last update

    def probabilities(self) -> Tensor:
        return torch.softmax(self.logits.detach(), 0)

    def bin_of(self, distances: Tensor) -> Tensor:
        inner = self.edges[1:-1].to(distances.device, distances.dtype).contiguous()
        return torch.bucketize(distances.contiguous(), inner, right=True)

    def mine(self, dist, pos, neg, *, dim, generator):
        a = self._valid_anchors(pos, neg)
        d, pos, neg = dist[a], pos[a], neg[a]
        p = _random_choice(pos, generator)
        bins = self.bin_of(d)
        log_p = torch.log_softmax(self.logits.detach(), 0).to(d.device)[bins].masked_fill(~neg, float("-inf"))
        n = gumbel_topk(log_p, 1, generator).squeeze(1)
        drawn = bins.gather(1, n.view(-1, 1)).flatten()
        self.bin_counts += torch.bincount(drawn, minlength=self.num_bins).to(self.bin_counts)
        return a, p, n

    def update(self, reward: float) -> Dict[str, float]:
        """One REINFORCE step (PADS Eq. 4, with the bin distribution as the policy); resets the counts.
        Returns the advantage and the new distribution's entropy."""
        total = float(self.bin_counts.sum())
        advantage = float(reward) - float(self.baseline)
        if total > 0:
            logits = self.logits.detach().clone().requires_grad_(True)
            objective = advantage * (self.bin_counts.to(logits) * torch.log_softmax(logits, 0)).sum() / total
            (grad,) = torch.autograd.grad(objective, logits)
            with torch.no_grad():
                self.logits += self.policy_lr * grad
        self.baseline.mul_(self.baseline_momentum).add_((1 - self.baseline_momentum) * float(reward))
        self.bin_counts.zero_()
        prob = self.probabilities()
        return {"advantage": advantage, "entropy": float(-(prob * prob.clamp(min=1e-12).log()).sum())}


def build_miner(miner, **kwargs) -> Miner:
    """A miner from its registered name (or an instance, returned as is)."""
    if isinstance(miner, Miner):
        return miner
    return MINERS.build(miner, **kwargs)


__all__ = ["MINERS", "Miner", "RandomMiner", "SemihardMiner", "SofthardMiner", "DistanceWeightedMiner",
           "RhoDistanceMiner", "ParametricMiner", "build_miner", "pairwise_distances", "log_inverse_sphere_density",
           "gumbel_topk", "sample_distance_weighted", "distance_weighted_negatives"]
