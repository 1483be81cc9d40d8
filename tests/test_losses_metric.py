"""Revisiting-DML objectives: plain-loop oracles written from the papers' formulas, parity with
pytorch-metric-learning where it implements the same loss, gradients, and the asymmetric variants."""
import math

import pytest
import torch
import torch.nn.functional as F

import lib.losses.metric as M
from lib.embeddings import Embeddings
from lib.losses.base import OBJECTIVES, build_objective

NAMES = ["angular", "arcface", "contrastive", "lifted", "histogram", "margin", "multisimilarity", "npair",
         "proxynca", "quadruplet", "snr", "softtriple", "softmax", "triplet"]
PROXY = {"arcface", "proxynca", "softtriple", "softmax"}
C, D = 4, 6


def make_batch(seed=0, per_class=3, classes=C, dim=D, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    centers = torch.randn(classes, dim, generator=g, dtype=torch.float64)
    s = F.normalize(centers[labels] + 0.9 * torch.randn(len(labels), dim, generator=g, dtype=torch.float64), dim=1)
    t = F.normalize(s + noise * torch.randn(len(labels), dim, generator=g, dtype=torch.float64), dim=1)
    return s.requires_grad_(True), t.requires_grad_(True), labels


def build(name, **kw):
    if name in ("triplet", "margin", "contrastive", "snr", "quadruplet", "npair", "angular"):
        kw.setdefault("seed", 0)
    _, obj = build_objective(dict(name=name, **kw), embedding_dim=D, num_classes=C)
    return obj.double()


# ---------------------------------------------------------------------------------------- oracles
def rows(t):
    return t.detach().tolist()


def sqd(u, v):
    return sum((a - b) ** 2 for a, b in zip(u, v))


def dist(u, v):
    return math.sqrt(sqd(u, v) + 1e-8)


def dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def unit(u):
    n = math.sqrt(dot(u, u))
    return [a / n for a in u]


def mean(v):
    return sum(v) / len(v)


def var(v):
    m = mean(v)
    return sum((a - m) ** 2 for a in v) / (len(v) - 1)


def lse(v):
    m = max(v)
    return m + math.log(sum(math.exp(a - m) for a in v))


def o_triplet(x, y, lab, t, margin=0.2):
    return mean([max(0.0, sqd(x[a], y[p]) - sqd(x[a], y[n]) + margin) for a, p, n in zip(*t)])


def o_margin(x, y, lab, t, betas, margin=0.2):
    terms = []
    for a, p, n in zip(*t):
        b = betas[lab[a]]
        terms += [max(0.0, dist(x[a], y[p]) - b + margin), max(0.0, b - dist(x[a], y[n]) + margin)]
    nonzero = sum(1 for v in terms if v > 0)
    return sum(terms) / max(nonzero, 1)


def o_contrastive(x, y, lab, t, pm=0.0, nm=1.0):
    a_, p_, n_ = t
    return (mean([max(0.0, dist(x[a], y[p]) - pm) for a, p in zip(a_, p_)])
            + mean([max(0.0, nm - dist(x[a], y[n])) for a, n in zip(a_, n_)]))


def o_snr(x, y, lab, t, margin=0.2, reg=0.0):
    def snr(u, v):
        return var([b - a for a, b in zip(u, v)]) / var(u)
    h = [max(0.0, snr(x[a], y[p]) - snr(x[a], y[n]) + margin) for a, p, n in zip(*t)]
    return sum(h) / max(1, sum(1 for v in h if v > 0)) + reg * mean([abs(sum(x[a])) for a in t[0]])


def o_quadruplet(x, y, lab, t, m1=0.2, m2=0.2):
    a_, p_, n_, k_ = t
    first = mean([max(0.0, dist(x[a], y[p]) - dist(x[a], y[n]) + m1) for a, p, n in zip(a_, p_, n_)])
    second = [max(0.0, dist(x[a], y[p]) - dist(y[n], y[k]) + m2) for a, p, n, k in zip(a_, p_, n_, k_) if k >= 0]
    return first + (mean(second) if second else 0.0)


def o_npair(x, y, lab, t, l2=0.005):
    out = []
    for a, p in zip(*t):
        out.append(math.log(1 + sum(math.exp(dot(x[a], y[n]) - dot(x[a], y[p])) for n in range(len(y)) if lab[n] != lab[a])))
    return mean(out) + l2 * mean([math.sqrt(dot(v, v)) for v in x])


def o_angular_term(x, y, lab, t, alpha=45.0):
    t2 = math.tan(math.radians(alpha)) ** 2
    out = []
    for a, p in zip(*t):
        xa, yp = unit(x[a]), unit(y[p])
        s = sum(math.exp(4 * t2 * dot([u + v for u, v in zip(xa, yp)], unit(y[n])) - 2 * (1 + t2) * dot(xa, yp))
                for n in range(len(y)) if lab[n] != lab[a])
        out.append(math.log(1 + s))
    return mean(out)


def o_angular(x, y, lab, t, alpha=45.0, w=2.0, l2=0.005):
    return o_npair(x, y, lab, t, l2) + w * o_angular_term(x, y, lab, t, alpha)


def o_lifted(x, y, lab, asym, margin=1.0, l2=0.005):
    out = []
    for i in range(len(x)):
        P = [j for j in range(len(y)) if lab[j] == lab[i] and (asym or j != i)]
        N = [j for j in range(len(y)) if lab[j] != lab[i]]
        if P and N:
            out.append(max(0.0, lse([dist(x[i], y[j]) for j in P]) + lse([margin - dist(x[i], y[j]) for j in N])))
    return mean(out) + l2 * mean([math.sqrt(dot(v, v)) for v in x])


def o_histogram(x, y, lab, asym, bins=65):
    step = 2 / (bins - 1)
    pos, neg = [], []
    for i in range(len(x)):
        for j in range(len(y)):
            if asym or j > i:
                (pos if lab[i] == lab[j] else neg).append(dot(x[i], y[j]))

    def hist(values):  # triangular kernel around each node = linear interpolation
        return [sum(max(0.0, 1 - abs(s - (-1 + r * step)) / step) for s in values) / len(values) for r in range(bins)]
    hp, hn = hist(pos), hist(neg)
    return sum(hn[r] * sum(hp[: r + 1]) for r in range(bins))


def o_ms(x, y, lab, asym, alpha=2.0, beta=40.0, margin=0.1, lam=0.5):
    out = []
    for i in range(len(x)):
        sp = [dot(x[i], y[j]) for j in range(len(y)) if lab[j] == lab[i] and (asym or j != i)]
        sn = [dot(x[i], y[j]) for j in range(len(y)) if lab[j] != lab[i]]
        if not sp or not sn:
            continue
        kn = [s for s in sn if s + margin > min(sp)]
        kp = [s for s in sp if s - margin < max(sn)]
        if not kn or not kp:
            continue
        out.append(math.log(1 + sum(math.exp(-alpha * (s - lam)) for s in kp)) / alpha
                   + math.log(1 + sum(math.exp(beta * (s - lam)) for s in kn)) / beta)
    return mean(out)


def o_proxynca(x, P, lab, scale=3.0):
    out = []
    for i, v in enumerate(x):
        xs = [scale * a for a in unit(v)]
        d = [sqd(xs, [scale * a for a in unit(p)]) for p in P]
        out.append(d[lab[i]] + lse([-d[z] for z in range(len(P)) if z != lab[i]]))
    return mean(out)


def ce(logits, y):
    return lse(logits) - logits[y]


def o_softmax(x, P, lab, temp=0.05):
    return mean([ce([dot(unit(v), unit(p)) / temp for p in P], lab[i]) for i, v in enumerate(x)])


def o_arcface(x, P, lab, m=0.5, s=16.0):
    out = []
    for i, v in enumerate(x):
        cos = [dot(unit(v), unit(p)) for p in P]
        cos[lab[i]] = math.cos(math.acos(cos[lab[i]]) + m)
        out.append(ce([s * c for c in cos], lab[i]))
    return mean(out)


def o_softtriple(x, centers, lab, K=2, delta=0.01, gamma=0.1, la=8.0, tau=0.2):
    W = [unit(col) for col in zip(*centers)]  # C*K unit centres
    nc = len(W) // K
    out = []
    for i, v in enumerate(x):
        S = []
        for c in range(nc):
            s = [dot(v, W[c * K + k]) for k in range(K)]
            z = sum(math.exp(a / gamma) for a in s)
            S.append(sum(math.exp(a / gamma) / z * a for a in s))
        out.append(ce([la * (S[c] - (delta if c == lab[i] else 0)) for c in range(nc)], lab[i]))
    reg = sum(math.sqrt(2 + 1e-5 - 2 * dot(W[c * K + k], W[c * K + k2]))
              for c in range(nc) for k in range(K) for k2 in range(k + 1, K))
    return mean(out) + tau * reg / (nc * K * (K - 1))


# ---------------------------------------------------------------------------------------- tests
def oracle(name, obj, s, t, labels, asym):
    x, y, lab = rows(s), rows(t if asym else s), labels.tolist()
    tup = [v.tolist() for v in getattr(obj, "last_tuples", ())]
    if name == "triplet":
        return o_triplet(x, y, lab, tup, obj.margin)
    if name == "margin":
        return o_margin(x, y, lab, tup, obj.beta.tolist(), obj.margin)
    if name == "contrastive":
        return o_contrastive(x, y, lab, tup)
    if name == "snr":
        return o_snr(x, y, lab, tup, reg=obj.reg_lambda)
    if name == "quadruplet":
        assert all(lab[k] not in (lab[a], lab[n]) for a, n, k in zip(tup[0], tup[2], tup[3]) if k >= 0)
        return o_quadruplet(x, y, lab, tup)
    if name == "npair":
        return o_npair(x, y, lab, tup)
    if name == "angular":
        return o_angular(x, y, lab, tup)
    if name == "lifted":
        return o_lifted(x, y, lab, asym)
    if name == "histogram":
        return o_histogram(x, y, lab, asym)
    if name == "multisimilarity":
        return o_ms(x, y, lab, asym)
    if name == "proxynca":
        return o_proxynca(x, rows(obj.proxies), lab)
    if name == "softmax":
        return o_softmax(x, rows(obj.proxies), lab)
    if name == "arcface":
        return o_arcface(x, rows(obj.proxies), lab)
    if name == "softtriple":
        return o_softtriple(x, rows(obj.centers), lab)
    raise AssertionError(name)


@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_against_loop_oracle(name, asym):
    if asym and name in PROXY:
        pytest.skip("proxy losses reject asymmetric=True (tested below)")
    s, t, labels = make_batch(seed=1)
    obj = build(name, asymmetric=asym)
    loss = obj(Embeddings(student=s, labels=labels, teacher=t))
    assert loss.item() == pytest.approx(oracle(name, obj, s, t, labels, asym), rel=1e-6, abs=1e-7)
    if asym and hasattr(obj, "last_tuples"):
        a, p = obj.last_tuples[:2]
        assert (a == p).any() or name in ("npair", "angular")  # own teacher row is a legitimate positive
    if not asym and hasattr(obj, "last_tuples"):
        a, p = obj.last_tuples[:2]
        assert not (a == p).any()


@pytest.mark.parametrize("miner", ["random", "semihard", "softhard", "rho_distance", "parametric"])
def test_triplet_with_each_miner(miner):
    s, t, labels = make_batch(seed=2)
    obj = build("triplet", miner=miner)
    loss = obj(Embeddings(student=s, labels=labels))
    assert loss.item() == pytest.approx(o_triplet(rows(s), rows(s), labels.tolist(), [v.tolist() for v in obj.last_tuples]))
    if miner == "semihard":
        assert obj.miner.margin == obj.margin


def test_variants_of_margin_and_snr():
    s, t, labels = make_batch(seed=3)
    obj = build("margin", per_class=False, beta=1.0)
    loss = obj(Embeddings(student=s, labels=labels))
    assert obj.beta.shape == (1,)
    assert loss.item() == pytest.approx(o_margin(rows(s), rows(s), labels.tolist(), [v.tolist() for v in obj.last_tuples],
                                                 [1.0] * C))
    assert build("margin", learn_beta=False).beta.requires_grad is False
    snr = build("snr", miner="semihard")
    assert snr.reg_lambda == 0.005 and build("snr").reg_lambda == 0.0  # Revisiting's rule
    loss = snr(Embeddings(student=s, labels=labels))
    assert loss.item() == pytest.approx(o_snr(rows(s), rows(s), labels.tolist(), [v.tolist() for v in snr.last_tuples],
                                              reg=0.005))


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_embeddings_and_parameters(name):
    s, t, labels = make_batch(seed=4)
    obj = build(name)
    loss = obj(Embeddings(student=s, labels=labels, teacher=t))
    loss.backward()
    assert torch.isfinite(loss) and s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    params = list(obj.parameters())
    if name in PROXY or name == "margin":
        assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        assert obj.lr_multiplier == {"proxynca": 50.0, "arcface": 50.0, "margin": 50.0}.get(name, 1.0)
    assert t.grad is None


@pytest.mark.parametrize("name", sorted(set(NAMES) - PROXY))
def test_asymmetric_uses_the_teacher_and_does_not_train_it(name):
    s, t, labels = make_batch(seed=5)
    kw = {"seed": 0} if name in ("triplet", "margin", "contrastive", "snr", "quadruplet", "npair", "angular") else {}
    loss1 = build(name, asymmetric=True, **kw)(Embeddings(student=s, labels=labels, teacher=t))
    t2 = F.normalize(t.detach() + 0.5 * torch.randn_like(t), dim=1).requires_grad_(True)
    loss2 = build(name, asymmetric=True, **kw)(Embeddings(student=s, labels=labels, teacher=t2))
    assert abs(loss1.item() - loss2.item()) > 1e-6
    (loss1 + loss2).backward()
    assert t.grad is None and t2.grad is None and s.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="teacher"):
        build(name, asymmetric=True)(Embeddings(student=s, labels=labels))


@pytest.mark.parametrize("name", sorted(PROXY))
def test_proxy_losses_reject_asymmetric_and_bad_labels(name):
    with pytest.raises(ValueError, match="asymmetric"):
        build(name, asymmetric=True)
    s, _, labels = make_batch()
    with pytest.raises(ValueError, match="num_classes"):
        build(name)(Embeddings(student=s, labels=labels + C))


@pytest.mark.parametrize("name", sorted(set(NAMES) - PROXY))
def test_no_valid_tuple_gives_a_connected_zero(name):
    s = F.normalize(torch.randn(5, D, dtype=torch.float64), dim=1).requires_grad_(True)
    labels = torch.arange(5)  # no positives in the symmetric case
    obj = build(name) if name != "margin" else build("margin", num_classes=5)
    loss = obj(Embeddings(student=s, labels=labels))
    loss.backward()
    assert loss.item() == pytest.approx(0.005 if name in ("npair", "angular", "lifted") else 0.0)
    assert s.grad is not None


def test_registry_names_and_specs():
    for name in NAMES + ["ms"]:
        assert name in OBJECTIVES
    spec, obj = build_objective("ms:0.5:alpha=3,beta=50", embedding_dim=D, num_classes=C)
    assert spec.weight == 0.5 and (obj.alpha, obj.beta) == (3, 50)
    _, obj = build_objective("triplet::miner=semihard,margin=0.3", embedding_dim=D, num_classes=C)
    assert type(obj.miner).__name__ == "SemihardMiner" and obj.miner.margin == 0.3
    _, obj = build_objective({"name": "triplet", "miner": "rho_distance", "miner_kwargs": {"rho": 0.4}},
                             embedding_dim=D, num_classes=C)
    assert obj.miner.rho == 0.4
    _, obj = build_objective("softtriple", embedding_dim=D, num_classes=C)
    assert obj.centers.shape == (D, 2 * C)


# ---------------------------------------------------------------------------------------- PML parity
try:
    import pytorch_metric_learning  # noqa: F401
    HAVE_PML = True
except ImportError:
    HAVE_PML = False
needs_pml = pytest.mark.skipif(not HAVE_PML, reason="pytorch-metric-learning is not installed: the parity tests need it")


def _pml():
    from pytorch_metric_learning import distances, losses, miners, reducers
    return distances, losses, miners, reducers


def _triplets(seed=6, n=30):
    s, t, labels = make_batch(seed=seed, per_class=4)
    g = torch.Generator().manual_seed(seed)
    from lib.miners import MINERS
    a, p, n_ = MINERS.build("random", num_triplets=n)(s, labels, generator=g)
    return s, t, labels, a, p, n_


@needs_pml
def test_pml_parity_triplet_contrastive_snr_margin():
    distances, losses, _, reducers = _pml()
    s, t, labels, a, p, n = _triplets()
    ours = M.triplet_loss(s, s, a, p, n, 0.2)
    theirs = losses.TripletMarginLoss(margin=0.2, distance=distances.LpDistance(power=2, normalize_embeddings=False),
                                      reducer=reducers.MeanReducer())(s, labels, (a, p, n))
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    ours = M.contrastive_loss(s, s, a, p, n, 0.0, 1.0)
    theirs = losses.ContrastiveLoss(pos_margin=0.0, neg_margin=1.0, distance=distances.LpDistance(normalize_embeddings=False),
                                    reducer=reducers.MeanReducer())(s, labels, (a, p, a, n))
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    ours = M.snr_triplet_loss(s, s, a, p, n, 0.2)
    theirs = losses.TripletMarginLoss(margin=0.2, distance=distances.SNRDistance(),
                                      reducer=reducers.AvgNonZeroReducer())(s, labels, (a, p, n))
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    beta = torch.full((C,), 1.2, dtype=torch.float64)
    ours = M.margin_loss(s, s, a, p, n, beta[labels[a]], 0.2)
    pml_margin = losses.MarginLoss(margin=0.2, nu=0, beta=1.2, learn_beta=True, num_classes=C).double()
    theirs = pml_margin(s, labels, (a, p, n))
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


@needs_pml
def test_pml_parity_pair_losses():
    distances, losses, miners, _ = _pml()
    s, t, labels = make_batch(seed=7, per_class=4)
    ours = M.lifted_structure_loss(s, s, labels, margin=1.0, l2_weight=0.0)
    theirs = losses.GeneralizedLiftedStructureLoss(neg_margin=1.0, pos_margin=0.0,
                                                   distance=distances.LpDistance(normalize_embeddings=False))(s, labels)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    ours = M.histogram_loss(s, s, labels, num_bins=65)
    theirs = losses.HistogramLoss(n_bins=64)(s, labels)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    mined = miners.MultiSimilarityMiner(epsilon=0.1)(s, labels)
    theirs = losses.MultiSimilarityLoss(alpha=2, beta=40, base=0.5)(s, labels, mined)
    ours = M.multisimilarity_loss(s, s, labels, alpha=2, beta=40, margin=0.1, threshold=0.5)
    # PML averages over all anchors (0 for those without mined pairs), ours over the anchors with both kinds
    with_pos, with_neg = set(mined[0].tolist()), set(mined[2].tolist())
    assert with_pos == with_neg and 0 < len(with_pos) < len(s)
    assert ours.item() * len(with_pos) == pytest.approx(theirs.item() * len(s), rel=1e-6)
    from lib.miners import _random_choice
    pos = (labels.view(-1, 1) == labels.view(1, -1)).fill_diagonal_(False)
    a = torch.arange(len(s))
    p = _random_choice(pos, torch.Generator().manual_seed(0))
    ours = M.angular_term(s, s, labels, a, p, 45.0)
    theirs = losses.AngularLoss(alpha=45)(s, labels, (a, p, a[:1], a[:1]))
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)


@needs_pml
def test_pml_parity_proxy_losses():
    _, losses, _, _ = _pml()
    s, t, labels = make_batch(seed=8)
    ours = build("softmax")
    theirs = losses.NormalizedSoftmaxLoss(C, D, temperature=0.05).double()
    theirs.W.data.copy_(ours.proxies.data.T)
    assert ours(Embeddings(student=s, labels=labels)).item() == pytest.approx(theirs(s, labels).item(), rel=1e-6)
    ours = build("arcface")
    theirs = losses.ArcFaceLoss(C, D, margin=math.degrees(0.5), scale=16).double()
    theirs.W.data.copy_(ours.proxies.data.T)
    assert ours(Embeddings(student=s, labels=labels)).item() == pytest.approx(theirs(s, labels).item(), rel=1e-5)
    ours = build("softtriple", reg_weight=0.0)
    theirs = losses.SoftTripleLoss(C, D, centers_per_class=2, la=8, gamma=0.1, margin=0.01).double()
    theirs.fc.data.copy_(ours.centers.data)
    assert ours(Embeddings(student=s, labels=labels)).item() == pytest.approx(theirs(s, labels).item(), rel=1e-6)
