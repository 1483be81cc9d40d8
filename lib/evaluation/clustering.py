"""Clustering metrics of the deep-metric-learning literature: NMI and pairwise F1 after k-means.

k-means (scikit-learn, ``n_init=10``) with as many clusters as classes runs on the embeddings; then
- NMI: ``sklearn.metrics.normalized_mutual_info_score`` (arithmetic normalisation);
- F1: pairwise F-measure (Song et al., "Deep Metric Learning via Lifted Structured Feature
  Embedding", CVPR 2016, Sec. 5; Roth et al., "Revisiting Training Strategies and Generalization
  Performance in Deep Metric Learning", ICML 2020): over all unordered pairs of items, a pair is a
  true positive when it shares both cluster and class; precision = TP / pairs in the same cluster,
  recall = TP / pairs of the same class, F1 = 2 P R / (P + R).
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch


def _pairs(counts: np.ndarray) -> float:
    counts = counts.astype(np.float64)
    return float((counts * (counts - 1) / 2).sum())


def pairwise_f1(cluster_ids, labels) -> float:
    """Pairwise F1 of a clustering against the classes, from the contingency table (no O(N^2) loop)."""
    cluster_ids, labels = np.asarray(cluster_ids).ravel(), np.asarray(labels).ravel()
    if cluster_ids.shape != labels.shape:
        raise ValueError(f"cluster_ids ({cluster_ids.size}) and labels ({labels.size}) differ in length")
    _, cluster_code = np.unique(cluster_ids, return_inverse=True)
    _, class_code = np.unique(labels, return_inverse=True)
    num_classes = int(class_code.max()) + 1 if class_code.size else 1
    joint = np.bincount(cluster_code * num_classes + class_code)  # contingency table, flattened
    true_positives = _pairs(joint)
    same_cluster = _pairs(np.bincount(cluster_code))
    same_class = _pairs(np.bincount(class_code))
    if true_positives == 0:
        return 0.0
    precision, recall = true_positives / same_cluster, true_positives / same_class
    return 2 * precision * recall / (precision + recall)


def clustering_metrics(embeddings, labels, *, num_clusters: Optional[int] = None, seed: int = 0) -> Dict[str, float]:
    """``{'NMI', 'F1'}`` of k-means on ``embeddings`` (N, D) with ``num_clusters`` (default: #classes)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    x = embeddings.detach().float().cpu().numpy() if isinstance(embeddings, torch.Tensor) else np.asarray(embeddings, np.float32)
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if x.ndim != 2 or y.shape != (len(x),):
        raise ValueError(f"embeddings {x.shape} must be (N, D) and labels {y.shape} must be (N,)")
    num_clusters = num_clusters or len(np.unique(y))
    if not 1 <= num_clusters <= len(x):
        raise ValueError(f"num_clusters={num_clusters} must be in 1..{len(x)}")
    cluster_ids = KMeans(n_clusters=num_clusters, n_init=10, random_state=seed).fit_predict(x)
    return {"NMI": float(normalized_mutual_info_score(y, cluster_ids)), "F1": pairwise_f1(cluster_ids, y)}


__all__ = ["clustering_metrics", "pairwise_f1"]
