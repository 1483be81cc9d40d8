from lib.evaluation.metrics import positive_ranks, retrieval_metrics

__all__ = ["retrieval_metrics", "positive_ranks"]
