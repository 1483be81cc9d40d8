"""Retrieval metrics against a plain-loop oracle written from the definitions, and against a
re-implementation of cirtorch's ``compute_map`` fed with a full argsort (the reference's protocol).

Embeddings are small integers stored as float32, so every similarity is an exact integer in float32
and float64 alike: the oracle and the chunked GEMM see the very same scores, ties included.
"""
import math

import numpy as np
import pytest
import torch

from lib.evaluation.metrics import GEMM_ROWS, positive_ranks, retrieval_metrics

KS = (1, 2, 4, 8)
METRICS = ["mAP", "mAP_noninterp", "MAP@R"] + [f"{m}@{k}" for k in KS for m in ("R", "mP", "mAP")]


# ----------------------------------------------------------------------------------------------
# oracle: one query at a time, straight from the definitions
# ----------------------------------------------------------------------------------------------

def oracle_ranks(scores, query_label, db_labels, self_index=None):
    """0-based ranks of the positives after sorting by descending score, negatives first on ties."""
    items = [(float(scores[d]), db_labels[d] == query_label) for d in range(len(db_labels)) if d != self_index]
    items.sort(key=lambda item: (-item[0], item[1]))  # False (negative) before True (positive)
    return [rank for rank, (_, positive) in enumerate(items) if positive]


def trapezoid_ap(ranks, normaliser):
    """cirtorch's compute_ap: trapezoids of the precision-recall curve."""
    ap = 0.0
    for j, r in enumerate(ranks):
        precision_0 = 1.0 if r == 0 else j / r
        precision_1 = (j + 1) / (r + 1)
        ap += (precision_0 + precision_1) / 2 / normaliser
    return ap


def oracle_query(ranks):
    npos = len(ranks)
    out = {"mAP": trapezoid_ap(ranks, npos),
           "mAP_noninterp": sum((j + 1) / (r + 1) for j, r in enumerate(ranks)) / npos,
           "MAP@R": sum((j + 1) / (r + 1) for j, r in enumerate(ranks) if r < npos) / npos}
    pos1 = [r + 1 for r in ranks]
    for k in KS:
        out[f"R@{k}"] = float(min(ranks) < k)
        kq = min(max(pos1), k)
        out[f"mP@{k}"] = sum(p <= kq for p in pos1) / kq
        out[f"mAP@{k}"] = trapezoid_ap([r for r in ranks if r <= k - 1], min(npos, k))
    return out


def oracle_metrics(query, db, query_labels, db_labels, exclude_self):
    scores = query.double().numpy() @ db.double().numpy().T
    ql, dl = query_labels.tolist(), db_labels.tolist()
    totals = dict.fromkeys(METRICS, 0.0)
    counted = skipped = 0
    for q in range(len(ql)):
        ranks = oracle_ranks(scores[q], ql[q], dl, q if exclude_self else None)
        if not ranks:
            skipped += 1
            continue
        counted += 1
        for name, value in oracle_query(ranks).items():
            totals[name] += value
    out = {name: value / counted if counted else float("nan") for name, value in totals.items()}
    out["num_queries"], out["num_queries_without_positives"] = counted, skipped
    return out


def assert_same(got, want, tol=1e-9):
    assert got["num_queries"] == want["num_queries"]
    assert got["num_queries_without_positives"] == want["num_queries_without_positives"]
    for name in METRICS:
        if math.isnan(want[name]):
            assert math.isnan(got[name]), name
        else:
            assert got[name] == pytest.approx(want[name], abs=tol), name


def integer_embeddings(n, dim, spread, generator):
    return torch.randint(-spread, spread + 1, (n, dim), generator=generator).float()


def random_labels(n, num_classes, generator):
    return torch.randint(0, num_classes, (n,), generator=generator)


# ----------------------------------------------------------------------------------------------
# against the oracle
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n,num_classes", [(40, 3), (57, 12), (90, 40)])  # 40 classes of 90: singletons
@pytest.mark.parametrize("spread", [1000, 1])  # 1: entries in {-1, 0, 1}, many exact ties
def test_symmetric_matches_oracle(seed, n, num_classes, spread):
    g = torch.Generator().manual_seed(seed)
    x = integer_embeddings(n, 6, spread, g)
    labels = random_labels(n, num_classes, g)
    for exclude_self in (True, False):
        got = retrieval_metrics(x, x, labels, labels, exclude_self=exclude_self, ks=KS, chunk_size=16)
        assert_same(got, oracle_metrics(x, x, labels, labels, exclude_self))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("spread", [1000, 2])
def test_asymmetric_matches_oracle(seed, spread):
    """Nq != Nd, some query classes absent from the database (skipped and counted)."""
    g = torch.Generator().manual_seed(seed)
    query, db = integer_embeddings(33, 5, spread, g), integer_embeddings(71, 5, spread, g)
    query_labels, db_labels = random_labels(33, 9, g), random_labels(71, 7, g)
    want = oracle_metrics(query, db, query_labels, db_labels, False)
    assert want["num_queries_without_positives"] > 0
    got = retrieval_metrics(query, db, query_labels, db_labels, ks=KS, chunk_size=5)
    assert_same(got, want)


def test_same_shape_but_separate_sets_matches_oracle():
    """Nq == Nd without exclude_self: the query's index in the database is an ordinary item."""
    g = torch.Generator().manual_seed(5)
    query, db = integer_embeddings(30, 4, 3, g), integer_embeddings(30, 4, 3, g)
    labels_q, labels_d = random_labels(30, 4, g), random_labels(30, 4, g)
    got = retrieval_metrics(query, db, labels_q, labels_d, ks=KS)
    assert_same(got, oracle_metrics(query, db, labels_q, labels_d, False))


def test_positive_ranks_match_oracle():
    g = torch.Generator().manual_seed(3)
    x = integer_embeddings(50, 4, 2, g)
    labels = random_labels(50, 6, g)
    scores = x.double().numpy() @ x.double().numpy().T
    got = []
    for ranks, valid in positive_ranks(x, x, labels, labels, exclude_self=True, chunk_size=7):
        got += [r[v].tolist() for r, v in zip(ranks, valid)]
    want = [oracle_ranks(scores[q], labels[q].item(), labels.tolist(), q) for q in range(50)]
    assert got == want


# ----------------------------------------------------------------------------------------------
# invariances and edge cases
# ----------------------------------------------------------------------------------------------

def test_perfect_one_hot_embeddings_score_one():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3])
    x = torch.nn.functional.one_hot(labels).float()
    out = retrieval_metrics(x, x, labels, labels, exclude_self=True, ks=KS)
    for name in METRICS:
        assert out[name] == 1.0, name
    assert out["num_queries"] == len(labels)


def test_chunk_size_does_not_change_results():
    g = torch.Generator().manual_seed(7)
    x = integer_embeddings(45, 5, 2, g)
    labels = random_labels(45, 8, g)
    results = [retrieval_metrics(x, x, labels, labels, exclude_self=True, ks=KS, chunk_size=c) for c in (1, 7, None)]
    assert results[0] == results[1] == results[2]


def test_chunk_size_does_not_change_float_results():
    """Real-valued embeddings, several chunks: the same ranks (GEMMs over aligned row blocks) and sums."""
    g = torch.Generator().manual_seed(8)
    n = 2 * GEMM_ROWS + 37
    x = torch.nn.functional.normalize(torch.randn(n, 16, generator=g), dim=1)
    labels = random_labels(n, 30, g)
    ranks = {}
    for c in (1, 7, GEMM_ROWS + 1, n, None):
        ranks[c] = [r[v] for chunk in positive_ranks(x, x, labels, labels, exclude_self=True, chunk_size=c)
                    for r, v in zip(*chunk)]
    assert all(len(ranks[c]) == n for c in ranks)
    for c in ranks:
        assert all(torch.equal(a, b) for a, b in zip(ranks[c], ranks[None])), c
    results = [retrieval_metrics(x, x, labels, labels, exclude_self=True, ks=KS, chunk_size=c) for c in (1, n)]
    assert results[0] == results[1]
    assert_same(results[0], oracle_metrics(x, x, labels, labels, True), tol=1e-6)


def test_database_permutation_changes_nothing():
    g = torch.Generator().manual_seed(11)
    query, db = integer_embeddings(20, 4, 2, g), integer_embeddings(60, 4, 2, g)
    query_labels, db_labels = random_labels(20, 5, g), random_labels(60, 5, g)
    base = retrieval_metrics(query, db, query_labels, db_labels, ks=KS)
    perm = torch.randperm(60, generator=g)
    permuted = retrieval_metrics(query, db[perm], query_labels, db_labels[perm], ks=KS)
    assert_same(permuted, base, tol=1e-12)


def test_arbitrary_integer_labels():
    g = torch.Generator().manual_seed(13)
    x = integer_embeddings(40, 4, 3, g)
    codes = random_labels(40, 5, g)
    odd = torch.tensor([-7, 10**12, 3, -(10**9), 0])[codes]
    assert retrieval_metrics(x, x, odd, odd, exclude_self=True, ks=KS) == \
        retrieval_metrics(x, x, codes, codes, exclude_self=True, ks=KS)
    # labels also accepted as lists / numpy arrays
    assert retrieval_metrics(x, x, odd.tolist(), odd.numpy(), exclude_self=True, ks=KS)["num_queries"] == 40


def test_constant_embeddings_are_pessimistic():
    """All scores tie: every negative ranks before every positive."""
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    x = torch.ones(6, 3)
    out = retrieval_metrics(x, x, labels, labels, exclude_self=True, ks=KS)
    assert out["R@1"] == 0.0
    assert out["num_queries"] == 5 and out["num_queries_without_positives"] == 1
    # queries 0-1: 1 positive behind 4 negatives -> rank 4, AP = (0/4 + 1/5) / 2
    # queries 2-4: 2 positives behind 3 negatives -> ranks 3, 4
    ap_0 = (0 / 4 + 1 / 5) / 2
    ap_2 = ((0 + 1 / 4) / 2 + (1 / 4 + 2 / 5) / 2) / 2
    assert out["mAP"] == pytest.approx((2 * ap_0 + 3 * ap_2) / 5, abs=1e-12)


def test_tie_at_rank_zero_goes_to_the_negative():
    query = torch.tensor([[1.0, 0.0]])
    db = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # a positive and a negative tie on top
    out = retrieval_metrics(query, db, torch.tensor([0]), torch.tensor([0, 1, 0]), ks=KS)
    assert out["R@1"] == 0.0 and out["R@2"] == 1.0
    assert out["mP@1"] == 0.0


def test_no_positives_at_all_gives_nan():
    x = torch.randn(4, 3)
    out = retrieval_metrics(x, x, torch.arange(4), torch.arange(4), exclude_self=True)
    assert out["num_queries"] == 0 and out["num_queries_without_positives"] == 4
    assert math.isnan(out["mAP"])


def test_bad_shapes_raise():
    x, labels = torch.randn(5, 3), torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="same D"):
        retrieval_metrics(x, torch.randn(5, 4), labels, labels)
    with pytest.raises(ValueError, match="labels"):
        retrieval_metrics(x, x, labels[:4], labels)
    with pytest.raises(ValueError, match="labels"):
        retrieval_metrics(x, x, labels, labels.unsqueeze(1))
    with pytest.raises(ValueError, match="exclude_self"):
        retrieval_metrics(x, torch.randn(6, 3), labels, torch.zeros(6, dtype=torch.long), exclude_self=True)
    with pytest.raises(ValueError):
        retrieval_metrics(x[0], x, labels, labels)
    with pytest.raises(ValueError, match="integers"):
        retrieval_metrics(x, x, labels.float(), labels.float())
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(x, x, labels, labels, ks=(0, 1))
    with pytest.raises(ValueError, match="empty"):
        retrieval_metrics(x[:0], x, labels[:0], labels)
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_metrics(x, x, labels, labels, chunk_size=0)


def test_one_large_class():
    """A class far larger than the others (P large): the ranks still match the oracle."""
    g = torch.Generator().manual_seed(21)
    x = integer_embeddings(120, 3, 2, g)
    labels = torch.where(torch.rand(120, generator=g) < 0.8, 0, random_labels(120, 6, g) + 1)
    got = retrieval_metrics(x, x, labels, labels, exclude_self=True, ks=KS, chunk_size=50)
    assert_same(got, oracle_metrics(x, x, labels, labels, True))


# ----------------------------------------------------------------------------------------------
# parity with the reference protocol: full argsort + cirtorch's compute_map (query as junk)
# ----------------------------------------------------------------------------------------------

def cirtorch_compute_map(ranks, gnd, kappas):
    """Written from the reference's lib/utils/evaluate.py:compute_map; ranks is (Nd, Nq)."""
    num_queries = len(gnd)
    total_ap, empty = 0.0, 0
    precision, ap_at_k, recall = np.zeros(len(kappas)), np.zeros(len(kappas)), np.zeros(len(kappas))
    for i in range(num_queries):
        ok, junk = np.asarray(gnd[i]["ok"]), np.asarray(gnd[i].get("junk", []))
        if len(ok) == 0:
            empty += 1
            continue
        pos = np.flatnonzero(np.isin(ranks[:, i], ok))
        junk_pos = np.flatnonzero(np.isin(ranks[:, i], junk))
        pos = pos - np.searchsorted(junk_pos, pos)  # junk ranked before a positive shifts it up
        total_ap += trapezoid_ap(pos.tolist(), len(ok))
        for j, k in enumerate(kappas):
            top = pos[pos <= k - 1]
            ap_at_k[j] += trapezoid_ap(top.tolist(), min(len(ok), k))
            recall[j] += len(top) > 0
        pos1 = pos + 1
        for j, k in enumerate(kappas):
            kq = min(pos1.max(), k)
            precision[j] += (pos1 <= kq).sum() / kq
    counted = num_queries - empty
    return total_ap / counted, precision / counted, ap_at_k / counted, recall / counted


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("exclude_self", [True, False])
def test_parity_with_reference_protocol(seed, exclude_self):
    g = torch.Generator().manual_seed(seed)
    n_db = 80
    n_q = n_db if exclude_self else 35
    db = integer_embeddings(n_db, 8, 1000, g)
    query = db if exclude_self else integer_embeddings(n_q, 8, 1000, g)
    db_labels = random_labels(n_db, 10, g)
    query_labels = db_labels if exclude_self else random_labels(n_q, 10, g)
    scores = db @ query.T  # (Nd, Nq), the reference's layout
    for q in range(n_q):  # tie-free data: the reference's unstable argsort is then well defined
        assert len(torch.unique(scores[:, q])) == n_db
    ranks = torch.argsort(scores, dim=0, descending=True).numpy()
    gnd = []
    for q in range(n_q):
        ok = [d for d in range(n_db) if db_labels[d] == query_labels[q] and not (exclude_self and d == q)]
        gnd.append({"ok": ok, "junk": [q] if exclude_self else []})
    kappas = [1, 4, 8]
    mean_ap, precision, ap_at_k, recall = cirtorch_compute_map(ranks, gnd, kappas)
    ours = retrieval_metrics(query, db, query_labels, db_labels, exclude_self=exclude_self, ks=kappas)
    assert ours["mAP"] == pytest.approx(mean_ap, abs=1e-9)
    for j, k in enumerate(kappas):
        assert ours[f"mP@{k}"] == pytest.approx(precision[j], abs=1e-9)
        assert ours[f"mAP@{k}"] == pytest.approx(ap_at_k[j], abs=1e-9)
        assert ours[f"R@{k}"] == pytest.approx(recall[j], abs=1e-9)


@pytest.mark.parametrize("share, limit", [(0.0, 2**24), (2.0, 2**24), (2.0, 0)],
                         ids=["dense", "sparse-row-search", "sparse-keyed-search"])
@pytest.mark.parametrize("seed", range(3))
def test_dense_and_sparse_bucketing_match_oracle(monkeypatch, seed, share, limit):
    """Every way of counting the items above each positive (every item bucketed, or only those at or
    above the lowest positive, searched per row or in one keyed search) gives the oracle's numbers,
    ties included."""
    from lib.evaluation import metrics

    monkeypatch.setattr(metrics, "SPARSE_SHARE", share)
    monkeypatch.setattr(metrics, "ROW_SEARCH_LIMIT", limit)
    g = torch.Generator().manual_seed(seed)
    x = integer_embeddings(60, 4, 2, g)
    labels = random_labels(60, 7, g)
    ours = retrieval_metrics(x, x, labels, labels, exclude_self=True, ks=KS)
    expected = oracle_metrics(x, x, labels, labels, exclude_self=True)
    for name in METRICS:
        assert ours[name] == pytest.approx(expected[name], abs=1e-12), name


@pytest.mark.parametrize("share, limit", [(0.0, 2**24), (2.0, 2**24), (2.0, 0)],
                         ids=["dense", "sparse-row-search", "sparse-keyed-search"])
def test_counts_at_or_above_against_brute_force(monkeypatch, share, limit):
    """Signed zeros, equal scores, infinities and padding: the counts of items >= each positive score."""
    from lib.evaluation import metrics

    monkeypatch.setattr(metrics, "SPARSE_SHARE", share)
    monkeypatch.setattr(metrics, "ROW_SEARCH_LIMIT", limit)
    g = torch.Generator().manual_seed(0)
    sims = torch.randint(-3, 4, (5, 40), generator=g).float() / 2
    sims[0, :6] = torch.tensor([-0.0, 0.0, -0.0, 0.5, float("-inf"), -1.5])
    sims[4, :3] = -0.0  # equal to the positive score +0.0 of row 4, so counted at or above it
    positives = [[0.0, -0.0, 1.5], [-0.0], [1.5, 1.5, 1.0, -1.5], [0.5], [-1.0, 0.0]]
    width = max(map(len, positives))
    ascending = torch.full((5, width), float("inf"))
    for r, p in enumerate(positives):
        ascending[r, :len(p)] = torch.tensor(sorted(p))
    got = metrics._at_or_above(sims, ascending)
    for r, p in enumerate(positives):
        for k, score in enumerate(sorted(p)):
            assert int(got[r, k]) == int((sims[r] >= score).sum()), (r, k)


@pytest.mark.parametrize("tile", [1, 7, 64])
@pytest.mark.parametrize("exclude_self", [True, False])
def test_database_column_blocks_match_oracle(monkeypatch, tile, exclude_self):
    """The similarities computed in blocks of database columns (``CPU_TILE_COLUMNS``), a class's own
    items falling in one block or across several: the oracle's numbers, ties included, for query sets
    with and without classes the database lacks."""
    from lib.evaluation import metrics

    monkeypatch.setattr(metrics, "CPU_TILE_COLUMNS", tile)
    g = torch.Generator().manual_seed(tile)
    x = integer_embeddings(70, 4, 2, g)
    labels = random_labels(70, 6, g)
    ours = retrieval_metrics(x, x, labels, labels, exclude_self=exclude_self, ks=KS)
    assert_same(ours, oracle_metrics(x, x, labels, labels, exclude_self), tol=1e-12)
    query, query_labels = integer_embeddings(25, 4, 2, g), random_labels(25, 9, g)  # classes 6..8: no positives
    ours = retrieval_metrics(query, x, query_labels, labels, ks=KS)
    assert_same(ours, oracle_metrics(query, x, query_labels, labels, False), tol=1e-12)


def test_chunk_size_does_not_change_float_ranks_across_column_blocks(monkeypatch):
    """Real-valued embeddings, several query blocks and several database column blocks."""
    from lib.evaluation import metrics

    monkeypatch.setattr(metrics, "CPU_TILE_COLUMNS", 50)
    g = torch.Generator().manual_seed(9)
    n = 2 * GEMM_ROWS + 11
    x = torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=1)
    labels = random_labels(n, 40, g)
    ranks = {c: [r[v] for chunk in positive_ranks(x, x, labels, labels, exclude_self=True, chunk_size=c)
                 for r, v in zip(*chunk)] for c in (1, GEMM_ROWS + 1, None)}
    for c in ranks:
        assert len(ranks[c]) == n and all(torch.equal(a, b) for a, b in zip(ranks[c], ranks[None])), c
    assert_same(retrieval_metrics(x, x, labels, labels, exclude_self=True, ks=KS),
                oracle_metrics(x, x, labels, labels, True), tol=1e-6)
