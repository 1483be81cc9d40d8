"""Realigned Softmax Warping: a proxy softmax over Euclidean distances with warped forces.

Reference: github mdemoor226/Realigned-Softmax-Warping, ``Image-Retrieval/Model.py`` (``WarpLoss``),
``Image-Retrieval/train.py`` and ``Image-Retrieval/config.json`` (read only; no licence).

Let ``f_i`` be the *un-normalised* student embedding (``Embeddings.student_raw``), ``p_c`` the C
learned proxies, ``d_ic = ||f_i - p_c||_2`` and ``h_i = d_{i y_i}`` the distance to the own proxy.
Without warping the loss is the softmax cross-entropy over negative scaled distances::

    L = 1/N sum_i -log softmax_c(-T d_ic)[y_i]                                            (T = temperature)

Warping replaces the own-proxy distance ``d_{i y_i}`` (other columns are left alone) by one of two
warped distances, chosen per row by ``m_i = [h_i < alpha]`` (no gradient through the choice):

* outward warp (``m_i = 1``, the sample is already within ``alpha`` of its proxy)::

      w_i = k1 d + margin * sg[(1 - k1) d]          value (k1 + margin (1 - k1)) d, gradient k1

  the pull towards the proxy is scaled by ``k1`` while the value is scaled by ``k1 + margin (1 - k1)``
  (``sg`` = stop-gradient), so with ``margin > 1`` the softmax sees a larger positive distance;
* inward warp (``m_i = 0``, the sample is farther than ``alpha``)::

      w_i = k2 d + alpha (1 - k2) = alpha + k2 (d - alpha)     value and gradient scaled by k2 around alpha

and the loss is ``L = 1/N sum_i -log softmax_c(-T W_ic)[y_i]`` with ``W_ic = d_ic`` for ``c != y_i``
and ``W_{i y_i} = w_i``.

Follow-up phase: the repo trains a regular phase and then switches ``k1, k2, alpha, temperature``
(``margin`` is kept) and the learning rates to a second set for the last ``followup.epochs``
epochs. Here that is ``followup_epoch`` (0-based: from ``batch.epoch >= followup_epoch`` on) and the
``followup_*`` parameters. The learning-rate switch of the follow-up phase is not the objective's
business; the repo's ratios are 100 (proxy/model, CUB and Cars) and 0.5 in the follow-up phase.

Defaults are the repo's CUB configuration: T=4.525, alpha=28.40, k1=0.93, k2=1.15, margin=1.30, and
follow-up T=1.0, alpha=24.68, k1=0.95, k2=1.20 for the last 30 of 50 epochs (``followup_epoch=20``
with 50 epochs; off by default since it depends on the schedule). Proxies are kaiming-normal
(fan_out); the repo trains them at 100x the model's learning rate (1.0 vs 0.01, Adam with eps=1.0).
``alpha`` is a distance, so it depends on the scale of the un-normalised embeddings.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lib.embeddings import Embeddings
from lib.losses import functional
from lib.losses.base import OBJECTIVES, ProxyObjective


def euclidean_distances(x: Tensor, y: Tensor, eps: float = 1e-12) -> Tensor:
    """(M, N) Euclidean distances; squared distances floored at ``eps`` before the square root
    (as the repo), so the gradient stays finite at zero distance (``lib.losses.functional``)."""
    return functional.euclidean_distances(x, y, floor=eps)


def warped_distances(distances: Tensor, labels: Tensor, k1: float, k2: float, alpha: float,
                     margin: float) -> Tensor:
    """``W``: ``distances`` with the own-proxy column of each row warped (module docstring)."""
    own = distances.gather(1, labels[:, None].long())
    outward = k1 * own + margin * ((1 - k1) * own).detach()
    inward = k2 * own + alpha * (1 - k2)
    warped = torch.where((own < alpha).detach(), outward, inward)
    return distances.scatter(1, labels[:, None].long(), warped)


def softmax_warp_loss(embeddings: Tensor, proxies: Tensor, labels: Tensor, k1: float = 0.93, k2: float = 1.15,
                      alpha: float = 28.40, temperature: float = 4.525, margin: float = 1.30,
                      warp: bool = True) -> Tensor:
    """Mean over rows of ``-log softmax(-temperature * W)[y]``; ``warp=False`` uses the plain
    distances (the repo's ``--warp False`` baseline)."""
    distances = euclidean_distances(embeddings, proxies)
    if warp:
        distances = warped_distances(distances, labels, k1, k2, alpha, margin)
    return F.cross_entropy(-temperature * distances, labels.long())


@OBJECTIVES.register("warp")
class SoftmaxWarping(ProxyObjective):
    """Realigned softmax warping over the un-normalised student embeddings (module docstring).
    ``asymmetric=True`` is rejected: the proxies are the reference side here and the loss acts on
    the student's raw geometry (norms included), which the teacher's unit-norm embeddings lack."""

    lr_multiplier = 100.0

    def __init__(self, embedding_dim: int, num_classes: int, k1: float = 0.93, k2: float = 1.15,
                 alpha: float = 28.40, temperature: float = 4.525, margin: float = 1.30, warp: bool = True,
                 followup_epoch: Optional[int] = None, followup_k1: float = 0.95, followup_k2: float = 1.20,
                 followup_alpha: float = 24.68, followup_temperature: float = 1.0,
                 followup_margin: Optional[float] = None, lr_multiplier: float = 100.0,
                 asymmetric: bool = False):
        if asymmetric:
            raise ValueError("objective 'warp' does not support asymmetric=True: it trains the student's "
                             "un-normalised embeddings against learned proxies")
        super().__init__(embedding_dim, num_classes, lr_multiplier)
        if followup_epoch is not None and followup_epoch < 0:
            raise ValueError(f"warp followup_epoch={followup_epoch} must be >= 0 or None")
        self.warp = warp
        self.followup_epoch = followup_epoch
        self.regular = dict(k1=k1, k2=k2, alpha=alpha, temperature=temperature, margin=margin)
        self.followup = dict(k1=followup_k1, k2=followup_k2, alpha=followup_alpha,
                             temperature=followup_temperature,
                             margin=margin if followup_margin is None else followup_margin)
        proxies = torch.empty(num_classes, embedding_dim)
        nn.init.kaiming_normal_(proxies, mode="fan_out")
        self.proxies = nn.Parameter(proxies)

    def phase_parameters(self, epoch: int) -> Dict[str, float]:
        """``k1, k2, alpha, temperature, margin`` in force at (0-based) ``epoch``."""
        if self.followup_epoch is not None and epoch >= self.followup_epoch:
            return dict(self.followup)
        return dict(self.regular)

    def forward(self, batch: Embeddings) -> Tensor:
        if batch.student_raw is None:
            raise ValueError("objective 'warp' needs the un-normalised student embeddings "
                             "(Embeddings.student_raw), which this mode did not provide")
        labels = self.class_labels(batch.labels)
        raw = batch.student_raw
        # Euclidean distances by expansion cancel badly in float16: compute them at the proxies'
        # precision with autocast off
        with torch.autocast(device_type=raw.device.type, enabled=False):
            return softmax_warp_loss(raw.to(self.proxies.dtype), self.proxies, labels, warp=self.warp,
                                     **self.phase_parameters(batch.epoch))


__all__ = ["euclidean_distances", "warped_distances", "softmax_warp_loss", "SoftmaxWarping"]
