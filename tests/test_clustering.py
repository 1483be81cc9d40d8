"""Clustering NMI / pairwise F1: separated clusters score 1, F1 against a brute-force pair loop."""
import itertools

import numpy as np
import pytest
import torch

from lib.evaluation.clustering import clustering_metrics, pairwise_f1


def loop_f1(cluster_ids, labels):
    tp = same_cluster = same_class = 0
    for i, j in itertools.combinations(range(len(labels)), 2):
        c, y = cluster_ids[i] == cluster_ids[j], labels[i] == labels[j]
        tp += c and y
        same_cluster += c
        same_class += y
    if tp == 0:
        return 0.0
    precision, recall = tp / same_cluster, tp / same_class
    return 2 * precision * recall / (precision + recall)


@pytest.mark.parametrize("seed", range(5))
def test_pairwise_f1_matches_pair_loop(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(-3, 6, 70) * 1000  # arbitrary label values
    clusters = np.where(rng.random(70) < 0.6, labels, rng.integers(0, 9, 70))  # partly right
    assert pairwise_f1(clusters, labels) == pytest.approx(loop_f1(clusters.tolist(), labels.tolist()), abs=1e-12)


def test_pairwise_f1_fixed_case():
    # clusters {0,1,2} {3,4}; classes {0,1} {2,3,4}: TP = 1 + 1, same cluster 3 + 1, same class 1 + 3
    clusters, labels = [5, 5, 5, 7, 7], [0, 0, 1, 1, 1]
    assert pairwise_f1(clusters, labels) == pytest.approx(0.5)
    assert pairwise_f1(labels, labels) == 1.0
    assert pairwise_f1([0, 1, 2], [0, 0, 0]) == 0.0
    with pytest.raises(ValueError, match="length"):
        pairwise_f1([0, 1], [0, 1, 2])


def test_separated_clusters_score_one():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(6).repeat_interleave(15)
    centres = 10 * torch.eye(6, 16)
    x = centres[labels] + 0.1 * torch.randn(len(labels), 16, generator=g)
    out = clustering_metrics(x, labels, seed=1)
    assert out["NMI"] == pytest.approx(1.0) and out["F1"] == pytest.approx(1.0)


def test_random_embeddings_score_low_and_bad_input_raises():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(5).repeat_interleave(20)
    out = clustering_metrics(torch.randn(100, 8, generator=g), labels)
    assert out["NMI"] < 0.3 and out["F1"] < 0.4
    with pytest.raises(ValueError):
        clustering_metrics(torch.randn(10, 4), torch.zeros(9))
    with pytest.raises(ValueError, match="num_clusters"):
        clustering_metrics(torch.randn(10, 4), torch.zeros(10), num_clusters=11)
