"""Evaluation: exact chunked retrieval metrics, clustering metrics, the paper's test protocol."""
from lib.evaluation.clustering import clustering_metrics, pairwise_f1
from lib.evaluation.metrics import positive_ranks, retrieval_metrics, tile_columns

__all__ = ["retrieval_metrics", "positive_ranks", "tile_columns", "clustering_metrics", "pairwise_f1"]
