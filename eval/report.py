"""Compare evaluated runs: results.csv, report.md (per method a table with paired differences; a plain verdict) and
pictures.

`report` reads only the runs' eval/ result files and config.json/log.csv (eval/results.py); `write_report` (also the
study's, on k-fold scores: eval/kfold.py) compares modes seed by seed (eval/paired.py).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from clsp.eval import write_new
from clsp.eval.evaluate import RUN_KEYS
from clsp.eval.results import METRICS, aggregate, common_settings, common_setup, load_results


def _fmt(stat: tuple[float, float, int], seeds: int) -> str:
    """mean ± std over the n seeds that have the metric, naming n when it is not every one of the group's `seeds`."""
    mean, std, n = stat
    if n == 0:
        return "n/a"
    value = f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"
    if n < seeds:
        return f"{value} ({n} of {seeds} seeds)"
    return value if n > 1 else f"{value} (1 seed)"


def _fmt_interval(low: float, high: float) -> str:
    return f"[{low:+.2f}, {high:+.2f}]" if math.isfinite(low) and math.isfinite(high) else "n/a"


VERDICT_METRICS = (("linear", "linear_top1"), ("kNN best", "knn_best"))


def verdicts(comparisons: list[dict]) -> list[str]:
    """One line per paired comparison (eval.paired.paired_differences): CLSP against its baseline, against the
    augment control, and the control against the baseline, each with the mean difference and the verdict on its
    95 % interval for the linear probe and the best kNN."""
    lines = []
    several = len({c["source"] for c in comparisons}) > 1
    for c in comparisons:
        lam = "" if c["lam"] is None else f" (lam {c['lam']})"
        on = f" on {c['source']}" if several else ""
        numbers = "; ".join(f"{label} {c[key]['mean']:+.2f} points, {c[key]['verdict']}" for label, key
                            in VERDICT_METRICS if c[key]["diffs"])
        lines.append(f"- **{c['method']}**{lam}{on}, {c['name']}, {len(c[VERDICT_METRICS[0][1]]['diffs'])} paired "
                     f"seeds: {numbers or 'no numbers to compare'}.")
    return lines or ["- no two modes of one method share a seed here: nothing to compare."]


def _shards_sha256(row: dict) -> str | None:
    """The shards whose synthetic positives a run trained on (None: it trained on none)."""
    return ((row.get("training_setup") or {}).get("positives") or {}).get("shards_sha256")


def _trained_with(rows: list[dict]) -> str:
    """How one method's runs on one source were trained (common_setup has checked that they agree): the options, the
    method's settings, the anchors and the shards that gave the synthetic positives."""
    setup = next((row["training_setup"] for row in rows if row.get("training_setup")), None)
    if not setup:
        return "Trained with: not recorded (runs from before clsp recorded their training setup)."
    settings = {**setup.get("options", {}), **setup.get("method", {})}
    shown = ", ".join(f"{key} {value}" for key, value in settings.items() if value is not None)
    shards = sorted({sha[:12] for sha in map(_shards_sha256, rows) if sha})
    anchors = setup.get("anchors") or {}
    return (f"Trained with: {shown}; {anchors.get('count')} anchors at {setup.get('image_size')} px"
            + (f"; synthetic positives from shards {', '.join(shards)} (sha256)" if shards else "") + ".")


def _method_tables(groups: list[dict], comparisons: list[dict]) -> list[str]:
    """Per (source, method): how its runs were trained, mode rows with mean ± std and the paired difference against
    the baseline; then every comparison with its per-seed differences, both intervals and the verdict."""
    md = []
    for source, method in sorted({(g["source"], g["method"]) for g in groups}, key=str):
        mine = [c for c in comparisons if (c["source"], c["method"]) == (source, method)]
        vs_none = {(c["mode"], c["lam"]): c for c in mine if c["against"] == "none"}
        rows = [row for g in groups if (g["source"], g["method"]) == (source, method) for row in g["by_seed"].values()]
        md += [f"### {method} on {source}", "", _trained_with(rows), "",
               "| positives | lam | seeds | kNN best k | kNN k=20 | linear top-1 | Δ kNN best vs none [95 %] | "
               "Δ linear vs none [95 %] |", "|---|---|---|---|---|---|---|---|"]
        for g in (g for g in groups if (g["source"], g["method"]) == (source, method)):
            c = vs_none.get((g["positives"], g["lam"]))
            delta = [f"{c[key]['mean']:+.2f} {_fmt_interval(*c[key]['interval'])}" if c and c[key]["diffs"] else "-"
                     for key in ("knn_best", "linear_top1")]
            md.append(f"| {g['positives']} | {'-' if g['lam'] is None else g['lam']} | {len(g['seeds'])} | "
                      f"{' | '.join(_fmt(g[metric], len(g['seeds'])) for metric in METRICS)} | "
                      f"{' | '.join(delta)} |")
        if mine:
            md += ["", "| comparison | metric | seeds | per-seed differences | mean | 95 % t (seeds) | "
                   "95 % bootstrap (images x seeds) | verdict |", "|---|---|---|---|---|---|---|---|"]
            md += [f"| {c['mode']} − {c['against']} | {metric} | {', '.join(str(s) for s in c['seeds'])} | "
                   f"{', '.join(f'{d:+.2f}' for d in c[metric]['diffs'])} | {c[metric]['mean']:+.2f} | "
                   f"{_fmt_interval(*c[metric]['t'])} | {_fmt_interval(*c[metric]['bootstrap'])} | "
                   f"{c[metric]['verdict']} |" for c in mine for metric in METRICS if c[metric]["diffs"]]
        md.append("")
    return md


def report(run_dirs: list[str | Path], out: str | Path) -> dict:
    """results.csv (one row per run), report.md and plots in `out`, from each run's results.json (test split)."""
    rows = [load_results(d) for d in run_dirs]
    return write_report(rows, run_dirs, out, "the train split as kNN bank / probe training set, the test split scored")


def write_report(rows: list[dict], run_dirs: list[str | Path], out: str | Path, scoring: str) -> dict:
    """results.csv (one row per run), report.md (per method: mean ± std over seeds and paired differences with 95 %
    intervals; verdicts), summary.png and per-run pictures in `out`. `scoring`: how the rows were scored, in words."""
    from clsp.eval.paired import paired_differences
    from clsp.eval.plots import plot_run, plot_summary

    out = Path(out)
    settings = common_settings(rows)  # before any file: refuses rows scored with other settings,
    common_setup(rows)  # runs trained otherwise
    groups = aggregate(rows)  # and repeated seeds
    comparisons = paired_differences(groups, METRICS)
    csv_cols = ["run", *RUN_KEYS, "knn_best", "knn_best_k", "knn_k20", "linear_top1", "weights_sha256", "source",
                "train_fingerprint", "test_fingerprint", "run_dir", "results_file", "shards_sha256", "training"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=csv_cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:  # where each number comes from: the run folder, its result file, its shards and options
        setup = row.get("training_setup") or {}
        training = {**setup.get("options", {}), **setup.get("method", {})}
        writer.writerow({**{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()},
                         "shards_sha256": _shards_sha256(row),
                         "training": json.dumps(training, sort_keys=True) if training else None})
    csv_path = write_new(out / "results.csv", buffer.getvalue())
    probe, ks = settings.get("probe") or {}, settings["ks"]
    sources = sorted({g["source"] for g in groups})
    lines = verdicts(comparisons)
    md = ["# Results", "", f"{len(rows)} runs on {'; '.join(sources)}, scored with {scoring}; runs on different data "
          f"are never averaged together. Mean ± sample std over seeds; per-run numbers in `{csv_path.name}`. kNN: "
          f"weighted by exp(cos/{settings['temperature']}), best k of {min(ks)}..{max(ks)} and k=20. Linear probe: "
          f"{probe.get('epochs')} epochs SGD lr "
          f"{probe.get('lr')}, batch {probe.get('batch_size')}, on "
          f"{'standardised' if probe.get('standardize', True) else 'raw'} frozen features.", "",
          "Δ: the paired difference against the baseline (none) of the same seed, in points, with its 95 % interval: "
          "the union of a Student-t interval over seeds and, where runs carry per-image scores, a paired bootstrap "
          "over images x seeds. Verdict: better only when that interval lies above 0, worse when below, else within "
          "noise.", "", *_method_tables(groups, comparisons), "## Verdict", "", *lines, "", "## Pictures", ""]
    summary_png = plot_summary(groups, comparisons, out / "summary.png")
    md.append(f"![per-seed accuracy and paired differences]({summary_png.name})")
    for run_dir, row in zip(run_dirs, rows):  # each row's weights_sha256: its run's current weights, checked above
        for png in plot_run(run_dir, out / "pictures", row.get("weights_sha256")):
            md.append(f"![{png.stem}]({png.relative_to(out).as_posix()})")
    md_path = write_new(out / "report.md", "\n".join(md) + "\n")
    return {"report": str(md_path), "csv": str(csv_path), "groups": groups, "comparisons": comparisons,
            "verdicts": lines}
