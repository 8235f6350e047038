"""kNN evaluation on frozen embeddings: top-1 accuracy over the paper's grid of k, and the best k.

The classifier itself (weighted votes, cosine similarity) is clsp.knn.knn_predict, shared with the training loop's
kNN monitor (train/ does not import eval/).
"""

from __future__ import annotations

import numpy as np
import torch

# KNN_* are imported from here by the rest of eval
from clsp.knn import KNN_KS, KNN_TEMPERATURE, check_labels, knn_predict  # noqa: F401


def knn_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    ks: tuple[int, ...] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    chunk_size: int = 512,
    device: str | torch.device = "cpu",
) -> dict[int, float]:
    """Top-1 accuracy in percent for each (capped) k: {k: top1}."""
    test_labels = check_labels(test_labels, "test_labels")
    if test_features.shape[0] != test_labels.shape[0] or test_labels.size == 0:
        raise ValueError("test_features and test_labels must have the same, non-zero number of rows")
    num_classes = int(max(np.max(train_labels), test_labels.max())) + 1
    preds = knn_predict(train_features, train_labels, test_features, ks, temperature, num_classes, chunk_size, device)
    return {k: float((p == test_labels).mean() * 100.0) for k, p in preds.items()}


def best_k(accuracies: dict[int, float]) -> tuple[int, float]:
    """(k, top1) of the best k; the smallest k wins a tie."""
    k = max(sorted(accuracies), key=lambda key: accuracies[key])
    return k, accuracies[k]
