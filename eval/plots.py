"""Pictures from result files: loss terms and the kNN monitor from a run's log.csv, and a t-SNE of embeddings."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import numpy as np

LOSS_COLUMNS = ("loss", "loss_base", "loss_clsp")
TSNE_MIN_POINTS = 5


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig) -> bytes:
    """The figure as PNG bytes without a timestamp (so equal plots are equal files); closes it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, metadata={"Software": None})
    pyplot().close(fig)
    return buffer.getvalue()


def save_figure(fig, out_png: str | Path) -> Path:
    """The figure as a PNG, written through the no-overwrite rule."""
    from clsp.eval import write_new

    return write_new(out_png, figure_png(fig))


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


def rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    """(N,) -> (N,) mean of each value and the up to window-1 before it (the first ones average what there is)."""
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - window)
    return (sums[ends] - sums[starts]) / (ends - starts)


def plot_training(log_csv: str | Path, out_png: str | Path, title: str = "") -> Path:
    """Each loss term against step, as a mean over the last epoch's steps (raw per-step values faint behind it), and,
    when the run had a kNN monitor, its top-1 in percent where it was measured (a second panel)."""
    plt = pyplot()
    log = read_log(log_csv)
    steps = log.get("step", np.arange(len(next(iter(log.values())))))
    knn = log.get("knn_top1_pct")
    if knn is None and log.get("knn_top1") is not None:  # logs before the percent column held a fraction
        knn = log["knn_top1"] * 100.0
    monitored = knn is not None and np.isfinite(knn).any()
    fig, axes = plt.subplots(1, 2 if monitored else 1, figsize=(10 if monitored else 5.5, 3.6), squeeze=False)
    ax_loss = axes[0, 0]
    epochs = log.get("epoch")
    window = max(1, int(np.sum(epochs == epochs[0]))) if epochs is not None and len(epochs) else 1  # steps per epoch
    for col in LOSS_COLUMNS:
        values = log.get(col)
        if values is not None and np.isfinite(values).any():
            keep = np.isfinite(values)
            line, = ax_loss.plot(steps[keep], rolling_mean(values[keep], window), label=col, lw=1.4)
            ax_loss.plot(steps[keep], values[keep], color=line.get_color(), lw=0.6, alpha=0.25)
    ax_loss.set(xlabel="step", ylabel="loss", title=f"loss terms (mean over {window} steps; raw faint)")
    ax_loss.legend(frameon=False)
    if monitored:
        keep = np.isfinite(knn)
        axes[0, 1].plot(steps[keep], knn[keep], marker="o", ms=3)
        axes[0, 1].set(xlabel="step", ylabel="kNN top-1 (%)", title="kNN monitor (k 20, train -> test split)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, out_png)


def plot_tsne(
    features: np.ndarray,
    labels: np.ndarray,
    out_png: str | Path,
    title: str = "",
    max_points: int = 2000,
    seed: int = 0,
    class_names: list[str] | None = None,
) -> Path:
    """2-D t-SNE (scikit-learn) of (N, D) features, points coloured by label, one legend entry per class present (its
    name from `class_names` when the source has names, else its number); a seeded subsample above max_points."""
    from matplotlib.lines import Line2D

    from sklearn.manifold import TSNE

    plt = pyplot()
    if features.shape[0] != labels.shape[0] or features.shape[0] < TSNE_MIN_POINTS:
        raise ValueError(f"t-SNE needs >= {TSNE_MIN_POINTS} features with one label each, got {features.shape} and "
                         f"{labels.shape}")
    rows = np.random.default_rng(seed).permutation(features.shape[0])[:max_points]
    feats = features[rows] / (np.linalg.norm(features[rows], axis=1, keepdims=True) + 1e-12)  # cosine geometry
    perplexity = float(min(30, (len(rows) - 1) / 3))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(feats)  # (n, 2)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    scatter = ax.scatter(xy[:, 0], xy[:, 1], c=labels[rows], cmap="tab10" if labels.max() < 10 else "tab20", s=6)
    present = np.unique(labels[rows])  # (C,)
    name = (lambda v: class_names[v]) if class_names and present.max() < len(class_names) else str  # noqa: E731
    handles = [Line2D([], [], ls="", marker="o", ms=5, color=scatter.cmap(scatter.norm(v)), label=name(int(v)))
               for v in present]
    ax.legend(handles=handles, title="class", fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1, 0.5))
    ax.set(xticks=[], yticks=[], title=title or "t-SNE of embeddings")
    fig.tight_layout()
    return save_figure(fig, out_png)


def plot_run(run_dir: str | Path, out_dir: str | Path, weights: str | None = None) -> list[Path]:
    """A run's pictures from its files: training curves (log.csv) and a t-SNE of the test embeddings its result names
    (eval/results.json, knn.json or linear.json last written from its current weights), when present and of at least
    TSNE_MIN_POINTS test images (fewer: a note, no picture). `weights`: the current weights' sha256 when the caller
    has just checked it (eval.results.current_weights), so the backbone is not loaded a second time."""
    from clsp.eval.results import current_result, current_weights

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    written = []
    if (run_dir / "log.csv").is_file():
        written.append(plot_training(run_dir / "log.csv", out_dir / f"{run_dir.name}-training.png", run_dir.name))
    weights = weights or current_weights(run_dir)
    results = [current_result(run_dir, name, weights)[0] for name in ("results.json", "knn.json", "linear.json")]
    result = next((r for r in results if r is not None and r.get("test_features") and r.get("test_labels")), None)
    if result is not None:  # the embeddings, labels and class names of one evaluation of these weights
        # file names only: a result names files beside it in eval/, never a path elsewhere
        features, labels = (_saved_array(run_dir / "eval" / Path(result[key]).name)
                            for key in ("test_features", "test_labels"))
        if len(labels) < TSNE_MIN_POINTS:
            print(f"note: no t-SNE of {run_dir.name}: {len(labels)} test images, it needs {TSNE_MIN_POINTS}",
                  file=sys.stderr)
        else:
            written.append(plot_tsne(features, labels, out_dir / f"{run_dir.name}-tsne.png", f"{run_dir.name}: test",
                                     class_names=result.get("class_names") or None))
    return written


def _saved_array(path: Path) -> np.ndarray:
    """An array evaluation saved in a run's eval/ (np.save, no pickle): a regular file only, so that a FIFO or a
    device a stranger's run folder holds under that name is never read (UserError)."""
    import io

    from clsp.errors import UserError
    from clsp.eval.features import MAX_FEATURE_BYTES
    from clsp.file_checks import read_regular

    try:
        return np.load(io.BytesIO(read_regular(path, MAX_FEATURE_BYTES)), allow_pickle=False)
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is not an array that evaluation saved ({error}): evaluate the run again") \
            from None


SUMMARY_METRICS = (("linear_top1", "linear top-1"), ("knn_best", "kNN top-1 (best k)"))
MIN_SPAN = 10.0  # points: the accuracy axis spans at least this, so a 1-point gap does not fill the panel


def _span(values: list[float], low: float, high: float, min_span: float) -> tuple[float, float]:
    """Axis limits holding `values` with a margin, at least `min_span` wide, inside [low, high]."""
    finite = [v for v in values if np.isfinite(v)] or [0.5 * (low + high)]
    centre, half = 0.5 * (min(finite) + max(finite)), max(0.5 * min_span, 0.5 * (max(finite) - min(finite)) * 1.15)
    lo, hi = max(low, centre - half), min(high, centre + half)
    return (lo, min(high, lo + 2 * half)) if lo == low else (max(low, hi - 2 * half), hi)


def plot_summary(groups: list[dict], comparisons: list[dict], out_png: str | Path) -> Path:
    """Top row: every seed's accuracy as a point per (source, method, positives, lam) group, the mean as a black tick,
    one seed's runs of a method joined (they are paired). Bottom row, when any two modes share a seed: each paired
    difference (per-seed points, mean and 95 % interval) against a line at 0. One column per metric."""
    plt = pyplot()
    several = len({g.get("source") for g in groups}) > 1
    names = [f"{g['method']}\n{g['positives']}" + ("" if g["lam"] is None else f"\nlam {g['lam']}")
             + (f"\n{str(g.get('source')).split(' ')[0][-16:]}" if several else "") for g in groups]
    rows = 2 if comparisons else 1
    width = max(4.5, 1.1 * max(len(groups), len(comparisons)) + 1.5)
    fig, axes = plt.subplots(rows, len(SUMMARY_METRICS), figsize=(2 * width, 3.6 * rows + 0.4), squeeze=False)
    for col, (metric, label) in enumerate(SUMMARY_METRICS):
        _plot_seeds(axes[0, col], groups, names, metric, label)
        if comparisons:
            _plot_differences(axes[1, col], comparisons, metric, label)
    fig.suptitle(f"each seed (points; a seed's runs joined), mean (black); accuracy axes span >= {MIN_SPAN:.0f} points"
                 + ("\nbelow: paired differences per seed, mean and 95 % interval" if comparisons else ""), fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out_png)


def _plot_seeds(ax, groups: list[dict], names: list[str], metric: str, label: str) -> None:
    """Per-seed points of one metric, x = group; a seed's runs of one method are joined by a thin line."""
    seeds = sorted({s for g in groups for s in g["by_seed"]}, key=str)
    colours = {s: f"C{i % 10}" for i, s in enumerate(seeds)}
    values, labelled = [], set()
    for seed in seeds:
        for key in sorted({(g["source"], g["method"]) for g in groups}, key=str):
            xy = [(x, g["by_seed"][seed].get(metric)) for x, g in enumerate(groups)
                  if (g["source"], g["method"]) == key and seed in g["by_seed"]]
            xy = [(x, v) for x, v in xy if isinstance(v, (int, float)) and np.isfinite(v)]
            if xy:
                ax.plot(*zip(*xy), color=colours[seed], lw=0.6, alpha=0.5, marker="o", ms=4,
                        label=None if seed in labelled else f"seed {seed}")
                labelled.add(seed)
                values += [v for _, v in xy]
    for x, g in enumerate(groups):
        if g[metric][2]:
            ax.hlines(g[metric][0], x - 0.3, x + 0.3, color="black", lw=2)
    ax.set_ylim(*_span(values, 0.0, 100.0, MIN_SPAN))
    ax.set_xticks(np.arange(len(groups)), names, fontsize=8)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set(ylabel=f"{label} (%)", title=label)
    if seeds:
        ax.legend(frameon=False, fontsize=7, ncol=min(5, len(seeds)), loc="best")


def _plot_differences(ax, comparisons: list[dict], metric: str, label: str) -> None:
    """Paired differences of one metric: per-seed points, mean and its 95 % interval, with a line at 0."""
    ax.axhline(0.0, color="grey", lw=1)
    values = [0.0]
    for x, c in enumerate(comparisons):
        stats = c[metric]
        if not stats["diffs"]:
            continue
        ax.plot(np.full(len(stats["diffs"]), x - 0.12), stats["diffs"], "o", color="C0", ms=4, alpha=0.6)  # seeds
        low, high = stats["interval"]
        if np.isfinite(low):  # beside the seeds' points, not over them
            ax.errorbar(x + 0.12, stats["mean"], yerr=[[stats["mean"] - low], [high - stats["mean"]]], fmt="s",
                        color="black", capsize=4)
            values += [low, high]
        values += list(stats["diffs"])
    names = [f"{c['method']}\n{c['mode']} − {c['against']}" + ("" if c["lam"] is None else f"\nlam {c['lam']}")
             for c in comparisons]
    ax.set_xticks(np.arange(len(comparisons)), names, fontsize=8)
    ax.set_xlim(-0.6, len(comparisons) - 0.4)
    ax.set_ylim(*_span(values, -100.0, 100.0, 4.0))
    ax.set(ylabel=f"Δ {label} (points)", title=f"paired differences: {label}")
