"""Paired differences between modes of one method, seed by seed, with 95 % intervals and the verdict that reads them.

Runs of the same method and seed start from the same weights and see the same batches, so the difference of two modes
at one seed cancels much of the seed-to-seed spread. Per comparison and metric: the per-seed differences, their mean
with a Student-t interval over seeds and, where runs carry per-image scores (k-fold), a paired bootstrap over images x
seeds. The verdict reads the union of the two intervals: "better" only when it lies above 0, "worse" when below.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

LEVEL = 0.95
# (mode, against, name): synthetic positives against the baseline and against the third-real-view control
COMPARISONS = (("synthetic", "none", "CLSP vs its baseline (none)"),
               ("synthetic", "augment", "CLSP vs the augment control"),
               ("augment", "none", "the augment control vs the baseline (none)"))


def paired_interval(diffs: Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, low, high) of per-seed differences: mean ± t((1 + level) / 2, n - 1) x sd / sqrt(n); NaN bounds below
    two seeds (no spread, so no interval)."""
    from scipy.special import stdtrit  # inverse Student-t CDF (scipy.stats costs seconds to import)

    d = np.asarray(diffs, dtype=float)
    if d.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(d.mean())
    if d.size < 2:
        return mean, math.nan, math.nan
    half = float(stdtrit(d.size - 1, (1 + level) / 2) * d.std(ddof=1) / math.sqrt(d.size))
    return mean, mean - half, mean + half


_CHUNK = 64  # bootstrap resamples drawn at once: (64, N) counts


def paired_bootstrap(diffs: np.ndarray, level: float = LEVEL, resamples: int = 2000,
                     seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean of `diffs` (S seeds, N images), resampling seeds and images with replacement.

    An image drawn counts for every seed drawn (the pairs stay paired). NaN bounds below two seeds."""
    s, n = diffs.shape
    if s < 2 or n == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    seed_counts = rng.multinomial(s, np.full(s, 1.0 / s), size=resamples)  # (B, S): times each seed is drawn
    means = np.empty(resamples)  # (B,)
    for start in range(0, resamples, _CHUNK):  # (B, N) at once would take 2 GB for CIFAR's 60,000 images
        rows = slice(start, min(start + _CHUNK, resamples))
        image_counts = rng.multinomial(n, np.full(n, 1.0 / n), size=rows.stop - start)  # (b, N): the same draws
        means[rows] = ((seed_counts[rows] @ diffs) * image_counts).sum(axis=1) / (s * n)  # as in one (B, N) call
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def interval_verdict(low: float, high: float) -> str:
    """"better" when the interval lies above 0, "worse" when below, else "within noise"; each names the interval."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "no verdict (fewer than two paired seeds: no interval)"
    interval = f"interval [{low:+.2f}, {high:+.2f}]"
    if low > 0:
        return f"better ({interval})"
    if high < 0:
        return f"worse ({interval})"
    return f"within noise ({interval})"


def _per_image(rows: list[dict], metric: str) -> np.ndarray | None:
    """(S, N) 0/1 correctness of each row's images in points (x 100), or None unless every row has the same images."""
    strings = [(row.get("correct") or {}).get(metric) for row in rows]
    ids = {tuple(row.get("ids") or ()) for row in rows}
    if not rows or not all(isinstance(s, str) for s in strings) or len(ids) != 1 or len({len(s) for s in strings}) != 1:
        return None
    return np.stack([np.frombuffer(s.encode(), dtype=np.uint8) - ord("0") for s in strings]).astype(float) * 100.0


def compare_metric(rows_a: list[dict], rows_b: list[dict], metric: str) -> dict:
    """Paired difference a - b of one metric over rows aligned seed by seed (rows_a[i] and rows_b[i]: one seed)."""
    pairs = [(a, b) for a, b in zip(rows_a, rows_b)
             if all(isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric]) for r in (a, b))]
    diffs = [a[metric] - b[metric] for a, b in pairs]
    mean, low, high = paired_interval(diffs)
    boot = (math.nan, math.nan)
    correct_a, correct_b = _per_image([a for a, _ in pairs], metric), _per_image([b for _, b in pairs], metric)
    if correct_a is not None and correct_b is not None and correct_a.shape == correct_b.shape:
        boot = paired_bootstrap(correct_a - correct_b)
    # the verdict reads both intervals: a claim must hold over seeds and over images
    read = (min(low, boot[0]), max(high, boot[1])) if math.isfinite(boot[0]) else (low, high)
    return {"diffs": diffs, "mean": mean, "t": (low, high), "bootstrap": boot, "interval": read,
            "verdict": interval_verdict(*read)}


def paired_differences(groups: list[dict], metrics: Sequence[str]) -> list[dict]:
    """Each COMPARISON present among `groups` (eval.results.aggregate entries, with `by_seed`) on the same source and
    method, paired over the seeds both sides hold. The augment control only at the same lam (at another it controls
    for nothing); the baseline (none: no third view, so its lam is moot) at the same lam, or the only one there is."""
    out = []
    for mode, against, name in COMPARISONS:
        for group in (g for g in groups if g["positives"] == mode):
            others = [g for g in groups if g["positives"] == against and g["method"] == group["method"]
                      and g["source"] == group["source"]]
            same_lam = [g for g in others if g["lam"] == group["lam"]]
            others = same_lam or (others if against == "none" and len(others) == 1 else [])
            if not others:
                continue
            seeds = sorted(set(group["by_seed"]) & set(others[0]["by_seed"]), key=str)
            rows_a, rows_b = [group["by_seed"][s] for s in seeds], [others[0]["by_seed"][s] for s in seeds]
            entry = {"source": group["source"], "method": group["method"], "lam": group["lam"], "mode": mode,
                     "against": against, "name": name, "seeds": seeds}
            entry.update({metric: compare_metric(rows_a, rows_b, metric) for metric in metrics})
            out.append(entry)
    return sorted(out, key=lambda c: (str(c["source"]), str(c["method"])))  # stable: COMPARISONS order within
