"""SEC, L2-reg and the normalized N-pair (tuplet) loss against loops and the repo's definitions."""
import math

import pytest
import torch
import torch.nn.functional as F

from lib.embeddings import Embeddings
from lib.losses import OBJECTIVES, build_objective
from lib.losses.spherical import (L2NormRegularizer, SphericalEmbeddingConstraint, TupletLoss, first_pairs,
                                  spherical_embedding_constraint, tuplet_loss)


def randn(*shape, seed=0, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def batch_of(raw, labels=None, **kw):
    labels = torch.zeros(len(raw), dtype=torch.long) if labels is None else labels
    return Embeddings(student=F.normalize(raw, dim=-1), labels=labels, student_raw=raw, **kw)


def norms_of(raw):
    return [math.sqrt(sum(float(v) ** 2 for v in row)) for row in raw]


def test_sec_by_hand():
    raw = randn(7, 5, seed=1, scale=3.0)
    norms = norms_of(raw)
    mu = sum(norms) / len(norms)
    expected = sum((n - mu) ** 2 for n in norms) / len(norms)
    assert float(SphericalEmbeddingConstraint()(batch_of(raw))) == pytest.approx(expected, rel=1e-12)


def test_sec_detached_mean_has_the_full_gradient():
    raw = randn(6, 4, seed=2).requires_grad_()
    spherical_embedding_constraint(raw).backward()
    detached = raw.grad.clone()
    raw.grad = None
    norms = raw.norm(dim=1)
    ((norms - norms.mean()) ** 2).mean().backward()
    assert torch.allclose(detached, raw.grad) and detached.abs().sum() > 0


def test_sec_ema_buffer_updates_and_round_trips():
    objective = SphericalEmbeddingConstraint(ema=True, momentum=0.25).double()
    raws = [randn(5, 4, seed=s, scale=s + 1.0) for s in (3, 4, 5)]
    means = [sum(norms_of(r)) / 5 for r in raws]
    objective(batch_of(raws[0]))
    assert float(objective.mean_norm) == pytest.approx(means[0], rel=1e-12)
    loss = objective(batch_of(raws[1]))
    mu = 0.75 * means[0] + 0.25 * means[1]
    assert float(objective.mean_norm) == pytest.approx(mu, rel=1e-12)
    assert float(loss) == pytest.approx(sum((n - mu) ** 2 for n in norms_of(raws[1])) / 5, rel=1e-12)

    state = objective.state_dict()
    assert set(state) == {"mean_norm", "initialized"}
    restored = SphericalEmbeddingConstraint(ema=True, momentum=0.25).double()
    restored.load_state_dict(state)
    assert float(restored(batch_of(raws[2]))) == pytest.approx(float(objective(batch_of(raws[2]))), rel=1e-12)

    restored.eval()  # evaluation does not move the average
    before = float(restored.mean_norm)
    restored(batch_of(raws[0]))
    assert float(restored.mean_norm) == before


def test_sec_ema_gradient_reaches_embeddings():
    raw = randn(5, 4, seed=6).requires_grad_()
    SphericalEmbeddingConstraint(ema=True).double()(batch_of(raw)).backward()
    assert raw.grad.abs().sum() > 0


def test_l2reg_by_hand():
    raw = randn(6, 3, seed=7, scale=2.0).requires_grad_()
    expected = sum(n ** 2 for n in norms_of(raw)) / 6
    loss = L2NormRegularizer()(batch_of(raw))
    assert float(loss) == pytest.approx(expected, rel=1e-12)
    loss.backward()
    assert torch.allclose(raw.grad, 2 * raw.detach() / 6)


@pytest.mark.parametrize("name", ["sec", "l2reg"])
def test_norm_regularizers_need_raw_embeddings(name):
    objective = OBJECTIVES.build(name)
    with pytest.raises(ValueError, match="student_raw"):
        objective(Embeddings(student=randn(3, 2), labels=torch.zeros(3, dtype=torch.long)))
    with pytest.raises(ValueError, match="asymmetric"):
        OBJECTIVES.build(name, asymmetric=True)


def test_first_pairs_takes_the_first_two_rows_of_each_class():
    labels = torch.tensor([5, 2, 5, 7, 2, 5, 9, 2])
    anchors, positives = first_pairs(labels)
    assert anchors.tolist() == [1, 0] and positives.tolist() == [4, 2]  # classes 2, 5; 7 and 9 are singletons


def tuplet_loop(anchors, positives, scale):
    def c(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    n = len(anchors)
    terms = [math.log(1 + sum(math.exp(scale * (c(anchors[i], positives[j]) - c(anchors[i], positives[i])))
                              for j in range(n) if j != i)) for i in range(n)]
    return sum(terms) / n


def test_tuplet_by_hand_and_repo_scaling():
    labels = torch.tensor([0, 1, 0, 2, 1, 2, 3, 0])
    raw = randn(8, 5, seed=8).requires_grad_()
    loss = TupletLoss()(batch_of(raw, labels))
    expected = tuplet_loop(raw[[0, 1, 3]].detach(), raw[[2, 4, 5]].detach(), 25.0)
    assert float(loss) == pytest.approx(expected, rel=1e-10)
    # the repo: both rows normalised and multiplied by 5, cross-entropy against the identity
    a, p = 5 * F.normalize(raw[[0, 1, 3]], dim=1), 5 * F.normalize(raw[[2, 4, 5]], dim=1)
    repo = torch.mean(torch.sum(-torch.eye(3, dtype=a.dtype) * F.log_softmax(a @ p.T, -1), -1))
    assert float(loss) == pytest.approx(float(repo), rel=1e-10)
    loss.backward()
    assert raw.grad[[0, 1, 2, 3, 4, 5]].abs().sum(1).min() > 0 and raw.grad[[6, 7]].abs().sum() == 0


def test_tuplet_asymmetric_takes_positives_from_the_teacher():
    labels = torch.tensor([0, 0, 1, 1])
    s, t = F.normalize(randn(4, 3, seed=9), dim=1), F.normalize(randn(4, 3, seed=10), dim=1)
    _, objective = build_objective("tuplet:1:asymmetric=True,scale=10", embedding_dim=3, num_classes=2)
    got = objective(Embeddings(student=s, labels=labels, teacher=t))
    assert float(got) == pytest.approx(tuplet_loop(s[[0, 2]], t[[1, 3]], 10.0), rel=1e-10)
    assert float(got) == pytest.approx(float(tuplet_loss(s[[0, 2]], t[[1, 3]], 10.0)), rel=1e-12)
    with pytest.raises(ValueError, match="teacher"):
        objective(Embeddings(student=s, labels=labels))


def test_tuplet_needs_a_pair():
    with pytest.raises(ValueError, match="two rows"):
        TupletLoss()(batch_of(randn(3, 2), torch.tensor([0, 1, 2])))
    assert OBJECTIVES.get_class("normalized_npair") is TupletLoss
