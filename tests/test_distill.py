"""The paper's loss terms against hand-written loops, and the objective composition."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from lib.embeddings import Embeddings
from lib.losses import OBJECTIVES, build_objective, parse_objective_spec
from lib.losses.distill import absolute_loss, mined_triplet_loss, relative_loss


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def dot(a, b):
    return sum(float(x) * float(y) for x, y in zip(a, b))


def test_absolute_by_hand():
    s, t = unit(6, 5, seed=1), unit(6, 5, seed=2)
    expected = sum((1 - dot(s[i], t[i])) ** 2 for i in range(6)) / 6
    assert float(absolute_loss(s, t)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("which", ["st", "ss"])
def test_relative_terms_by_hand(which):
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    s, t = unit(7, 4, seed=3), unit(7, 4, seed=4)
    pairs = [(i, j) for i, j in itertools.product(range(7), repeat=2) if i != j and groups[i] == groups[j]]
    ref = t if which == "st" else s
    expected = sum((dot(s[i], ref[j]) - dot(t[i], t[j])) ** 2 for i, j in pairs) / len(pairs)
    assert float(relative_loss(s, ref, t, groups)) == pytest.approx(expected, rel=1e-12)


def test_reference_bmm_form_matches_for_equal_groups():
    """The reference's per-image form: (B, P, D) batches, off-diagonal MSE averaged per image."""
    b, p = 3, 4
    s, t = unit(b * p, 8, seed=5), unit(b * p, 8, seed=6)
    S, T = s.view(b, p, -1), t.view(b, p, -1)
    off = ~torch.eye(p, dtype=torch.bool)
    ref = ((S @ T.transpose(1, 2) - T @ T.transpose(1, 2)) ** 2)[:, off].mean()
    groups = torch.arange(b).repeat_interleave(p)
    assert float(relative_loss(s, t, t, groups)) == pytest.approx(float(ref), rel=1e-12)


def test_perfect_student_has_zero_loss_and_gradients_skip_teacher():
    t = unit(8, 6, seed=7)
    s = t.clone().requires_grad_(True)
    batch = Embeddings(student=s, labels=torch.zeros(8), teacher=t, groups=torch.arange(2).repeat_interleave(4))
    for name in ("absolute", "relative_st", "relative_ss", "regression"):
        assert float(OBJECTIVES.build(name)(batch)) == pytest.approx(0, abs=1e-12)
    noisy = Embeddings(student=unit(8, 6, seed=8).requires_grad_(True), labels=torch.zeros(8),
                       teacher=t.clone().requires_grad_(True), groups=batch.groups)
    OBJECTIVES.build("relative_ss")(noisy).backward()
    assert noisy.student.grad.abs().sum() > 0 and noisy.teacher.grad is None


def test_distillation_objectives_need_a_teacher():
    with pytest.raises(ValueError, match="needs teacher embeddings"):
        OBJECTIVES.build("absolute")(Embeddings(student=unit(2, 3), labels=torch.zeros(2)))


def triplet_oracle(a, labels, negs, margin):
    total, count = 0.0, 0
    n = len(a)
    for i in range(n):
        positives = [j for j in range(n) if j != i and labels[j] == labels[i]]
        if not positives:
            continue
        hardest = min(positives, key=lambda j: dot(a[i], a[j]))
        d_pos = sum((float(x) - float(y)) ** 2 for x, y in zip(a[i], a[hardest]))
        pool = [negs[i][k] for k in range(negs.shape[1])] if negs is not None else [a[j] for j in range(n) if labels[j] != labels[i]]
        for neg in pool:
            d_neg = sum((float(x) - float(y)) ** 2 for x, y in zip(a[i], neg))
            total += max(0.0, d_pos - d_neg + margin)
            count += 1
    return total / count


@pytest.mark.parametrize("with_negatives", [True, False])
def test_mined_triplet_by_hand(with_negatives):
    a = unit(8, 5, seed=9)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])  # class 3 has no positive: skipped
    negs = unit(8, 3, 5, seed=10) if with_negatives else None
    expected = triplet_oracle(a, labels, negs, 0.7)
    assert float(mined_triplet_loss(a, labels, negs, 0.7)) == pytest.approx(expected, rel=1e-10)


def test_objective_specs():
    spec = parse_objective_spec("multisimilarity:0.5:alpha=2,beta=50,miner=semihard")
    assert (spec.name, spec.weight, spec.params) == ("multisimilarity", 0.5, {"alpha": 2, "beta": 50, "miner": "semihard"})
    assert parse_objective_spec("sec").weight == 1.0
    assert parse_objective_spec({"name": "sec", "weight": 2, "ema": True}).params == {"ema": True}
    with pytest.raises(ValueError, match="not a number"):
        parse_objective_spec("sec:heavy")
    with pytest.raises(ValueError, match="key=value"):
        parse_objective_spec("sec:1:oops")
    with pytest.raises(KeyError, match="choose one of"):
        build_objective("no-such-loss", embedding_dim=4, num_classes=2)
    with pytest.raises(ValueError, match="has no parameter"):
        build_objective("mined_triplet:1:margn=0.1", embedding_dim=4, num_classes=2)
    _, obj = build_objective("mined_triplet:1:margin=0.3", embedding_dim=4, num_classes=2)
    assert obj.margin == 0.3
