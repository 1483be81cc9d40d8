"""ProxyAnchor, oproxy and NIR against plain loops, pytorch-metric-learning and the flow's Jacobian."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lib.embeddings import Embeddings
from lib.losses import build_objective
from lib.losses.proxy import (NonIsotropyRegularization, OProxy, ProxyAnchor, build_conditional_flow, flow_nll,
                              masked_log1p_sum_exp, oproxy_loss, proxy_anchor_loss)


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def unit(*shape, seed=0, dtype=torch.float64):
    return F.normalize(randn(*shape, seed=seed, dtype=dtype), dim=-1)


LABELS = torch.tensor([0, 0, 1, 1, 1, 3, 4, 4])  # class 2 absent, class 3 a singleton
C = 6  # class 5 absent too


def cos(a, b):
    return float((a @ b) / (a.norm() * b.norm()))


def log1p_sum_exp(values):
    return math.log(1 + sum(math.exp(v) for v in values))


def test_masked_log1p_sum_exp_by_hand():
    x = randn(4, 5, seed=1)
    mask = randn(4, 5, seed=2) > 0
    mask[:, 0] = False
    got = masked_log1p_sum_exp(x, mask, dim=0)
    for j in range(5):
        assert float(got[j]) == pytest.approx(log1p_sum_exp([float(x[i, j]) for i in range(4) if mask[i, j]]))


def proxy_anchor_loop(x, p, y, alpha, margin):
    n, c = len(x), len(p)
    pos_terms = []
    neg_total = 0.0
    for k in range(c):
        positives = [i for i in range(n) if y[i] == k]
        negatives = [i for i in range(n) if y[i] != k]
        if positives:
            pos_terms.append(log1p_sum_exp([-alpha * (cos(x[i], p[k]) - margin) for i in positives]))
        neg_total += log1p_sum_exp([alpha * (cos(x[i], p[k]) + margin) for i in negatives])
    return sum(pos_terms) / len(pos_terms) + neg_total / c


@pytest.mark.parametrize("alpha,margin", [(32.0, 0.1), (8.0, 0.3)])
def test_proxy_anchor_by_hand(alpha, margin):
    x, p = randn(8, 5, seed=3), randn(C, 5, seed=4)
    expected = proxy_anchor_loop(x, p, LABELS.tolist(), alpha, margin)
    assert float(proxy_anchor_loss(x, p, LABELS, alpha, margin)) == pytest.approx(expected, rel=1e-10)


def test_proxy_anchor_matches_pytorch_metric_learning():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    x, p = randn(8, 5, seed=5, dtype=torch.float32), randn(C, 5, seed=6, dtype=torch.float32)
    reference = pml.ProxyAnchorLoss(num_classes=C, embedding_size=5, margin=0.1, alpha=32)
    reference.proxies.data.copy_(p)
    ours = ProxyAnchor(embedding_dim=5, num_classes=C)
    ours.proxies.data.copy_(p)
    expected = float(reference(x, LABELS).detach())
    got = ours(Embeddings(student=F.normalize(x, dim=-1), labels=LABELS)).detach()
    assert float(got) == pytest.approx(expected, rel=1e-5)


def oproxy_repo_loop(x, p, y, mode, pa, na, pd, nd):
    """The NIR repo's masks written out: anchor reduces over rows (dim 0), nca over columns (dim 1);
    the positive matrix has one column per batch row (the proxy of that row's class)."""
    n, c = len(x), len(p)
    pos_sim = [[cos(x[i], p[y[j]]) for j in range(n)] for i in range(n)]
    sim = [[cos(x[i], p[k]) for k in range(c)] for i in range(n)]
    if mode == "anchor":
        pos = [log1p_sum_exp([-pa * (pos_sim[i][j] - pd) for i in range(n) if y[i] == y[j]]) for j in range(n)]
        neg = [log1p_sum_exp([na * (sim[i][k] - nd) for i in range(n) if y[i] != k]) for k in range(c)]
    else:
        pos = [log1p_sum_exp([-pa * (pos_sim[i][j] - pd) for j in range(n) if y[i] == y[j]]) for i in range(n)]
        neg = [log1p_sum_exp([na * (sim[i][k] - nd) for k in range(c) if y[i] != k]) for i in range(n)]
    return sum(pos) / len(pos) + sum(neg) / len(neg)


@pytest.mark.parametrize("mode", ["anchor", "nca"])
def test_oproxy_matches_the_repo_formula(mode):
    x, p = randn(8, 5, seed=7), randn(C, 5, seed=8)
    args = (mode, 16.0, 12.0, 0.1, -0.2)
    expected = oproxy_repo_loop(x, p, LABELS.tolist(), *args)
    assert float(oproxy_loss(x, p, LABELS, *args)) == pytest.approx(expected, rel=1e-10)


def test_oproxy_anchor_equals_proxyanchor_for_one_row_per_class():
    x, p = randn(5, 4, seed=9), randn(5, 4, seed=10)
    labels = torch.tensor([3, 0, 4, 1, 2])
    assert float(oproxy_loss(x, p, labels)) == pytest.approx(float(proxy_anchor_loss(x, p, labels)), rel=1e-10)


@pytest.mark.parametrize("cls", [ProxyAnchor, OProxy])
def test_gradients_reach_embeddings_and_proxies(cls):
    objective = cls(embedding_dim=5, num_classes=C)
    x = unit(8, 5, seed=11, dtype=torch.float32).requires_grad_()
    objective(Embeddings(student=x, labels=LABELS)).backward()
    assert x.grad.abs().sum() > 0 and objective.proxies.grad.abs().sum() > 0
    assert objective.lr_multiplier == (100.0 if cls is ProxyAnchor else 2000.0)


def test_proxy_init_scale():
    torch.manual_seed(0)
    assert float(ProxyAnchor(64, 400).proxies.detach().std()) == pytest.approx(math.sqrt(2 / 400), rel=0.05)
    assert float(OProxy(64, 400).proxies.detach().std()) == pytest.approx(1 / 8, rel=0.05)


def test_labels_out_of_range_are_rejected():
    with pytest.raises(ValueError, match="num_classes"):
        ProxyAnchor(5, 3)(Embeddings(student=unit(2, 5, dtype=torch.float32), labels=torch.tensor([0, 3])))


def test_asymmetric_proxies_are_teacher_class_centres():
    objective = ProxyAnchor(embedding_dim=5, num_classes=C, asymmetric=True, teacher_momentum=0.5).double()
    assert list(objective.parameters()) == []
    x, t = unit(8, 5, seed=12).requires_grad_(), unit(8, 5, seed=13)
    loss = objective(Embeddings(student=x, labels=LABELS, teacher=t))
    seen = sorted(set(LABELS.tolist()))
    centres = torch.stack([F.normalize(t[LABELS == k].mean(0), dim=0) for k in seen])
    assert torch.allclose(objective.proxies[seen], centres)
    assert objective.proxy_seen.tolist() == [k in seen for k in range(C)]
    remapped = torch.tensor([seen.index(k) for k in LABELS.tolist()])
    assert float(loss.detach()) == pytest.approx(float(proxy_anchor_loss(x, centres, remapped).detach()), rel=1e-10)
    loss.backward()
    assert x.grad.abs().sum() > 0
    # second batch: exponential moving average of the centres
    t2 = unit(8, 5, seed=14)
    objective(Embeddings(student=x.detach(), labels=LABELS, teacher=t2))
    expected = F.normalize(0.5 * centres[0] + 0.5 * t2[LABELS == 0].mean(0), dim=0)
    assert torch.allclose(objective.proxies[0], expected)
    assert "proxies" in objective.state_dict() and "proxy_seen" in objective.state_dict()
    with pytest.raises(ValueError, match="teacher"):
        objective(Embeddings(student=x, labels=LABELS))


# ------------------------------------------------------------------------------------------- NIR
def small_nir(**kw):
    torch.manual_seed(0)
    kw = {"num_blocks": 2, "fc_depth": 3, "fc_width": 16, **kw}
    return NonIsotropyRegularization(embedding_dim=4, num_classes=C, **kw)


def test_flow_log_det_is_the_log_det_of_its_jacobian():
    torch.manual_seed(0)
    flow = build_conditional_flow(4, 4, num_blocks=3, fc_depth=3, fc_width=16).double()
    x, c = randn(3, 4, seed=15), unit(3, 4, seed=16)
    z, log_det = flow(x, c=[c])
    for i in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: flow(v[None], c=[c[i:i + 1]])[0][0], x[i])
        assert float(log_det[i]) == pytest.approx(float(torch.linalg.slogdet(jac)[1]), abs=1e-8)
    nll = flow_nll(flow, x, c)
    assert torch.allclose(nll, 0.5 * z.pow(2).sum(1) - log_det)


@pytest.mark.parametrize("form,residual", [("paper", True), ("repo", False)])
def test_nir_value_is_proxy_loss_plus_weighted_nll(form, residual):
    objective = small_nir(form=form, residual=residual, w_align=0.3, warmup_epochs=0).double()
    x = unit(8, 4, seed=17)
    p = objective.base.proxies
    condition = F.normalize(p, dim=-1)[LABELS]
    nll = flow_nll(objective.flow, x - condition if residual else x, condition)
    proxy = proxy_anchor_loss(x, p, LABELS)
    expected = proxy + 0.3 * nll.mean() if form == "paper" else nll.exp().mean() + 0.3 * proxy
    got = objective(Embeddings(student=x, labels=LABELS))
    assert float(got) == pytest.approx(float(expected), rel=1e-10)


def test_nir_warmup_trains_only_the_flow():
    objective = small_nir(warmup_epochs=1)
    flow_params = [p for p in objective.flow.parameters() if p.requires_grad]
    for epoch, warm in [(0, True), (1, False)]:
        objective.zero_grad(set_to_none=True)
        x = unit(8, 4, seed=18, dtype=torch.float32).requires_grad_()
        objective(Embeddings(student=x, labels=LABELS, epoch=epoch)).backward()
        assert all(p.grad is not None for p in flow_params)
        assert sum(float(p.grad.abs().sum()) for p in flow_params) > 0
        if warm:
            assert x.grad is None and objective.base.proxies.grad is None
        else:
            assert x.grad.abs().sum() > 0 and objective.base.proxies.grad.abs().sum() > 0


def test_nir_spec_state_dict_and_param_groups():
    _, objective = build_objective("nir:1.0:w_align=0.0075,base='oproxy',num_blocks=2,fc_width=8,neg_alpha=16",
                                   embedding_dim=4, num_classes=C)
    assert isinstance(objective.base, OProxy) and objective.base.neg_alpha == 16 and objective.w_align == 0.0075
    groups = objective.parameter_groups()
    assert groups[0]["params"][0] is objective.base.proxies and groups[0]["lr_multiplier"] == 2000.0
    assert groups[1]["lr_multiplier"] == objective.lr_multiplier == 50.0
    n_params = sum(p.numel() for p in objective.parameters() if p.requires_grad)
    assert n_params == sum(p.numel() for g in groups for p in g["params"])
    clone = NonIsotropyRegularization(4, C, base="oproxy", num_blocks=2, fc_width=8, neg_alpha=16)
    clone.load_state_dict(objective.state_dict())
    batch = Embeddings(student=unit(8, 4, seed=19, dtype=torch.float32), labels=LABELS, epoch=3)
    assert float(clone(batch)) == pytest.approx(float(objective(batch)), rel=1e-6)


def test_nir_default_flow_matches_the_repo_size():
    """5 GLOW blocks x 2 subnets of 8 Linear layers, width 128, conditioned on the D-dim proxy."""
    objective = NonIsotropyRegularization(embedding_dim=64, num_classes=3)
    half, width = 32, 128
    subnet = (half + 64) * width + width + 6 * (width * width + width) + width * 2 * half + 2 * half
    assert sum(p.numel() for p in objective.flow.parameters() if p.requires_grad) == 5 * 2 * subnet


def test_nir_leaves_numpy_rng_alone_and_rejects_bad_input():
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    small_nir()
    assert np.random.rand() == expected
    with pytest.raises(ValueError, match="asymmetric"):
        small_nir(asymmetric=True)
    with pytest.raises(ValueError, match="base"):
        small_nir(base="softtriple")
    with pytest.raises(ValueError, match="bogus"):
        small_nir(bogus=1)
    with pytest.raises(ValueError, match="form"):
        small_nir(form="other")
