"""Ranking quality: ROC AUC and LogLoss (the offline figures; Prometheus metrics live in `ranker/serving/metrics.py`)."""

from __future__ import annotations

import numpy as np


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties counted half."""
    labels = np.asarray(labels)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        raise ValueError("AUC needs both labels")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = np.asarray(scores)[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    boundaries = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1, len(scores)]
    for low, high in zip(boundaries[:-1], boundaries[1:], strict=False):
        ranks[order[low:high]] = (low + high + 1) / 2.0  # average 1-based rank of the tie group
    return float((ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def logloss(labels: np.ndarray, scores: np.ndarray) -> float:
    p = np.clip(np.asarray(scores, dtype=np.float64), 1e-7, 1 - 1e-7)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def auc_or_none(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """The AUC where `labels` hold both labels, else None (a slice or a day with one label has none)."""
    return auc(labels, scores) if len(np.unique(labels)) == 2 else None
