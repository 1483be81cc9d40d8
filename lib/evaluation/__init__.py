"""Evaluation: exact chunked retrieval metrics, clustering metrics, the paper's test protocol."""
from lib.evaluation.clustering import clustering_metrics, pairwise_f1
from lib.evaluation.metrics import default_chunk_size, positive_ranks, retrieval_metrics

__all__ = ["retrieval_metrics", "positive_ranks", "default_chunk_size", "clustering_metrics", "pairwise_f1"]
