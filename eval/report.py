"""Evaluate runs (kNN + linear probe on frozen features) and compare them: a table, pictures and a plain verdict.

Per run, `evaluate_run` writes `<run>/eval/results.json` (or knn.json / linear.json for one part) and the test-split
embeddings `<run>/eval/test_features.npy` + `test_labels.npy` that the t-SNE plot reads. `report` reads only those files
and the runs' config.json/log.csv; `write_report` (also the study's, on k-fold scores: eval/kfold.py) compares modes
seed by seed (eval/paired.py). A result is never replaced by one of other inputs; a rerun on the same inputs
replaces its own (`eval.write_new`, `eval.write_result`).

Numbers you can trust: the kNN bank / probe train set must be the data the run trained on (its config.json records the
shards' source; `--transfer` scores other data on purpose), every input is checked before anything is written, and a
report never averages runs scored on different data, nor one seed twice.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from clsp.accelerator import resolve_device
from clsp.errors import UserError
from eval import latest, write_new, write_result
from eval.knn import KNN_KS, KNN_TEMPERATURE, best_k, knn_accuracy
from eval.linear import PROBE_PRESETS, ProbeConfig, probe_backbone

RUN_KEYS = ("method", "positives", "lam", "seed")
METRICS = ("knn_best", "knn_k20", "linear_top1")
SCORES = {"linear_top1", "linear_train_top1", "knn", "knn_best", "knn_best_k", "knn_k20"}  # the rest are its inputs


@dataclass(frozen=True)
class EvalConfig:
    source: str | None = None  # labelled source spec; None: the source the run's shards were made from
    test_source: str | None = None  # the test images as their own source; None: the test split of `source`
    transfer: bool = False  # score on data other than the run's training data, on purpose
    train_split: str = "train"
    test_split: str = "test"
    knn: bool = True
    linear: bool = True
    ks: tuple[int, ...] = KNN_KS
    temperature: float = KNN_TEMPERATURE
    probe: ProbeConfig = field(default_factory=lambda: PROBE_PRESETS["fast"])
    batch_size: int = 256
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not (self.knn or self.linear):
            raise ValueError("nothing to evaluate: enable knn, linear or both")
        if self.batch_size <= 0 or self.temperature <= 0:
            raise ValueError("batch_size and temperature must be > 0")
        # the one device check, before anything is read (cached features would hide it); "auto" becomes what it means
        object.__setattr__(self, "device", str(resolve_device(self.device)))

    @property
    def results_name(self) -> str:
        return "results.json" if self.knn and self.linear else ("knn.json" if self.knn else "linear.json")


def run_identity(run_config: dict) -> dict:
    """{method, positives, lam, seed} of a run's config.json (the loop nests its options under `config` and the
    resolved method settings under `method`); lam is None for positives "none", where it has no effect."""
    options = run_config.get("config") if isinstance(run_config.get("config"), dict) else {}
    method = run_config.get("method")
    ident = {key: options.get(key, run_config.get(key)) for key in RUN_KEYS}
    if isinstance(method, dict):
        ident["method"], ident["lam"] = options.get("method"), method.get("lam", ident["lam"])
    if ident["positives"] == "none":
        ident["lam"] = None
    return ident


def trained_source(run_config: dict) -> dict | None:
    """The source the run's shards were made from, as its config.json records it: the manifest's {spec, split,
    fingerprint, count} and the shards' image_size (the size the fingerprint was taken at); None for older runs."""
    data = run_config.get("data") if isinstance(run_config.get("data"), dict) else {}
    source = data.get("source")
    if not isinstance(source, dict) or not source.get("fingerprint"):
        return None
    return {**source, "image_size": data.get("shard_image_size")}


def check_trained_on(run_dir: str | Path, record: dict | None, bank, transfer: bool) -> str:
    """Is the kNN bank / probe train set the data the run trained on? "same" (equal fingerprints at the shards' image
    size), "transfer" (not, and --transfer says so) or "unrecorded" (a run from before the record: warned); else
    a UserError naming both fingerprints and the fix."""
    from clsp.sources import open_source

    if record is None:
        print(f"warning: {run_dir} does not record the data it trained on, so {bank.name} cannot be checked against "
              f"it: its scores mean something only if that is the same data", file=sys.stderr)
        return "unrecorded"
    size = record.get("image_size") or bank.image_size
    fingerprint = (bank if size == bank.image_size else open_source(bank.spec, bank.split, size)).fingerprint()
    if fingerprint == record["fingerprint"]:
        return "same"
    if transfer:
        return "transfer"
    raise UserError(f"{run_dir} comes from {record.get('spec')}[{record.get('split')}] ({record.get('count')} "
                    f"anchors, fingerprint {record['fingerprint'][:12]}), but the kNN bank / probe train set here is "
                    f"{bank.name} ({len(bank)} images, fingerprint {fingerprint[:12]} at {size} px): evaluate on "
                    f"the data it trained on (--source {record.get('spec')}), or pass --transfer to score other data "
                    f"on purpose")


def _open_test(spec: str, split: str, size: int, explicit: bool):
    """The test split of `spec`; a --test-source whose names say no split is read whole (the user named it as test)."""
    from clsp.sources import OneSplitError, open_source

    try:
        return open_source(spec, split, image_size=size)
    except OneSplitError:
        if not explicit:
            raise
        return open_source(spec, "all", image_size=size)


def _labelled(source) -> tuple[np.ndarray, np.ndarray, str]:
    """(images (N, H, W, 3) uint8, labels (N,), fingerprint) of a source whose images all have labels."""
    from clsp.sources import load_arrays

    images, labels, _ = load_arrays(source)
    if (labels < 0).any():
        raise UserError(f"{source.name} has unlabelled images: kNN and the linear probe need a labelled source")
    return images, labels, source.fingerprint()


def _check_disjoint(train, test, train_images: np.ndarray, test_images: np.ndarray) -> None:
    """Refuse a test set that is mostly training images (the same files given as both): that scores memory."""
    seen = {hashlib.sha256(image.tobytes()).digest() for image in train_images}
    shared = sum(hashlib.sha256(image.tobytes()).digest() in seen for image in test_images)
    if 2 * shared > len(test_images):
        raise UserError(f"{shared} of the {len(test_images)} test images of {test.name} are also in {train.name}: "
                        f"score on held-out images (a test split, or --test-source naming other files)")


@dataclass
class EvalInputs:
    """Everything one evaluation reads, all checked before anything is computed or written."""

    run_dir: Path
    backbone: object  # nn.Module in eval mode
    normalize: tuple  # (mean, std) per RGB channel
    train: tuple[np.ndarray, np.ndarray, str]  # images (N, H, W, 3) uint8, labels (N,), fingerprint
    test: tuple[np.ndarray, np.ndarray, str]
    result: dict  # the start of results.json: the run's identity and the data it is scored on
    class_names: list[str]  # the source's names of the classes, by label ([] when it has none)


@dataclass
class OpenRun:
    """A run's backbone and records, and the source spec it is scored on."""

    run_dir: Path
    backbone: object  # nn.Module in eval mode
    normalize: tuple  # (mean, std) per RGB channel
    image_size: int
    record: dict | None  # trained_source(config.json)
    spec: str
    identity: dict  # run_identity(config.json)


def open_run(run_dir: str | Path, source: str | None) -> OpenRun:
    """Load a run; `source` None: the source its config.json records (a UserError when it records none). Reads only."""
    from eval.features import normalization_from_config
    from train.checkpoint import load_backbone

    run_dir = Path(run_dir)
    backbone, run_config = load_backbone(run_dir)
    record = trained_source(run_config)
    spec = source or (record or {}).get("spec")
    if spec is None:
        raise UserError(f"{run_dir}/config.json does not record the data the run trained on (a run from before clsp "
                        f"recorded it): pass --source SPEC, the source its shards were made from")
    return OpenRun(run_dir, backbone, normalization_from_config(run_config), int(run_config["image_size"]), record,
                   spec, run_identity(run_config))


def prepare_eval(run_dir: str | Path, config: EvalConfig) -> EvalInputs:
    """Load the run and its labelled data, and check them (no other source than the trained one unless --transfer;
    the same classes in both splits; a held-out test set). Reads only."""
    from clsp.hashing import weights_sha256
    from clsp.sources import open_source

    run = open_run(run_dir, config.source)
    bank = open_source(run.spec, config.train_split, image_size=run.image_size)
    check = check_trained_on(run.run_dir, run.record, bank, config.transfer)
    test = _open_test(config.test_source or run.spec, config.test_split, run.image_size,
                      explicit=config.test_source is not None)
    if bank.classes and test.classes and bank.classes != test.classes:
        raise UserError(f"{bank.name} has classes {bank.classes[:5]}... but {test.name} has {test.classes[:5]}...: a "
                        f"label would name another class in each; give splits of one dataset")
    train, held_out = _labelled(bank), _labelled(test)
    _check_disjoint(bank, test, train[0], held_out[0])
    result = dict(run.identity)
    result.update(run=run.run_dir.name, source=run.spec, test_source=test.spec, trained_on=run.record,
                  source_check=check, weights_sha256=weights_sha256(run.backbone), train_fingerprint=train[2],
                  test_fingerprint=held_out[2], eval_config=asdict(config))
    return EvalInputs(run.run_dir, run.backbone, run.normalize, train, held_out, result,
                      list(test.classes or bank.classes))


def evaluate_run(run_dir: str | Path, config: EvalConfig = EvalConfig()) -> dict:
    """kNN and/or linear probe of a run's backbone on the source's train/test splits; writes <run>/eval/ files."""
    return score_run(prepare_eval(run_dir, config), config)


def score_run(inputs: EvalInputs, config: EvalConfig) -> dict:
    """kNN and/or linear probe on prepared inputs; writes <run>/eval/ files (and the feature cache) only now."""
    from eval.features import extract_features

    (train_images, train_labels, train_fp), (test_images, test_labels, test_fp) = inputs.train, inputs.test
    backbone, (mean, std), cache = inputs.backbone, inputs.normalize, inputs.run_dir / "features"

    def features(images: np.ndarray, fingerprint: str) -> np.ndarray:  # cached per (weights, source split)
        return extract_features(backbone, images, mean, std, config.batch_size, config.device, cache, fingerprint)

    result = dict(inputs.result)
    if config.linear:  # first, so the guarded forward pass is the one that fills the feature cache
        probe = probe_backbone(backbone, train_images, train_labels, test_images, test_labels, mean, std,
                               config.probe, config.batch_size, config.device, cache_dir=cache,
                               fingerprints=(train_fp, test_fp))
        result.update(linear_top1=probe["top1"], linear_train_top1=probe["train_top1"])
    train_feats, test_feats = features(train_images, train_fp), features(test_images, test_fp)  # (N, D) each
    if config.knn:
        accs = knn_accuracy(train_feats, train_labels, test_feats, test_labels, config.ks, config.temperature)
        k, top1 = best_k(accs)
        result.update(knn={str(key): v for key, v in accs.items()}, knn_best=top1, knn_best_k=k,
                      knn_k20=accs.get(min(20, len(train_labels))))
    out = inputs.run_dir / "eval"
    write_new(out / "test_features.npy", _npy_bytes(test_feats))
    write_new(out / "test_labels.npy", _npy_bytes(test_labels.astype(np.int64)))
    if inputs.class_names:  # for the t-SNE legend (eval.plots.plot_run)
        write_new(out / "test_classes.json", json.dumps(inputs.class_names) + "\n")
    result["results_file"] = write_result(out / config.results_name, result, SCORES).name
    return result


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


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


def _fmt(stat: tuple[float, float, int]) -> str:
    mean, std, n = stat
    if n == 0:
        return "n/a"
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f} (1 seed)"


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


def _method_tables(groups: list[dict], comparisons: list[dict]) -> list[str]:
    """Per (source, method): mode rows with mean ± std and the paired difference against the baseline; then every
    comparison with its per-seed differences, both intervals and the verdict."""
    md = []
    for source, method in sorted({(g["source"], g["method"]) for g in groups}, key=str):
        mine = [c for c in comparisons if (c["source"], c["method"]) == (source, method)]
        vs_none = {(c["mode"], c["lam"]): c for c in mine if c["against"] == "none"}
        md += [f"### {method} on {source}", "",
               "| positives | lam | seeds | kNN best k | kNN k=20 | linear top-1 | Δ kNN best vs none [95 %] | "
               "Δ linear vs none [95 %] |", "|---|---|---|---|---|---|---|---|"]
        for g in (g for g in groups if (g["source"], g["method"]) == (source, method)):
            c = vs_none.get((g["positives"], g["lam"]))
            delta = [f"{c[key]['mean']:+.2f} {_fmt_interval(*c[key]['interval'])}" if c and c[key]["diffs"] else "-"
                     for key in ("knn_best", "linear_top1")]
            md.append(f"| {g['positives']} | {'-' if g['lam'] is None else g['lam']} | {len(g['seeds'])} | "
                      f"{_fmt(g['knn_best'])} | {_fmt(g['knn_k20'])} | {_fmt(g['linear_top1'])} | "
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
    from eval.paired import paired_differences
    from eval.plots import plot_run, plot_summary

    out = Path(out)
    groups = aggregate(rows)  # before any file: refuses repeated seeds
    comparisons = paired_differences(groups, METRICS)
    csv_cols = ["run", *RUN_KEYS, "knn_best", "knn_best_k", "knn_k20", "linear_top1", "weights_sha256", "source",
                "train_fingerprint", "test_fingerprint"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=csv_cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()} for row in rows)
    csv_path = write_new(out / "results.csv", buffer.getvalue())
    probe = (rows[0].get("eval_config") or {}).get("probe") or (rows[0].get("scoring") or {}).get("probe") or {}
    sources = sorted({g["source"] for g in groups})
    lines = verdicts(comparisons)
    md = ["# Results", "", f"{len(rows)} runs on {'; '.join(sources)}, scored with {scoring}; runs on different data "
          f"are never averaged together. Mean ± sample std over seeds; per-run numbers in `{csv_path.name}`. kNN: "
          f"weighted by exp(cos/0.07), best k of 5..200 and k=20. Linear probe: {probe.get('epochs')} epochs SGD lr "
          f"{probe.get('lr')}, batch {probe.get('batch_size')}, on "
          f"{'standardised' if probe.get('standardize', True) else 'raw'} frozen features.", "",
          "Δ: the paired difference against the baseline (none) of the same seed, in points, with its 95 % interval: "
          "the union of a Student-t interval over seeds and, where runs carry per-image scores, a paired bootstrap "
          "over images x seeds. Verdict: better only when that interval lies above 0, worse when below, else within "
          "noise.", "", *_method_tables(groups, comparisons), "## Verdict", "", *lines, "", "## Pictures", ""]
    summary_png = plot_summary(groups, comparisons, out / "summary.png")
    md.append(f"![per-seed accuracy and paired differences]({summary_png.name})")
    for run_dir in run_dirs:
        for png in plot_run(run_dir, out / "pictures"):
            md.append(f"![{png.stem}]({png.relative_to(out).as_posix()})")
    md_path = write_new(out / "report.md", "\n".join(md) + "\n")
    return {"report": str(md_path), "csv": str(csv_path), "groups": groups, "comparisons": comparisons,
            "verdicts": lines}


@dataclass(frozen=True)
class AllConfig:
    run_dir: str
    shards: str
    out: str
    eval: EvalConfig = field(default_factory=EvalConfig)
    audit_anchors: int = 256


def evaluate_all(cfg: AllConfig) -> dict:
    """One run end to end: kNN + linear, audit of its shards, pictures, contact sheet, report (all under cfg.out).

    Every input (run, sources, shards) is read and checked, and the audit computed, before the first file is written."""
    from eval.audit import AuditConfig, audit_shards, write_audit
    from shards.manifest import read_manifest
    from shards.sheet import contact_sheet

    out = Path(cfg.out)
    inputs = prepare_eval(cfg.run_dir, cfg.eval)
    made_from, record = read_manifest(cfg.shards).run.get("source") or {}, inputs.result["trained_on"]
    if record is not None and made_from.get("fingerprint") != record["fingerprint"]:
        raise UserError(f"{cfg.shards} were made from {made_from.get('spec')}[{made_from.get('split')}], but "
                        f"{cfg.run_dir} trained on shards made from {record.get('spec')}[{record.get('split')}] "
                        f"(other fingerprints): pass --shards the directory the run trained on")
    audit = audit_shards(cfg.shards, inputs.result["source"], AuditConfig(cfg.audit_anchors))
    results = score_run(inputs, cfg.eval)
    audit_json, audit_md = write_audit(audit, out)
    out.mkdir(parents=True, exist_ok=True)
    temp = out / ".contact_sheet.tmp.png"
    contact_sheet(cfg.shards, temp)  # the lead's sheet writes in place; keep our no-overwrite rule on the result
    sheet = write_new(out / "contact_sheet.png", temp.read_bytes())
    temp.unlink()
    summary = report([cfg.run_dir], out)
    return {**summary, "results": results, "audit": str(audit_json), "audit_md": str(audit_md), "sheet": str(sheet)}
