"""Read runs' result files (with the identity keys of their config.json) and group them over seeds.

A group is (source, method, positives, lam): runs scored on different data are never averaged together, nor one seed
counted twice.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from clsp.errors import UserError
from clsp.eval import latest
from clsp.eval.evaluate import run_identity

METRICS = ("knn_best", "knn_k20", "linear_top1")


def load_results(run_dir: str | Path) -> dict:
    """The newest results.json of a run (else its knn.json + linear.json), with identity keys from config.json."""
    run_dir = Path(run_dir)
    path = latest(run_dir / "eval" / "results.json")
    parts = [path] if path is not None else [latest(run_dir / "eval" / n) for n in ("knn.json", "linear.json")]
    if None in parts:
        raise UserError(f"{run_dir} has no eval/results.json (nor knn.json and linear.json): run "
                        f"`clsp eval all {run_dir} ...` (or study) first")
    result = {}
    for part in parts:  # knn.json and linear.json share the run's identity keys
        result.update(json.loads(part.read_text()))
    return with_identity(result, run_dir)


def with_identity(result: dict, run_dir: str | Path) -> dict:
    """A result file's dict with the run's identity keys from its config.json (they win) and run / run_dir."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if config_path.is_file():
        result.update(run_identity(json.loads(config_path.read_text())))
    result.setdefault("run", run_dir.name)
    result["run_dir"] = str(run_dir)
    return result


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """(mean, sample std with ddof=1 (NaN for one value), n) over the finite values."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan, 0
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan, len(vals)


def source_label(row: dict) -> str:
    """The data a result was scored on: source spec (and test source when another), with the first digits of the train
    and test fingerprints when recorded (one when they are the same images, as in k-fold scoring). Runs with other
    labels are never averaged together."""
    spec, test = row.get("source"), row.get("test_source")
    label = str(spec) if test in (None, spec) else f"{spec} + test {test}"
    train_fp, test_fp = row.get("train_fingerprint"), row.get("test_fingerprint")
    if not (train_fp and test_fp):
        return label
    return label + (f" ({train_fp[:8]})" if train_fp == test_fp else f" ({train_fp[:8]}/{test_fp[:8]})")


MODE_ORDER = ("none", "augment", "synthetic")  # the baseline, its control, CLSP


def _group_order(source, method, positives, lam) -> tuple:
    """Sort key: by source and method, then the baseline, the control and CLSP, then lam."""
    mode = MODE_ORDER.index(positives) if positives in MODE_ORDER else len(MODE_ORDER)
    return str(source), str(method), mode, str(positives), str(lam)


def aggregate(rows: list[dict]) -> list[dict]:
    """Group run rows by (source, method, positives, lam); each metric -> (mean, std, n) over the group's seeds, and
    by_seed {seed: row} for paired comparisons.

    Refuses a seed twice in a group (the same run given twice, or a rerun): the spread would be no spread over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((source_label(row), row.get("method"), row.get("positives"), row.get("lam")), []).append(row)
    out = []
    for (source, method, positives, lam), members in sorted(groups.items(), key=lambda kv: _group_order(*kv[0])):
        seen: dict[object, str] = {}
        for row in members:
            where = row.get("run_dir", row.get("run"))
            if row.get("seed") in seen:
                raise UserError(f"{seen[row.get('seed')]} and {where} are both seed {row.get('seed')} of {method}/"
                                f"{positives} (lam {lam}) on {source}: a mean over seeds needs each seed once; leave "
                                f"one out, or retrain it with another --seed")
            seen[row.get("seed")] = where
        entry = {"source": source, "method": method, "positives": positives, "lam": lam,
                 "seeds": sorted(r.get("seed") for r in members), "by_seed": {r.get("seed"): r for r in members}}
        for metric in METRICS:
            entry[metric] = mean_std([r.get(metric) for r in members])
        out.append(entry)
    return out
