"""Evaluation: retrieval metrics and batched feature extraction."""

from upperson.evaluation.metrics import retrieval_metrics

__all__ = ["retrieval_metrics"]
