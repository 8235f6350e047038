"""Two image sets compared in one feature space (the audit's PCA features): Frechet distance between Gaussian fits,
improved precision / recall (k-NN manifolds, Kynkaanniemi et al. 2019) and the share of confident samples."""

from __future__ import annotations

import numpy as np

CONFIDENCE = 0.9  # classifier probability that makes a sample "confident"


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """(N, c), (M, c) -> |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussian fits of the two sets."""
    from scipy import linalg

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))  # (c, c)
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():  # singular product (too few samples): offset the diagonals, as pytorch-fid does
        offset = np.eye(len(cov_a)) * 1e-6
        covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    mean_term = ((a.mean(0) - b.mean(0)) ** 2).sum()
    return float(mean_term + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean.real))  # .real: rounding


def _kth_distance(points: np.ndarray, k: int) -> np.ndarray:
    """(N, c) -> (N,) distance from each point to its k-th nearest other point (the radius of its k-NN ball)."""
    from sklearn.neighbors import NearestNeighbors

    dist, _ = NearestNeighbors(n_neighbors=k + 1).fit(points).kneighbors(points)  # (N, k + 1); column 0: itself
    return dist[:, k]


def _covered(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """(P,) bool: point p lies in the ball of some centre j (radius radii[j]), i.e. on the centres' k-NN manifold."""
    from clsp.eval.audit import pairwise_distance

    inside = np.empty(len(points), dtype=bool)
    for start in range(0, len(points), chunk):  # (chunk, C) distances at a time, never (P, C)
        dist = pairwise_distance(points[start:start + chunk], centres)
        inside[start:start + chunk] = (dist <= radii[None, :]).any(axis=1)
    return inside


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019), in %: fake in the real manifold, real in the fake."""
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} images on each side")
    precision = _covered(fake, real, _kth_distance(real, k)).mean()
    recall = _covered(real, fake, _kth_distance(fake, k)).mean()
    return float(precision * 100.0), float(recall * 100.0)


def set_metrics(reference, real_z: np.ndarray, other_z: np.ndarray, k: int) -> dict:
    """Frechet distance, precision/recall, confident share and predicted class shares of `other_z` against real_z."""
    precision, recall = precision_recall(real_z, other_z, k)
    proba = reference.classifier.predict_proba(other_z)  # (N, classes)
    predicted = proba.argmax(1)
    classes = reference.classifier.classes_
    return {
        "count": int(len(other_z)),
        "frechet_distance": frechet_distance(real_z, other_z),
        "precision_pct": precision,
        "recall_pct": recall,
        "confident_pct": float((proba.max(1) >= CONFIDENCE).mean() * 100.0),
        "class_pct": {str(c): float((predicted == i).mean() * 100.0) for i, c in enumerate(classes)},
    }
