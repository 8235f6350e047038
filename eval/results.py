"""Read runs' result files (with the identity keys of their config.json) and group them over seeds.

A result is this run's only when it was computed from the run's current weights: a retrained run (`clsp train run
--overwrite`) keeps the eval/ files of its earlier weights, and they are never reported under its new config.

A group is (source, method, positives, lam): runs scored on different data are never averaged together, nor one seed
counted twice; runs of one method trained otherwise (training_setup) and rows scored with other evaluation settings
(probe, kNN ks or temperature, folds) are never compared in one report.
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import numpy as np

from clsp.errors import UserError
from clsp.file_io import read_json
from clsp.eval import readable_results, series, written_order
from clsp.eval.evaluate import RUN_KEYS, run_identity
from clsp.eval.knn import KNN_KS, KNN_TEMPERATURE

METRICS = ("knn_best", "knn_k20", "linear_top1")
# keys on which a run's knn.json and linear.json must agree to be read as one result: the same weights and data
SAME_INPUTS = ("weights_sha256", "source", "test_source", "train_fingerprint", "test_fingerprint")


def current_weights(run_dir: str | Path) -> str | None:
    """weights_sha256 of the run's backbone.safetensors, as evaluation records it; None when it has none."""
    from clsp.hashing import weights_sha256
    from clsp.train.checkpoint import BACKBONE, load_backbone

    return weights_sha256(load_backbone(run_dir)[0]) if (Path(run_dir) / BACKBONE).is_file() else None


def current_result(run_dir: str | Path, name: str, weights: str | None) -> tuple[dict | None, Path | None]:
    """(the result of the series eval/<name> last written from `weights` (current_weights; None: unknown), with its
    file as `results_file`, or None; the newest file of the series when none is, or None).

    The last written, not the highest number: a rerun replaces its own file in place (eval.write_result), so after
    A, B, A again it is A's file that was asked for last, as its `written` says. File times choose only among results
    of one weights from before clsp recorded `written`, never between weights: a copy of the folder does not keep
    them."""
    files = series(Path(run_dir) / "eval" / name)
    if not files:
        return None, None
    found = readable_results(files)
    weights = weights or _latest_weights(run_dir, found)
    mine = [(path, result) for path, result in found if weights in (None, result.get("weights_sha256"))]
    if not mine:
        return None, files[-1]
    # the highest `written` (eval.write_result); between results from before clsp recorded it, the file time
    path, result = max(mine, key=lambda one: (written_order(one[1]), one[0].stat().st_mtime_ns, files.index(one[0])))
    if len(mine) > 1:
        unordered = sum(written_order(other) == written_order(result) for _, other in mine) > 1
        how = "by file time, which a copy of the folder does not keep" if unordered else "as its `written` records"
        _note_once(f"note: {Path(run_dir) / 'eval'} holds {len(mine)} results of these weights from other inputs "
                   f"({', '.join(p.name for p, _ in mine)}): using {path.name}, the last written ({how}); move the "
                   f"others out of eval/ to use another")
    return {**result, "results_file": path.name}, None


@functools.lru_cache(maxsize=None)
def _note_once(message: str) -> None:
    """Print `message` on stderr the first time only: a command reads a run's result for several parts (table,
    pictures, report), and one note per choice is enough."""
    print(message, file=sys.stderr)


def _latest_weights(run_dir: str | Path, found: list[tuple[Path, dict]]) -> str | None:
    """For a run whose weights are unknown (no backbone.safetensors): the weights of its last written result that
    records them (the highest `written`, eval.write_result; between results from before clsp recorded it, the
    highest-numbered file), or None. Both hold in any copy of the folder; file times would not (cp -r, rsync and git
    write them anew, in their own order). The file number alone would not either: a result whose inputs come back
    (weights retrained to the same bytes) is rewritten in place, under its old number."""
    recorded = [(written_order(result), i, path, result["weights_sha256"])
                for i, (path, result) in enumerate(found) if result.get("weights_sha256")]
    if not recorded:
        return None
    *_, path, sha = max(recorded)
    if len({one[-1] for one in recorded}) > 1:
        print(f"warning: {run_dir} has no backbone.safetensors and its eval/ holds results of "
              f"{len({one[-1] for one in recorded})} weights: using those of {path.name} (weights {sha[:12]}), the "
              f"last evaluated; the others were scored before it was trained again", file=sys.stderr)
    return sha


def run_sources(run_dir: str | Path) -> set[str]:
    """Every source spec a run names: the data its shards were made from (config.json) and the data its eval/ results
    were scored on (source, test_source). A file that cannot be read names none."""
    from clsp.eval.evaluate import trained_source
    from clsp.file_checks import small_json

    run_dir = Path(run_dir)
    config = small_json(run_dir / "config.json")
    specs = {(trained_source(config) or {}).get("spec")} if isinstance(config, dict) else set()
    eval_dir = run_dir / "eval"
    for _, result in readable_results(sorted(eval_dir.glob("*.json")) if eval_dir.is_dir() else []):
        specs |= {result.get("source"), result.get("test_source")}
    return {spec for spec in specs if isinstance(spec, str)}


def _stale(run_dir: Path, path: Path) -> UserError:
    return UserError(f"{path} was not computed from {run_dir}'s current weights (the run was trained again since), so "
                     f"it is not this run's score: evaluate the run again, `clsp eval all {run_dir} --shards SHARDS "
                     f"--out DIR` (or `clsp eval knn|linear {run_dir}`)")


def load_results(run_dir: str | Path) -> dict:
    """The run's result from its current weights: the last written results.json, else its knn.json and linear.json
    when they agree on weights and data; with identity keys from config.json. A UserError when there is none."""
    run_dir = Path(run_dir)
    weights = current_weights(run_dir)
    result, stale = current_result(run_dir, "results.json", weights)
    if result is None:
        (knn, stale_knn), (linear, stale_linear) = (current_result(run_dir, n, weights)
                                                    for n in ("knn.json", "linear.json"))
        stale = stale or stale_knn or stale_linear
        if knn is None or linear is None:
            if stale is not None:
                raise _stale(run_dir, stale)
            if (run_dir / "eval" / "kfold.json").is_file():  # a study's run: scored on folds, not a test split
                raise UserError(f"{run_dir} holds k-fold scores of `clsp eval study` (eval/kfold.json), which a report "
                                f"of test-split scores does not mix in: read the study's own report (its --out), or "
                                f"run `clsp eval all {run_dir} ...` to score it on the test split too")
            raise UserError(f"{run_dir} has no eval/results.json (nor knn.json and linear.json): run "
                            f"`clsp eval all {run_dir} ...` (or study) first")
        differ = [key for key in SAME_INPUTS if knn.get(key) != linear.get(key)]
        if differ:
            raise UserError(f"{run_dir}/eval/{knn['results_file']} and {linear['results_file']} were computed from "
                            f"other {', '.join(differ)}: they are not one result; run `clsp eval all {run_dir} ...` "
                            f"(or `clsp eval knn` and `linear` with the same options)")
        settings = {**(linear.get("eval_config") or {}), **{key: (knn.get("eval_config") or {}).get(key)
                                                              for key in ("ks", "temperature")}}
        result = {**knn, **linear, "eval_config": settings}  # the probe's settings from linear, kNN's from knn
    if weights is None:
        print(f"warning: {run_dir} has no backbone.safetensors, so its eval/ results cannot be checked against its "
              f"weights: they are its scores only if it was not trained again since", file=sys.stderr)
    return with_identity(result, run_dir)


def with_identity(result: dict, run_dir: str | Path) -> dict:
    """A result file's dict with the run's identity keys and training setup from its config.json (they win) and
    run / run_dir."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if config_path.is_file():
        from clsp.run_dir import read_record
        from clsp.train.loop import TRAIN_RUN

        config = read_json(config_path)  # a regular file of bounded size
        recorded = read_record(run_dir, TRAIN_RUN)  # as today's clsp writes it (older ones listed other methods' keys)
        result.update(run_identity(config), training_setup=training_setup(recorded or config))
    result["run"], result["run_dir"] = run_dir.name, str(run_dir)  # the folder given, also when copied or renamed
    return result


# training options that change how a run is computed, not what it learns (besides its identity keys and train's
# OPERATIONAL ones): the anchors' order (in-memory cache, shuffle buffer) and rounding (bf16, compile), as another seed
# would; checks; and those the record holds resolved (the image size, METHOD_SETTINGS under "method")
HOW_COMPUTED = ("cache", "shuffle_buffer", "bf16", "compile", "skip_corrupt", "expect_k", "image_size")


def training_setup(run_config: dict) -> dict:
    """What a run learned from besides its identity (method, positives, lam, seed): its training options, the method's
    resolved settings, the anchors it trained on and, for synthetic positives, the shards that gave them. Runs that
    differ here are not seeds of one experiment."""
    from dataclasses import fields

    from clsp.train.loop import METHOD_SETTINGS, OPERATIONAL, TrainConfig

    section = lambda name: run_config.get(name) if isinstance(run_config.get(name), dict) else {}  # noqa: E731
    options, method, data = section("config"), section("method"), section("data")
    if options:  # options added since a run was recorded read as their defaults, as a resume reads them
        options = {**{f.name: f.default for f in fields(TrainConfig)}, **options}
    not_setup = {*OPERATIONAL, *HOW_COMPUTED, *METHOD_SETTINGS, *RUN_KEYS}
    setup = {"options": {k: v for k, v in options.items() if k not in not_setup},
             "method": {k: v for k, v in method.items() if k not in ("lam", "positives")},
             "image_size": run_config.get("image_size"),
             "anchors": {"fingerprint": (data.get("source") or {}).get("fingerprint"), "count": data.get("count"),
                         "world_size": data.get("world_size")}}
    if options.get("positives", run_config.get("positives")) == "synthetic":
        setup["positives"] = {"shards_sha256": data.get("shards_sha256")}
    return setup


def common_setup(rows: list[dict]) -> None:
    """Refuse runs of one method on one source trained otherwise (epochs, batch, anchors...), or synthetic runs at one
    lam on other shards: they would be averaged as seeds of one row, or paired against a baseline, as if they differed
    only in seed or in the CLSP term."""
    from clsp.run_dir import record_differences

    seen: dict[tuple, tuple[dict, dict]] = {}
    for row, label in zip(rows, data_labels(rows)):
        setup = row.get("training_setup") or {}
        where = (label, row.get("method"))
        checks = [(where, {part: value for part, value in setup.items() if part != "positives"})]
        if "positives" in setup:  # the shards matter where their positives are used
            checks.append(((*where, row.get("lam")), {"positives": setup["positives"]}))
        for key, value in checks:
            earlier, first = seen.setdefault(key, (value, row))
            differ = record_differences(earlier, value)
            if differ:
                raise UserError(f"{first.get('run_dir', first.get('run'))} and {row.get('run_dir', row.get('run'))} "
                                f"are both {row.get('method')} runs on {where[0]} but were trained otherwise "
                                f"({'; '.join(differ[:4])}): their scores neither average as seeds nor pair against "
                                f"a baseline; report them apart (one `clsp eval report` each), or train them alike")


# evaluation settings a score depends on besides weights and data, each with the score it matters for (None: all)
SETTINGS = {"ks": "knn_best", "temperature": "knn_best", "probe": "linear_top1", "folds": None}


def scoring_settings(row: dict) -> dict:
    """A row's evaluation settings (k-fold: its `scoring`; else its `eval_config`) that its scores depend on."""
    config = row.get("scoring") or row.get("eval_config") or {}
    return {key: config[key] for key, metric in SETTINGS.items()
            if key in config and (metric is None or row.get(metric) is not None)}


def _what_differs(key: str, a, b) -> str:
    """"probe.epochs 30 vs 100" (of two dicts, only the keys that differ), else "ks [5, 20] vs [5]"."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return f"{key} {a} vs {b}"
    return ", ".join(f"{key}.{k} {a.get(k)} vs {b.get(k)}" for k in sorted({*a, *b}) if a.get(k) != b.get(k))


def common_settings(rows: list[dict]) -> dict:
    """The evaluation settings every row was scored with (kNN ks and temperature default when none records them); a
    UserError naming two runs scored with other settings: their numbers are not comparable, in a table or a pair."""
    seen: dict[str, tuple] = {}
    for row in rows:
        for key, value in scoring_settings(row).items():
            first, where = seen.setdefault(key, (value, row.get("run_dir", row.get("run"))))
            if value != first:
                raise UserError(f"{where} and {row.get('run_dir', row.get('run'))} were scored with other settings "
                                f"({_what_differs(key, first, value)}): their numbers do not compare; evaluate them "
                                f"again with the same settings (e.g. the same --preset and --probe-epochs), or report "
                                f"them apart")
    return {"ks": list(KNN_KS), "temperature": KNN_TEMPERATURE, **{key: value for key, (value, _) in seen.items()}}


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


def data_labels(rows: list[dict]) -> list[str]:
    """Each row's source label, one per data: rows with the same train and test fingerprints read the same images
    whatever their specs' spelling (folder:data, folder:./data, an absolute path; digits, digits:), so they share
    one label (the first of their labels in sort order); rows without fingerprints keep their own."""
    def data(row: dict) -> tuple | str:
        fingerprints = row.get("train_fingerprint"), row.get("test_fingerprint")
        return fingerprints if all(fingerprints) else source_label(row)

    names: dict = {}
    for row in rows:
        names[data(row)] = min(names.get(data(row), source_label(row)), source_label(row))
    return [names[data(row)] for row in rows]


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
    for row, label in zip(rows, data_labels(rows)):
        groups.setdefault((label, row.get("method"), row.get("positives"), row.get("lam")), []).append(row)
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
