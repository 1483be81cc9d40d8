"""Proxy-based objectives: ProxyAnchor, the NIR repository's ``oproxy``, and non-isotropy regularisation.

* ProxyAnchor -- Kim, Kim, Cho, Kwak, "Proxy Anchor Loss for Deep Metric Learning", CVPR 2020, Eq. 4.
* oproxy, NIR -- Roth, Vinyals, Akata, "Non-isotropy Regularization for Proxy-based Deep Metric
  Learning", CVPR 2022 (github ExplainableML/NonIsotropicProxyDML, ``criteria/oproxy.py``,
  ``criteria/nir.py``, ``parameters.py``).

All three compare unit-norm student embeddings with unit-norm class proxies by cosine similarity
``s(x, p)``. Labels are training class ids ``0..C-1``; ``C = num_classes`` proxies are learned at
``lr * lr_multiplier``.

``asymmetric=True`` (``proxyanchor`` and ``oproxy``): the proxies are no longer learned; they are the
class centres of the (detached) teacher embeddings, i.e. of the database side, kept as an exponential
moving average ``p_c <- normalize(m p_c + (1 - m) mean_{i: y_i = c} t_i)`` (``teacher_momentum`` m,
first sight of a class sets ``p_c`` to its batch mean) in a buffer, so they land in checkpoints. The
student is then pulled to the teacher's class centre and pushed from the others; only classes seen so
far act as proxies. ``nir`` rejects ``asymmetric=True``: its flow is conditioned on learned proxies.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lib.embeddings import Embeddings
from lib.losses.base import OBJECTIVES, Objective, ProxyObjective
from lib.losses.functional import masked_log1p_sum_exp


# ----------------------------------------------------------------------------------------- math
def cosine_to_proxies(embeddings: Tensor, proxies: Tensor) -> Tensor:
    """(N, C) cosine similarities of the rows of ``embeddings`` with the proxies."""
    return F.normalize(embeddings, dim=-1) @ F.normalize(proxies, dim=-1).T


def proxy_anchor_loss(embeddings: Tensor, proxies: Tensor, labels: Tensor, alpha: float = 32.0,
                      margin: float = 0.1) -> Tensor:
    """ProxyAnchor, Kim et al. CVPR 2020, Eq. 4::

        L = 1/|P+| sum_{p in P+} log(1 + sum_{x in X_p+} exp(-alpha (s(x, p) - margin)))
          + 1/|P|  sum_{p in P}  log(1 + sum_{x in X_p-} exp( alpha (s(x, p) + margin)))

    P: all C proxies; P+: proxies with a positive in the batch; X_p+ / X_p-: batch rows of / not of
    the proxy's class. Same value as pytorch-metric-learning's ``ProxyAnchorLoss``.
    """
    cos = cosine_to_proxies(embeddings, proxies)
    positive = F.one_hot(labels.long(), proxies.shape[0]).bool()
    pos = masked_log1p_sum_exp(-alpha * (cos - margin), positive, dim=0)
    neg = masked_log1p_sum_exp(alpha * (cos + margin), ~positive, dim=0)
    num_with_positives = positive.any(0).sum().clamp_min(1)
    return pos.sum() / num_with_positives + neg.sum() / proxies.shape[0]


def oproxy_loss(embeddings: Tensor, proxies: Tensor, labels: Tensor, mode: str = "anchor",
                pos_alpha: float = 32.0, neg_alpha: float = 32.0, pos_delta: float = 0.1,
                neg_delta: float = -0.1) -> Tensor:
    """The NIR repository's ``oproxy`` criterion, one formula with two reduction directions.

    With ``s_ic = s(x_i, p_c)``, ``n_c`` the number of batch rows of class c, N rows, C proxies:

    ``mode='anchor'`` (ProxyAnchor; the repo's default)::

        L = 1/N sum_i log(1 + sum_{j: y_j = y_i} exp(-pos_alpha (s_{j y_i} - pos_delta)))
          + 1/C sum_c log(1 + sum_{i: y_i != c} exp( neg_alpha (s_ic - neg_delta)))

      i.e. Kim et al.'s ProxyAnchor (with ``neg_delta = -margin``) except that the positive term is
      averaged over batch rows, so each positive proxy counts ``n_c`` times, instead of over the
      distinct positive proxies.

    ``mode='nca'`` (ProxyNCA-style: the same terms reduced over proxies per sample)::

        L = 1/N sum_i [ log(1 + n_{y_i} exp(-pos_alpha (s_{i y_i} - pos_delta)))
                      + log(1 + sum_{c != y_i} exp(neg_alpha (s_ic - neg_delta))) ]

      (the repo's mask counts the positive proxy once per same-class row, hence ``n_{y_i}``).
    """
    if mode not in ("anchor", "nca"):
        raise ValueError(f"oproxy mode {mode!r} is not 'anchor' or 'nca'")
    labels = labels.long()
    cos = cosine_to_proxies(embeddings, proxies)
    positive = F.one_hot(labels, proxies.shape[0]).bool()
    counts = positive.sum(0).to(cos.dtype)  # n_c
    if mode == "anchor":
        pos_per_class = masked_log1p_sum_exp(-pos_alpha * (cos - pos_delta), positive, dim=0)
        pos = (pos_per_class * counts).sum() / len(labels)
        neg = masked_log1p_sum_exp(neg_alpha * (cos - neg_delta), ~positive, dim=0).mean()
        return pos + neg
    own = cos.gather(1, labels[:, None]).squeeze(1)
    pos = F.softplus(-pos_alpha * (own - pos_delta) + counts[labels].log()).mean()
    neg = masked_log1p_sum_exp(neg_alpha * (cos - neg_delta), ~positive, dim=1).mean()
    return pos + neg


# ------------------------------------------------------------------------------------- modules
def init_proxies(num_classes: int, embedding_dim: int, init: str) -> Tensor:
    """``'kaiming'``: kaiming-normal, fan_out (ProxyAnchor's official code, std sqrt(2/C));
    ``'normal8'``: N(0, 1) / 8 (the NIR repository)."""
    proxies = torch.empty(num_classes, embedding_dim)
    if init == "kaiming":
        nn.init.kaiming_normal_(proxies, mode="fan_out")
    elif init == "normal8":
        nn.init.normal_(proxies, std=1.0 / 8)
    else:
        raise ValueError(f"proxy init {init!r} is not 'kaiming' or 'normal8'")
    return proxies


class _TeacherProxyObjective(ProxyObjective):
    """Holds the proxies: a learned ``nn.Parameter``, or with ``asymmetric=True`` a buffer of teacher
    class centres (see the module docstring)."""

    supports_asymmetric = True

    def __init__(self, embedding_dim: int, num_classes: int, init: str, lr_multiplier: float,
                 asymmetric: bool = False, teacher_momentum: float = 0.9):
        super().__init__(embedding_dim, num_classes, lr_multiplier, asymmetric)
        if not 0.0 <= teacher_momentum < 1.0:
            raise ValueError(f"teacher_momentum={teacher_momentum} must lie in [0, 1)")
        self.teacher_momentum = teacher_momentum
        if asymmetric:
            self.register_buffer("proxies", torch.zeros(num_classes, embedding_dim))
            self.register_buffer("proxy_seen", torch.zeros(num_classes, dtype=torch.bool))
        else:
            self.proxies = nn.Parameter(init_proxies(num_classes, embedding_dim, init))

    @torch.no_grad()
    def _update_teacher_proxies(self, teacher: Tensor, labels: Tensor) -> None:
        teacher = F.normalize(teacher.detach().to(self.proxies.dtype), dim=-1)
        classes, inverse = labels.unique(return_inverse=True)
        sums = torch.zeros(len(classes), teacher.shape[1], dtype=teacher.dtype, device=teacher.device)
        sums.index_add_(0, inverse, teacher)
        means = sums / torch.bincount(inverse, minlength=len(classes)).to(teacher.dtype)[:, None]
        old = self.proxies[classes]
        seen = self.proxy_seen[classes][:, None]
        m = self.teacher_momentum
        self.proxies[classes] = F.normalize(torch.where(seen, m * old + (1 - m) * means, means), dim=-1)
        self.proxy_seen[classes] = True

    def proxies_and_labels(self, batch: Embeddings) -> tuple[Tensor, Tensor]:
        """The proxies to compare ``batch.student`` with, and the labels indexing them."""
        labels = self.class_labels(batch.labels)
        if not self.asymmetric:
            return self.proxies, labels
        teacher = self.reference(batch)
        if self.training:
            self._update_teacher_proxies(teacher, labels)
        seen = self.proxy_seen.clone()
        seen[labels] = True  # in eval, unseen batch classes fall back to their batch mean below
        proxies = self.proxies.clone()
        fresh = ~self.proxy_seen[labels]
        if fresh.any():
            proxies[labels[fresh]] = F.normalize(teacher[fresh].to(proxies.dtype), dim=-1)
        index = seen.nonzero().squeeze(1)
        lookup = torch.full((self.num_classes,), -1, dtype=torch.long, device=labels.device)
        lookup[index] = torch.arange(len(index), device=labels.device)
        return proxies[index].to(batch.student.dtype), lookup[labels]


@OBJECTIVES.register("proxyanchor")
class ProxyAnchor(_TeacherProxyObjective):
    """ProxyAnchor (Kim et al. CVPR 2020), see :func:`proxy_anchor_loss`. Defaults are the paper's:
    ``alpha=32``, ``margin=0.1``, kaiming-normal proxies at 100x the learning rate."""

    def __init__(self, embedding_dim: int, num_classes: int, alpha: float = 32.0, margin: float = 0.1,
                 init: str = "kaiming", lr_multiplier: float = 100.0, asymmetric: bool = False,
                 teacher_momentum: float = 0.9):
        super().__init__(embedding_dim, num_classes, init, lr_multiplier, asymmetric, teacher_momentum)
        self.alpha, self.margin = alpha, margin

    def loss(self, embeddings: Tensor, proxies: Tensor, labels: Tensor) -> Tensor:
        return proxy_anchor_loss(embeddings, proxies, labels, self.alpha, self.margin)

    def forward(self, batch: Embeddings) -> Tensor:
        proxies, labels = self.proxies_and_labels(batch)
        return self.loss(batch.student, proxies, labels)


@OBJECTIVES.register("oproxy")
class OProxy(_TeacherProxyObjective):
    """The NIR repository's ``oproxy`` criterion, see :func:`oproxy_loss`. Defaults are the repo's
    (``parameters.py``): alphas 32, deltas +0.1 / -0.1, proxies N(0, 1)/8 at 2000x the learning rate."""

    def __init__(self, embedding_dim: int, num_classes: int, mode: str = "anchor", pos_alpha: float = 32.0,
                 neg_alpha: float = 32.0, pos_delta: float = 0.1, neg_delta: float = -0.1,
                 init: str = "normal8", lr_multiplier: float = 2000.0, asymmetric: bool = False,
                 teacher_momentum: float = 0.9):
        if mode not in ("anchor", "nca"):
            raise ValueError(f"oproxy mode {mode!r} is not 'anchor' or 'nca'")
        super().__init__(embedding_dim, num_classes, init, lr_multiplier, asymmetric, teacher_momentum)
        self.mode = mode
        self.pos_alpha, self.neg_alpha, self.pos_delta, self.neg_delta = pos_alpha, neg_alpha, pos_delta, neg_delta

    def loss(self, embeddings: Tensor, proxies: Tensor, labels: Tensor) -> Tensor:
        return oproxy_loss(embeddings, proxies, labels, self.mode, self.pos_alpha, self.neg_alpha,
                           self.pos_delta, self.neg_delta)

    def forward(self, batch: Embeddings) -> Tensor:
        proxies, labels = self.proxies_and_labels(batch)
        return self.loss(batch.student, proxies, labels)


# ------------------------------------------------------------------------------------------ NIR
def build_conditional_flow(dim: int, cond_dim: int, num_blocks: int = 5, fc_depth: int = 8,
                           fc_width: int = 128, clamp: float = 2.0) -> nn.Module:
    """A FrEIA ``GraphINN``: ``num_blocks`` x (fixed random permutation, GLOW affine coupling block
    with soft clamp ``clamp``), each coupling conditioned on one (cond_dim,) vector. Coupling subnets
    are MLPs of ``fc_depth`` Linear layers of width ``fc_width`` with ReLU (the NIR repo's
    ``NormFlow``). FrEIA is imported here so that the package imports without it. FrEIA's
    ``PermuteRandom`` reseeds numpy's global RNG; its state is restored afterwards."""
    try:
        import FrEIA.framework as Ff
        import FrEIA.modules as Fm
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("objective 'nir' needs FrEIA (pip install FrEIA==0.2)") from err
    if fc_depth < 2:
        raise ValueError(f"fc_depth={fc_depth} must be >= 2 (input and output layer)")

    def subnet(dims_in: int, dims_out: int) -> nn.Module:
        layers: List[nn.Module] = [nn.Linear(dims_in, fc_width)]
        for _ in range(fc_depth - 2):
            layers += [nn.ReLU(), nn.Linear(fc_width, fc_width)]
        layers += [nn.ReLU(), nn.Linear(fc_width, dims_out)]
        return nn.Sequential(*layers)

    rng_state = np.random.get_state()
    try:
        condition = Ff.ConditionNode(cond_dim, name="condition")
        nodes = [Ff.InputNode(dim, name="input")]
        for k in range(num_blocks):
            nodes.append(Ff.Node(nodes[-1], Fm.PermuteRandom, {"seed": k}, name=f"permute_{k}"))
            nodes.append(Ff.Node(nodes[-1], Fm.GLOWCouplingBlock,
                                 {"clamp": clamp, "subnet_constructor": subnet},
                                 conditions=condition, name=f"coupling_{k}"))
        nodes += [Ff.OutputNode(nodes[-1], name="output"), condition]
        return Ff.GraphINN(nodes)
    finally:
        np.random.set_state(rng_state)


def flow_nll(flow: nn.Module, x: Tensor, condition: Tensor) -> Tensor:
    """Per-row negative log-likelihood under a standard normal latent, without the constant
    ``D/2 log(2 pi)`` (as the NIR repo): ``0.5 ||f(x | c)||^2 - log |det J_f(x | c)|``."""
    z, log_jac_det = flow(x, c=[condition])
    if isinstance(z, (tuple, list)):
        z = z[0]
    return 0.5 * z.pow(2).sum(dim=1) - log_jac_det


PROXY_BASES = {"proxyanchor": ProxyAnchor, "oproxy": OProxy}


@OBJECTIVES.register("nir")
class NonIsotropyRegularization(Objective):
    """A proxy loss plus non-isotropy regularisation (NIR, Roth et al. CVPR 2022, Sec. 3).

    A conditional normalizing flow ``f`` maps the residual ``r_i = x_i - p_{y_i}`` of each unit-norm
    embedding to the (unit-norm) proxy of its class, conditioned on that proxy, to a standard normal.
    Its negative log-likelihood::

        NLL_i = 0.5 ||f(r_i | p_{y_i})||^2 - log |det J_f(r_i | p_{y_i})|

    is minimised jointly by the flow, the proxies (through the conditioning and the residual) and
    the embeddings, which makes every sample uniquely translatable from its proxy and so discourages
    isotropic class clusters. The objective is (``form='paper'``, the default)::

        L = L_proxy + w_align * mean_i NLL_i

    ``form='repo'`` reproduces ``criteria/nir.py`` literally: ``L = mean_i exp(NLL_i) + w_align *
    L_proxy``, i.e. there ``w_align`` weights the proxy term and the flow term is exponentiated.
    ``residual=False`` feeds ``x_i`` itself to the flow, as the repo does; since subtracting the
    conditioning proxy is a shift with unit Jacobian, both define the same family of densities.

    ``L_proxy`` is an owned ``base`` objective (``'proxyanchor'`` or ``'oproxy'``; the repo's NIR uses
    the ``oproxy`` anchor formula with N(0,1)/8 proxies) whose proxies the flow is conditioned on;
    extra keyword arguments go to its constructor (``alpha``, ``margin``, ``init``, ...).

    Warm-up: while ``batch.epoch < warmup_epochs`` the embeddings and proxies are detached, so only
    the flow learns (the repo instead freezes the backbone for ``--warmup`` epochs; its runs use 1).

    Flow defaults are the repo's (``parameters.py``): 5 GLOW coupling blocks with random
    permutations, subnets of 8 Linear layers of width 128, clamp 2, every block conditioned on the
    proxy (``cond_mode='dense'``). ``w_align=0.0075`` and ``warmup_epochs=1`` are the repo's benchmark
    runs. Learning rates: the repo trains the flow at 50x and the proxies at 4000x the base rate
    (``proxy_lr_multiplier``; None keeps the base loss's own multiplier). A trainer that reads one
    ``lr_multiplier`` per objective gets ``flow_lr_multiplier`` for all parameters;
    :meth:`parameter_groups` gives the two groups separately.
    """

    def __init__(self, embedding_dim: int, num_classes: int, base: str = "proxyanchor",
                 w_align: float = 0.0075, warmup_epochs: int = 1, form: str = "paper", residual: bool = True,
                 num_blocks: int = 5, fc_depth: int = 8, fc_width: int = 128, clamp: float = 2.0,
                 flow_lr_multiplier: float = 50.0, proxy_lr_multiplier: Optional[float] = None,
                 asymmetric: bool = False, **base_kwargs: Any):
        if asymmetric:
            raise ValueError("objective 'nir' does not support asymmetric=True: its flow is conditioned on "
                             "learned proxies; use proxyanchor/oproxy with asymmetric=True instead")
        super().__init__(asymmetric=False)
        if base not in PROXY_BASES:
            raise ValueError(f"nir base {base!r} is not one of {sorted(PROXY_BASES)}")
        if form not in ("paper", "repo"):
            raise ValueError(f"nir form {form!r} is not 'paper' or 'repo'")
        if "lr_multiplier" in base_kwargs:
            raise ValueError("nir: use proxy_lr_multiplier / flow_lr_multiplier, not lr_multiplier")
        try:
            self.base = PROXY_BASES[base](embedding_dim=embedding_dim, num_classes=num_classes, **base_kwargs)
        except TypeError as err:
            raise ValueError(f"nir: bad parameter for base {base!r}: {err}") from None
        if proxy_lr_multiplier is not None:
            self.base.lr_multiplier = float(proxy_lr_multiplier)
        self.flow = build_conditional_flow(embedding_dim, embedding_dim, num_blocks, fc_depth, fc_width, clamp)
        self.w_align, self.warmup_epochs, self.form, self.residual = w_align, warmup_epochs, form, residual
        self.lr_multiplier = float(flow_lr_multiplier)

    def parameter_groups(self) -> List[Dict[str, Any]]:
        """``[{'params': [...], 'lr_multiplier': m}, ...]``: the proxies and the flow separately."""
        return [{"params": [self.base.proxies], "lr_multiplier": self.base.lr_multiplier},
                {"params": [p for p in self.flow.parameters() if p.requires_grad],
                 "lr_multiplier": self.lr_multiplier}]

    def terms(self, batch: Embeddings) -> Dict[str, Tensor]:
        """``{'proxy': L_proxy, 'nll': mean NLL, 'loss': the objective}``."""
        proxies, labels = self.base.proxies_and_labels(batch)
        embeddings = batch.student
        if batch.epoch < self.warmup_epochs:
            embeddings, proxies = embeddings.detach(), proxies.detach()
        proxy_loss = self.base.loss(embeddings, proxies, labels)
        condition = F.normalize(proxies, dim=-1)[labels]
        x = embeddings - condition if self.residual else embeddings
        dtype = self.base.proxies.dtype  # the flow runs at the parameters' precision, autocast off
        with torch.autocast(device_type=x.device.type, enabled=False):
            nll = flow_nll(self.flow, x.to(dtype), condition.to(dtype))
        if self.form == "paper":
            loss = proxy_loss + self.w_align * nll.mean()
        else:
            loss = nll.exp().mean() + self.w_align * proxy_loss
        return {"proxy": proxy_loss, "nll": nll.mean(), "loss": loss}

    def forward(self, batch: Embeddings) -> Tensor:
        return self.terms(batch)["loss"]


__all__ = ["masked_log1p_sum_exp", "cosine_to_proxies", "proxy_anchor_loss", "oproxy_loss", "init_proxies",
           "ProxyAnchor", "OProxy", "build_conditional_flow", "flow_nll", "NonIsotropyRegularization"]
