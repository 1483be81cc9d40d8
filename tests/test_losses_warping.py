"""Realigned softmax warping against a loop over the repo's formula, its gradients and its phases."""
import math

import pytest
import torch
import torch.nn.functional as F

from lib.embeddings import Embeddings
from lib.losses import build_objective
from lib.losses.warping import SoftmaxWarping, euclidean_distances, softmax_warp_loss, warped_distances


def randn(*shape, seed=0, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


LABELS = torch.tensor([0, 1, 2, 1, 3, 0])
PARAMS = dict(k1=0.9, k2=1.2, alpha=4.0, temperature=0.7, margin=1.4)


def warp_loop(x, p, y, k1, k2, alpha, temperature, margin, warp=True):
    """Per row: distances, the own column replaced by the outward (k1) or inward (k2) warp value."""
    total = 0.0
    for i in range(len(x)):
        d = [math.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(x[i], p[c]))) for c in range(len(p))]
        if warp:
            own = d[y[i]]
            d[y[i]] = (k1 + margin * (1 - k1)) * own if own < alpha else k2 * own + alpha * (1 - k2)
        logits = [-temperature * v for v in d]
        total += -(logits[y[i]] - math.log(sum(math.exp(v) for v in logits)))
    return total / len(x)


def data():
    x, p = randn(6, 3, seed=1, scale=2.0), randn(4, 3, seed=2, scale=2.0)
    own = euclidean_distances(x, p).gather(1, LABELS[:, None]).squeeze(1)
    assert (own < PARAMS["alpha"]).any() and (own >= PARAMS["alpha"]).any()  # both branches occur
    return x, p


@pytest.mark.parametrize("warp", [True, False])
def test_warp_loss_by_hand(warp):
    x, p = data()
    expected = warp_loop(x, p, LABELS.tolist(), **PARAMS, warp=warp)
    assert float(softmax_warp_loss(x, p, LABELS, **PARAMS, warp=warp)) == pytest.approx(expected, rel=1e-10)


def test_unwarped_loss_is_the_repos_kernel_form():
    x, p = data()
    d = euclidean_distances(x, p)
    own = d.gather(1, LABELS[:, None])
    repo = torch.log(torch.exp(PARAMS["temperature"] * (own - d)).sum(1)).mean()
    assert float(softmax_warp_loss(x, p, LABELS, **PARAMS, warp=False)) == pytest.approx(float(repo), rel=1e-12)


def test_warp_gradient_scales_the_own_distance_by_k1_or_k2():
    """dL/dd_own = T k (1 - q_own) with k = k1 (outward, margin only in the value) or k2 (inward);
    dL/dd_c = -T q_c otherwise; q = softmax(-T W) over the warped values."""
    x, p = data()
    d = euclidean_distances(x, p).detach().requires_grad_()
    w = warped_distances(d, LABELS, PARAMS["k1"], PARAMS["k2"], PARAMS["alpha"], PARAMS["margin"])
    F.cross_entropy(-PARAMS["temperature"] * w, LABELS, reduction="sum").backward()
    q = F.softmax(-PARAMS["temperature"] * w.detach(), dim=1)
    own = d.detach().gather(1, LABELS[:, None]).squeeze(1)
    k = torch.where(own < PARAMS["alpha"], PARAMS["k1"], PARAMS["k2"]).to(d.dtype)
    expected = -PARAMS["temperature"] * q
    rows = torch.arange(len(LABELS))
    expected[rows, LABELS] = PARAMS["temperature"] * k * (1 - q[rows, LABELS])
    assert torch.allclose(d.grad, expected, atol=1e-12)


def test_gradients_reach_raw_embeddings_and_proxies():
    objective = SoftmaxWarping(embedding_dim=3, num_classes=4).double()
    raw = randn(6, 3, seed=3, scale=10.0).requires_grad_()
    objective(Embeddings(student=F.normalize(raw, dim=1), labels=LABELS, student_raw=raw)).backward()
    assert raw.grad.abs().sum() > 0 and objective.proxies.grad.abs().sum() > 0
    assert objective.lr_multiplier == 100.0
    assert float(objective.proxies.detach().std()) < 2.0  # kaiming fan_out: std sqrt(2 / C)


def test_followup_phase_switches_parameters_at_its_epoch():
    _, objective = build_objective("warp:1:followup_epoch=3,followup_k1=0.5,followup_alpha=6.0,margin=1.1",
                                   embedding_dim=3, num_classes=4)
    objective = objective.double()
    regular = dict(k1=0.93, k2=1.15, alpha=28.40, temperature=4.525, margin=1.1)
    followup = dict(k1=0.5, k2=1.20, alpha=6.0, temperature=1.0, margin=1.1)
    assert objective.phase_parameters(2) == regular and objective.phase_parameters(3) == followup
    x = randn(6, 3, seed=4, scale=3.0)
    proxies = objective.proxies.detach()
    values = {}
    for epoch in (0, 2, 3, 9):
        batch = Embeddings(student=F.normalize(x, dim=1), labels=LABELS, student_raw=x, epoch=epoch)
        values[epoch] = float(objective(batch))
        params = followup if epoch >= 3 else regular
        assert values[epoch] == pytest.approx(warp_loop(x, proxies, LABELS.tolist(), **params), rel=1e-10)
    assert values[0] == values[2] and values[3] == values[9] and values[2] != pytest.approx(values[3])
    never = SoftmaxWarping(3, 4)
    assert never.phase_parameters(10 ** 6)["k1"] == 0.93


def test_bad_input_is_rejected():
    objective = SoftmaxWarping(embedding_dim=3, num_classes=4)
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="student_raw"):
        objective(Embeddings(student=x, labels=torch.tensor([0, 1])))
    with pytest.raises(ValueError, match="num_classes"):
        objective(Embeddings(student=x, labels=torch.tensor([0, 4]), student_raw=x))
    with pytest.raises(ValueError, match="asymmetric"):
        SoftmaxWarping(3, 4, asymmetric=True)
    with pytest.raises(ValueError, match="followup_epoch"):
        SoftmaxWarping(3, 4, followup_epoch=-1)
