"""Miners on points with known distances (a circle embedded in R^D), against the rules of the papers."""
import math
from collections import Counter

import pytest
import torch

from lib.miners import (MINERS, ParametricMiner, RhoDistanceMiner, log_inverse_sphere_density, pairwise_distances,
                        sample_distance_weighted)


def circle(angles, dim=2):
    """Unit vectors at the given angles, zero-padded to ``dim``: chord distance 2 sin(|dtheta|/2)."""
    a = torch.tensor(angles, dtype=torch.float32)
    x = torch.zeros(len(a), dim)
    x[:, 0], x[:, 1] = torch.cos(a), torch.sin(a)
    return x


def chord(dtheta):
    return 2 * math.sin(abs(dtheta) / 2)


# anchor 0 at 0 rad, its positive at 0.6 rad (d = 0.591); negatives at 0.3 (hard, d = 0.298),
# 0.75 (semi-hard, d = 0.733 < 0.591 + 0.2) and 1.5 (easy, d = 1.363)
GEOMETRY = circle([0.0, 0.6, 0.3, 0.75, 1.5, 1.55])
LABELS = torch.tensor([0, 0, 1, 2, 3, 3])


def test_pairwise_distances_are_chords():
    d = pairwise_distances(GEOMETRY, GEOMETRY)
    assert d[0, 1] == pytest.approx(chord(0.6), abs=1e-4)
    assert d[0, 4] == pytest.approx(chord(1.5), abs=1e-4)


def loop_triplets_valid(a, p, n, labels, ref_labels, exclude_self=True):
    for i, j, k in zip(a.tolist(), p.tolist(), n.tolist()):
        assert labels[i] == ref_labels[j] and labels[i] != ref_labels[k]
        if exclude_self:
            assert i != j


@pytest.mark.parametrize("name", ["random", "semihard", "softhard", "distance", "parametric"])
def test_valid_triplets_and_reproducible(name):
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(24, 6), dim=1)
    y = torch.arange(6).repeat_interleave(4)
    out1 = MINERS.build(name, seed=3)(x, y)
    out2 = MINERS.build(name, seed=3)(x, y)
    assert all(torch.equal(u, v) for u, v in zip(out1, out2))
    a, p, n = out1
    assert len(a) == 24 and a.dtype == torch.long
    loop_triplets_valid(a, p, n, y, y)
    gen = torch.Generator().manual_seed(9)
    out3 = MINERS.build(name)(x, y, generator=gen)
    loop_triplets_valid(*out3, y, y)


def test_anchor_without_positive_is_skipped_and_self_pair_rules():
    x, y = GEOMETRY, LABELS  # classes 1 and 2 have a single member
    for name in ["semihard", "softhard", "distance", "parametric"]:
        a, p, n = MINERS.build(name, seed=0)(x, y)
        assert sorted(a.tolist()) == [0, 1, 4, 5]
        # with a reference (the teacher's view of the same rows), (i, i) is a legitimate positive
        a, p, n = MINERS.build(name, seed=0)(x, y, ref=x.clone(), ref_labels=y)
        assert sorted(a.tolist()) == [0, 1, 2, 3, 4, 5]
        assert p[a == 2].item() == 2 and p[a == 3].item() == 3
        loop_triplets_valid(a, p, n, y, y, exclude_self=False)


def test_semihard_picks_the_semihard_negative():
    miner = MINERS.build("semihard", margin=0.2)
    for seed in range(20):
        a, p, n = miner(GEOMETRY, LABELS, generator=torch.Generator().manual_seed(seed))
        assert p[a == 0].item() == 1 and n[a == 0].item() == 3
    # margin too small for any semi-hard negative: uniform over all negatives of the anchor
    seen = Counter(MINERS.build("semihard", margin=0.01)(GEOMETRY, LABELS, generator=torch.Generator().manual_seed(s))[2][0].item()
                   for s in range(60))
    assert set(seen) == {2, 3, 4, 5}


def test_softhard_picks_hard_positive_and_negative():
    # anchor 0: closest negative d=0.298 < positive d=0.591 -> that positive is hard; only the negative
    # at 0.3 rad is closer than the farthest positive
    for seed in range(20):
        a, p, n = MINERS.build("softhard")(GEOMETRY, LABELS, generator=torch.Generator().manual_seed(seed))
        assert p[a == 0].item() == 1 and n[a == 0].item() == 2
    # anchor 4 (1.5 rad): positive 5 at d=0.05 is closer than every negative -> fallback to it;
    # negatives closer than 0.05: none -> uniform over negatives
    negs = Counter(MINERS.build("softhard")(GEOMETRY, LABELS, generator=torch.Generator().manual_seed(s))[2][2].item()
                   for s in range(80))
    assert set(negs) == {0, 1, 2, 3}


def test_random_miner_enumerates_small_batches():
    x = circle([0, 1, 2, 3])
    y = torch.tensor([0, 0, 1, 1])
    every = {(a, p, n) for a in range(4) for p in range(4) for n in range(4)
             if a != p and y[a] == y[p] and y[a] != y[n]}
    assert len(every) == 8
    union = set()
    for seed in range(30):
        a, p, n = MINERS.build("random")(x, y, generator=torch.Generator().manual_seed(seed))
        got = list(zip(a.tolist(), p.tolist(), n.tolist()))
        assert len(got) == 4 and len(set(got)) == 4 and set(got) <= every  # without replacement
        union |= set(got)
    assert union == every
    # fewer valid triplets than N: all of them
    a, p, n = MINERS.build("random")(circle([0, 1, 2]), torch.tensor([0, 0, 1]))
    assert set(zip(a.tolist(), p.tolist(), n.tolist())) == {(0, 1, 2), (1, 0, 2)}


def expected_distance_weights(distances, dim, lower=0.5, upper=1.4):
    w = []
    for d in distances:
        if d > upper:
            w.append(0.0)
            continue
        d = max(d, lower)
        w.append(math.exp(-(dim - 2) * math.log(d) - (dim - 3) / 2 * math.log(1 - d * d / 4)))
    total = sum(w)
    return [v / total for v in w]


def test_distance_weighted_frequencies_and_upper_cutoff():
    dim = 4
    # anchor 0 and its positive 1; negatives at chord 0.2 (clamped to 0.5), 0.8, 1.2, 1.6 (beyond 1.4)
    dists = [0.2, 0.8, 1.2, 1.6]
    angles = [0.0, 0.1] + [2 * math.asin(d / 2) for d in dists]
    x = circle(angles, dim)
    y = torch.tensor([0, 0, 1, 2, 3, 4])
    miner = MINERS.build("distance")
    gen = torch.Generator().manual_seed(0)
    draws = Counter(miner(x, y, generator=gen)[2][0].item() for _ in range(3000))
    expected = expected_distance_weights(dists, dim)
    assert draws[5] == 0
    for k, prob in enumerate(expected):
        assert draws[2 + k] / 3000 == pytest.approx(prob, abs=0.03)
    # all negatives beyond the upper cutoff: uniform fallback
    far = circle([0.0, 0.05, 2.5, 2.6, 2.7], dim)
    seen = Counter(miner(far, torch.tensor([0, 0, 1, 2, 3]), generator=gen)[2][0].item() for _ in range(300))
    assert set(seen) == {2, 3, 4}


def test_rho_distance_flips():
    x = circle([0.0, 0.2, 0.4, 1.0, 1.2, 1.4, 2.0, 2.2], 4)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 3])
    a, p, n = RhoDistanceMiner(rho=1.0, seed=0)(x, y)
    flipped = y[a] != y[n]
    assert not flipped.any()  # every anchor with a second positive got (a, a, p')
    assert torch.equal(p, a) and (n != a).all()
    # rho = 0: the distance miner
    out0 = RhoDistanceMiner(rho=0.0, seed=4)(x, y)
    out1 = MINERS.build("distance", seed=4)(x, y)
    assert all(torch.equal(u, v) for u, v in zip(out0, out1))
    # asymmetric reference: the anchor's teacher row is the "positive" of a flipped triplet
    a, p, n = RhoDistanceMiner(rho=1.0, seed=0)(x, y, ref=x + 0.01, ref_labels=y)
    fl = y[a] == y[n]
    assert fl.sum() == 6 and torch.equal(p[fl], a[fl]) and (n[fl] != a[fl]).all()
    miner = RhoDistanceMiner(rho=0.5, seed=1)
    counts = [miner(x, y)[0].numel() and miner.last_num_flipped for _ in range(200)]
    assert 0.4 < sum(counts) / (200 * 6) < 0.6


def test_parametric_miner_follows_its_bins_and_learns():
    x = circle([0.0, 0.05] + [2 * math.asin(d / 2) for d in (0.3, 0.75, 1.3)], 4)
    y = torch.tensor([0, 0, 1, 2, 3])
    miner = ParametricMiner(num_bins=4, support_min=0.0, support_max=1.6, seed=0)  # bins of width 0.4
    assert miner.bin_of(torch.tensor([0.3, 0.75, 1.3, 5.0])).tolist() == [0, 1, 3, 3]
    with torch.no_grad():
        miner.logits.copy_(torch.tensor([-30.0, 5.0, -30.0, -30.0]))
    for _ in range(10):
        a, p, n = miner(x, y)
        assert n[a == 0].item() == 3  # the negative at d=0.75, bin 1
    with torch.no_grad():
        miner.logits.zero_()
    miner.bin_counts.zero_()
    for _ in range(20):
        miner(x, y)
    drawn = miner.bin_counts.clone()
    before = miner.probabilities()
    stats = miner.update(reward=1.0)
    after = miner.probabilities()
    assert miner.bin_counts.sum() == 0 and stats["advantage"] == 1.0
    # REINFORCE with a positive advantage moves mass towards the bins that were drawn more than average
    freq = drawn / drawn.sum()
    assert torch.sign(after - before).tolist() == torch.sign(freq - before).tolist()
    assert "logits" in dict(miner.named_parameters())
    with pytest.raises(ValueError):
        ParametricMiner(init="nope")


def test_sample_distance_weighted():
    dim = 4
    dists = [0.3, 0.8, 1.2, 1.7]
    pool = circle([2 * math.asin(d / 2) for d in dists] + [0.01], dim)
    pool_labels = torch.tensor([1, 2, 3, 4, 0])
    q = 4000
    query = circle([0.0] * q, dim)
    query_labels = torch.zeros(q, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    one = sample_distance_weighted(query, pool, query_labels, pool_labels, 1, generator=gen)
    assert one.shape == (q, 1) and (one != 4).all()  # never the same class
    counts = torch.bincount(one.flatten(), minlength=5).float() / q
    expected = expected_distance_weights(dists, dim, upper=10)
    for k, prob in enumerate(expected):
        assert counts[k].item() == pytest.approx(prob, abs=0.03)
    three = sample_distance_weighted(query[:50], pool, query_labels[:50], pool_labels, 3, generator=gen)
    assert all(len(set(row)) == 3 and 4 not in row for row in three.tolist())
    assert sample_distance_weighted(query, pool, query_labels, pool_labels, 0).shape == (q, 0)
    with pytest.raises(ValueError, match="fewer than num=5"):
        sample_distance_weighted(query[:2], pool, query_labels[:2], pool_labels, 5)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(sample_distance_weighted(query[:30], pool, query_labels[:30], pool_labels, 2, generator=g1),
                       sample_distance_weighted(query[:30], pool, query_labels[:30], pool_labels, 2, generator=g2))
    # chunking does not change the draw
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    big = sample_distance_weighted(query[:30], pool, query_labels[:30], pool_labels, 2, generator=g1, chunk_size=7)
    assert big.shape == (30, 2)


def test_log_inverse_density_high_dim_no_underflow():
    d = torch.tensor([0.5, 1.0, math.sqrt(2), 1.9, 2.0])
    w = log_inverse_sphere_density(d, 512)
    # q(d) peaks at sqrt(2) in high dimension, so q^-1 is smallest there; d = 2 stays finite
    assert torch.isfinite(w).all() and w.argmin() == 2 and w[0] > w[1]
    pool = torch.nn.functional.normalize(torch.randn(300, 512), dim=1)
    idx = sample_distance_weighted(pool[:5], pool, torch.zeros(5, dtype=torch.long), torch.arange(300) % 7, 40,
                                   generator=torch.Generator().manual_seed(0))
    assert all(len(set(r)) == 40 for r in idx.tolist())
