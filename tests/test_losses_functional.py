"""The shared loss maths (lib.losses.functional) against plain loops, and its one home."""
import math

import pytest
import torch

from lib.losses import OBJECTIVES, build_objective
from lib.losses.base import ProxyObjective
from lib.losses.functional import (EPS, check_labels, euclidean_distances, masked_log1p_sum_exp, masked_logsumexp,
                                   row_distances)


def test_distances_against_a_loop():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    y[0] = x[0]  # a zero distance
    for eps, floor in ((0.0, 0.0), (EPS, 0.0), (0.0, 1e-12)):
        got = euclidean_distances(x, y, eps=eps, floor=floor)
        for i in range(5):
            for j in range(4):
                squared = sum((float(x[i, k]) - float(y[j, k])) ** 2 for k in range(3))
                assert float(got[i, j]) == pytest.approx(math.sqrt(max(squared, floor) + eps), abs=1e-7)
    assert float(euclidean_distances(x, y, eps=EPS)[0, 0]) == pytest.approx(1e-4, rel=1e-3)  # sqrt(1e-8)
    rows = row_distances(x[:4], y)
    assert torch.allclose(rows, torch.stack([((x[k] - y[k]).pow(2).sum() + EPS).sqrt() for k in range(4)]))


@pytest.mark.parametrize("dim", [0, 1])
def test_masked_log_sum_exp_against_a_loop(dim):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 5, generator=g, dtype=torch.float64) * 30
    mask = torch.rand(4, 5, generator=g) < 0.5
    mask[1, :] = False
    mask[:, 2] = False
    one_plus = masked_log1p_sum_exp(z, mask, dim=dim)
    plain = masked_logsumexp(z, mask, dim=dim)
    for r in range(z.shape[1 - dim]):
        values = [float(z[r, j] if dim == 1 else z[j, r]) for j in range(z.shape[dim])
                  if (mask[r, j] if dim == 1 else mask[j, r])]
        top = max(values + [0.0])
        assert float(one_plus[r]) == pytest.approx(top + math.log(math.exp(-top) + sum(math.exp(v - top) for v in values)))
        if values:
            assert float(plain[r]) == pytest.approx(max(values) + math.log(sum(math.exp(v - max(values)) for v in values)))
        else:
            assert float(one_plus[r]) == 0 and plain[r] == float("-inf")


def test_label_range_is_checked_in_one_place():
    check_labels(torch.tensor([0, 2]), 3, "x")
    with pytest.raises(ValueError, match=r"x: labels must lie in 0\.\.2 \(num_classes=3\), got 0\.\.3"):
        check_labels(torch.tensor([0, 3]), 3, "x")
    # every objective with per-class parameters shares the one base (and with it the check)
    proxy_names = ["proxynca", "softmax", "arcface", "softtriple", "proxyanchor", "oproxy", "warp"]
    for name in proxy_names:
        _, obj = build_objective(name, embedding_dim=8, num_classes=3)
        assert isinstance(obj, ProxyObjective), name
        with pytest.raises(ValueError, match="num_classes=3"):
            obj.class_labels(torch.tensor([0, 5]))
    assert {n for n, c in OBJECTIVES.items() if isinstance(c, type) and issubclass(c, ProxyObjective)} >= set(proxy_names)
