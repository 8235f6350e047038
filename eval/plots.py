"""Pictures from result files: loss terms and the kNN monitor from a run's log.csv, and a t-SNE of embeddings."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

LOSS_COLUMNS = ("loss", "loss_base", "loss_clsp")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_png: str | Path) -> Path:
    """PNG bytes without a timestamp (so equal plots are equal files), written through the no-overwrite rule."""
    from eval import write_new

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, metadata={"Software": None})
    _pyplot().close(fig)
    return write_new(out_png, buffer.getvalue())


def read_log(log_csv: str | Path) -> dict[str, np.ndarray]:
    """log.csv -> {column: float array}; empty cells (e.g. steps without a kNN check) become NaN."""
    path = Path(log_csv)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: point to a training run directory that has a log.csv")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{path} has no rows: the run logged nothing yet")
    to_float = lambda v: float(v) if v not in (None, "", "nan") else np.nan  # noqa: E731
    return {col: np.array([to_float(r.get(col)) for r in rows]) for col in rows[0]}


def plot_training(log_csv: str | Path, out_png: str | Path, title: str = "") -> Path:
    """Each loss term against step (left) and the kNN top-1 monitor where it was measured (right)."""
    plt = _pyplot()
    log = read_log(log_csv)
    steps = log.get("step", np.arange(len(next(iter(log.values())))))
    fig, (ax_loss, ax_knn) = plt.subplots(1, 2, figsize=(10, 3.6))
    for col in LOSS_COLUMNS:
        values = log.get(col)
        if values is not None and np.isfinite(values).any():
            keep = np.isfinite(values)
            ax_loss.plot(steps[keep], values[keep], label=col, lw=1.2)
    ax_loss.set(xlabel="step", ylabel="loss", title="loss terms")
    ax_loss.legend(frameon=False)
    knn = log.get("knn_top1")
    if knn is not None and np.isfinite(knn).any():
        keep = np.isfinite(knn)
        ax_knn.plot(steps[keep], knn[keep], marker="o", ms=3)
        ax_knn.set(ylabel="kNN top-1 (as logged)")
    else:
        ax_knn.text(0.5, 0.5, "no kNN monitor in this log", ha="center", va="center", transform=ax_knn.transAxes)
    ax_knn.set(xlabel="step", title="kNN monitor")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out_png)


def plot_tsne(
    features: np.ndarray,
    labels: np.ndarray,
    out_png: str | Path,
    title: str = "",
    max_points: int = 2000,
    seed: int = 0,
) -> Path:
    """2-D t-SNE (scikit-learn) of (N, D) features, points coloured by label; a seeded subsample above max_points."""
    from sklearn.manifold import TSNE

    plt = _pyplot()
    if features.shape[0] != labels.shape[0] or features.shape[0] < 5:
        raise ValueError(f"t-SNE needs >= 5 features with one label each, got {features.shape} and {labels.shape}")
    rows = np.random.default_rng(seed).permutation(features.shape[0])[:max_points]
    feats = features[rows] / (np.linalg.norm(features[rows], axis=1, keepdims=True) + 1e-12)  # cosine geometry
    perplexity = float(min(30, (len(rows) - 1) / 3))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(feats)  # (n, 2)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    scatter = ax.scatter(xy[:, 0], xy[:, 1], c=labels[rows], cmap="tab10" if labels.max() < 10 else "tab20", s=6)
    ax.legend(*scatter.legend_elements(), title="label", fontsize=7, frameon=False, loc="best")
    ax.set(xticks=[], yticks=[], title=title or "t-SNE of embeddings")
    fig.tight_layout()
    return _save(fig, out_png)


def plot_run(run_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """A run's pictures from its files: training curves (log.csv) and t-SNE of eval/test_features.npy, when present."""
    from eval import latest

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    written = []
    if (run_dir / "log.csv").is_file():
        written.append(plot_training(run_dir / "log.csv", out_dir / f"{run_dir.name}-training.png", run_dir.name))
    feats, labels = latest(run_dir / "eval" / "test_features.npy"), latest(run_dir / "eval" / "test_labels.npy")
    if feats is not None and labels is not None:
        features, label_array = np.load(feats, allow_pickle=False), np.load(labels, allow_pickle=False)
        written.append(plot_tsne(features, label_array, out_dir / f"{run_dir.name}-tsne.png", f"{run_dir.name}: test"))
    return written


def plot_summary(groups: list[dict], out_png: str | Path) -> Path:
    """Bars of linear top-1 and best kNN (mean, error bar = std over seeds) per (method, positives, lam) group."""
    plt = _pyplot()
    names = [f"{g['method']}\n{g['positives']}" + ("" if g["lam"] is None else f"\nlam {g['lam']}") for g in groups]
    x = np.arange(len(groups))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(groups) + 1), 3.8))
    for offset, metric, label in ((-0.2, "linear_top1", "linear"), (0.2, "knn_best", "kNN (best k)")):
        means = np.array([g[metric][0] for g in groups], dtype=float)
        stds = np.nan_to_num(np.array([g[metric][1] for g in groups], dtype=float))  # one seed: no bar
        ax.bar(x + offset, means, width=0.4, yerr=stds, capsize=3, label=label)
    finite = [g[m][0] for g in groups for m in ("linear_top1", "knn_best") if np.isfinite(g[m][0])]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 10), min(100.0, max(finite) + 5))
    ax.set_xticks(x, names, fontsize=8)
    ax.set(ylabel="top-1 (%)", title="test accuracy, mean ± std over seeds")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return _save(fig, out_png)
