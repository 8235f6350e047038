"""Weighted k-nearest-neighbour classification on frozen embeddings (the kNN monitor of InstDisc/solo-learn).

Features are L2-normalised, similarity is cosine, and each of the k neighbours votes for its label with weight
exp(sim / temperature). The test set is processed in chunks so that a 10k x 50k similarity matrix is never held whole.
One classifier for eval/knn.py (accuracy over a grid of k) and the training loop's kNN monitor.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

KNN_KS = (5, 10, 20, 50, 100, 200)  # the paper's grid
KNN_TEMPERATURE = 0.07


def check_labels(labels: np.ndarray, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{name} holds unknown labels (-1): kNN needs a labelled split; pick a source with labels")
    return labels.astype(np.int64)


def knn_predict(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    ks: tuple[int, ...] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    num_classes: int | None = None,
    chunk_size: int = 512,
    device: str | torch.device = "cpu",
) -> dict[int, np.ndarray]:
    """Predicted labels (N_test,) for each k in `ks`, k capped at the train size (duplicates after capping dropped)."""
    train_labels = check_labels(train_labels, "train_labels")
    if train_features.shape[0] != train_labels.shape[0] or train_features.shape[0] == 0:
        raise ValueError(
            f"train_features has {train_features.shape[0]} rows but train_labels has {train_labels.shape[0]}: "
            "pass the labels of the same (non-empty) split"
        )
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"feature widths differ: train {train_features.shape[1]}, test {test_features.shape[1]}")
    if temperature <= 0 or chunk_size <= 0 or not ks or min(ks) <= 0:
        raise ValueError("temperature and chunk_size must be > 0 and ks a non-empty tuple of positive ints")
    n_train = train_features.shape[0]
    capped = sorted({min(k, n_train) for k in ks})
    k_max = capped[-1]
    classes = int(num_classes) if num_classes is not None else int(train_labels.max()) + 1

    bank = F.normalize(torch.as_tensor(train_features, dtype=torch.float32, device=device), dim=1)  # (N_train, D)
    bank_labels = torch.as_tensor(train_labels, device=device)  # (N_train,)
    preds: dict[int, list[torch.Tensor]] = {k: [] for k in capped}
    for start in range(0, test_features.shape[0], chunk_size):
        query = torch.as_tensor(test_features[start : start + chunk_size], dtype=torch.float32, device=device)
        query = F.normalize(query, dim=1)  # (B, D)
        sim = query @ bank.T  # (B, N_train) cosine similarities
        top_sim, top_idx = sim.topk(k_max, dim=1)  # (B, k_max), sorted descending
        weights = (top_sim / temperature).exp()  # (B, k_max)
        one_hot = F.one_hot(bank_labels[top_idx], classes).to(weights.dtype)  # (B, k_max, C)
        votes = (weights.unsqueeze(-1) * one_hot).cumsum(dim=1)  # (B, k_max, C): row j = votes of the j+1 nearest
        for k in capped:
            preds[k].append(votes[:, k - 1].argmax(dim=1).cpu())  # ties -> lowest class index
    return {k: torch.cat(p).numpy() if p else np.zeros(0, np.int64) for k, p in preds.items()}
