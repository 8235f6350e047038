"""Evaluate runs (kNN + linear probe on frozen features) and compare them: a table, pictures and a plain verdict.

Per run, `evaluate_run` writes `<run>/eval/results.json` (or knn.json / linear.json for one part) and the test-split
embeddings `<run>/eval/test_features.npy` + `test_labels.npy` that the t-SNE plot reads. `report` reads only those files
and the runs' config.json/log.csv. Result files are never overwritten silently (`eval.write_new`).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from eval import latest, write_new
from eval.knn import KNN_KS, KNN_TEMPERATURE, best_k, knn_accuracy
from eval.linear import PROBE_PRESETS, ProbeConfig, probe_backbone

RUN_KEYS = ("method", "positives", "lam", "seed")
METRICS = ("knn_best", "knn_k20", "linear_top1")


@dataclass(frozen=True)
class EvalConfig:
    source: str = "digits"
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


def _labelled_split(spec: str, split: str, image_size: int):
    from clsp.errors import UserError
    from clsp.sources import load_arrays, open_source

    source = open_source(spec, split, image_size=image_size)
    images, labels, _ = load_arrays(source)
    if (labels < 0).any():
        raise UserError(f"{source.name} has unlabelled images: kNN and the linear probe need a labelled source")
    return images, labels, source.fingerprint()


def evaluate_run(run_dir: str | Path, config: EvalConfig = EvalConfig()) -> dict:
    """kNN and/or linear probe of a run's backbone on the source's train/test splits; writes <run>/eval/ files."""
    from clsp.hashing import weights_sha256
    from eval.features import extract_features, normalization_from_config
    from train.checkpoint import load_backbone

    run_dir = Path(run_dir)
    backbone, run_config = load_backbone(run_dir)
    mean, std = normalization_from_config(run_config)
    size = int(run_config["image_size"])
    train_images, train_labels, train_fp = _labelled_split(config.source, config.train_split, size)
    test_images, test_labels, test_fp = _labelled_split(config.source, config.test_split, size)
    cache = run_dir / "features"

    def features(images: np.ndarray, fingerprint: str) -> np.ndarray:  # cached per (weights, source split)
        return extract_features(backbone, images, mean, std, config.batch_size, config.device, cache, fingerprint)

    result = run_identity(run_config)
    result.update(run=run_dir.name, source=config.source, weights_sha256=weights_sha256(backbone),
                  train_fingerprint=train_fp, test_fingerprint=test_fp, eval_config=asdict(config))
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
    out = run_dir / "eval"
    write_new(out / "test_features.npy", _npy_bytes(test_feats))
    write_new(out / "test_labels.npy", _npy_bytes(test_labels.astype(np.int64)))
    result["results_file"] = str(write_new(out / config.results_name, json.dumps(result, indent=2) + "\n").name)
    return result


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def load_results(run_dir: str | Path) -> dict:
    """The newest results.json of a run (else its knn.json + linear.json), with identity keys from config.json."""
    from clsp.errors import UserError

    run_dir = Path(run_dir)
    path = latest(run_dir / "eval" / "results.json")
    parts = [path] if path is not None else [latest(run_dir / "eval" / n) for n in ("knn.json", "linear.json")]
    if None in parts:
        raise UserError(f"{run_dir} has no eval/results.json (nor knn.json and linear.json): run "
                        f"`clsp eval all {run_dir} ...` (or study) first")
    result = {}
    for part in parts:  # knn.json and linear.json share the run's identity keys
        result.update(json.loads(part.read_text()))
    config_path = run_dir / "config.json"
    if config_path.is_file():
        result.update(run_identity(json.loads(config_path.read_text())))
    result.setdefault("run", run_dir.name)
    return result


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """(mean, sample std with ddof=1 (NaN for one value), n) over the finite values."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan, 0
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan, len(vals)


def aggregate(rows: list[dict]) -> list[dict]:
    """Group run rows by (method, positives, lam); each metric -> (mean, std, n) over the group's seeds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row.get("method"), row.get("positives"), row.get("lam")), []).append(row)
    out = []
    for (method, positives, lam), members in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        entry = {"method": method, "positives": positives, "lam": lam, "seeds": sorted(r.get("seed") for r in members)}
        for metric in METRICS:
            entry[metric] = mean_std([r.get(metric) for r in members])
        out.append(entry)
    return out


def _fmt(stat: tuple[float, float, int]) -> str:
    mean, std, n = stat
    if n == 0:
        return "n/a"
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f} (1 seed)"


def _compare(a: tuple, b: tuple) -> tuple[str, str]:
    """(verdict, detail) for a - b. verdict: 'beats', 'loses to', 'is within noise of' (the gap against twice its
    standard error) or 'cannot be judged against' (a side without spread); detail: the numbers behind it."""
    (ma, sa, na), (mb, sb, nb) = a, b
    if na == 0 or nb == 0:
        return "cannot be judged against", "no numbers to compare"
    gap = ma - mb
    if na < 2 or nb < 2:
        return "cannot be judged against", f"{gap:+.2f} points, one seed on a side: no spread, so no verdict"
    se2 = 2.0 * math.sqrt(sa**2 / na + sb**2 / nb)
    word = "beats" if gap > se2 else ("loses to" if gap < -se2 else "is within noise of")
    return word, f"{gap:+.2f} points, {word} it (2 x standard error of the gap = {se2:.2f})"


def verdicts(groups: list[dict]) -> list[str]:
    """One line per method (and lam of the synthetic runs): a plain headline on the linear probe, synthetic against
    its baseline (none) and the augment control, then the numbers for the linear probe and best kNN."""
    lines = []
    for syn in (g for g in groups if g["positives"] == "synthetic"):
        metrics = (("Linear", "linear_top1"), ("Best kNN", "knn_best"))
        headline, details = [], {label: [] for label, _ in metrics}
        for baseline, name in (("none", "its baseline (none)"), ("augment", "the augment control")):
            base = [g for g in groups if g["method"] == syn["method"] and g["positives"] == baseline]
            if baseline == "augment":  # the third-view control: prefer the same lam as the synthetic runs
                base = [g for g in base if g["lam"] == syn["lam"]] or base
            if not base:
                headline.append(f"has no {baseline} runs to compare with")
                continue
            word, _ = _compare(syn["linear_top1"], base[0]["linear_top1"])
            headline.append(f"{word} {name}")
            for label, key in metrics:
                details[label].append(f"vs {baseline} {_fmt(base[0][key])}: {_compare(syn[key], base[0][key])[1]}")
        numbers = " ".join(f"{label} {_fmt(syn[key])} {'; '.join(details[label])}." for label, key in metrics
                           if details[label])
        lines.append(f"- **{syn['method']}** (lam {syn['lam']}, seeds {syn['seeds']}): on the linear probe CLSP "
                     f"{' and '.join(headline)}. {numbers}".rstrip())
    return lines or ["- no synthetic-positive runs among these: nothing to judge."]


def report(run_dirs: list[str | Path], out: str | Path) -> dict:
    """results.csv (one row per run), report.md (mean ± std over seeds, pictures, verdicts) and plots in `out`."""
    from eval.plots import plot_run, plot_summary

    out = Path(out)
    rows = [load_results(d) for d in run_dirs]
    csv_cols = ["run", *RUN_KEYS, "knn_best", "knn_best_k", "knn_k20", "linear_top1", "weights_sha256"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=csv_cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()} for row in rows)
    csv_path = write_new(out / "results.csv", buffer.getvalue())
    groups = aggregate(rows)
    probe = rows[0].get("eval_config", {}).get("probe", {})
    md = ["# Results", "", f"{len(rows)} runs on {rows[0].get('source')} (train split as kNN bank / probe training, "
          f"test split scored); mean ± sample std over seeds. Per-run numbers: `{csv_path.name}`. kNN: weighted by "
          f"exp(cos/0.07), best k of 5..200 and k=20. Linear probe: {probe.get('epochs')} epochs SGD lr "
          f"{probe.get('lr')}, batch {probe.get('batch_size')}, on {'standardised' if probe.get('standardize', True) else 'raw'} frozen features.",
          "",
          "| method | positives | lam | seeds | kNN best k | kNN k=20 | linear top-1 |",
          "|---|---|---|---|---|---|---|"]
    md += [f"| {g['method']} | {g['positives']} | {'-' if g['lam'] is None else g['lam']} | {len(g['seeds'])} | "
           f"{_fmt(g['knn_best'])} | {_fmt(g['knn_k20'])} | {_fmt(g['linear_top1'])} |" for g in groups]
    md += ["", "## Verdict", "", *verdicts(groups), "", "## Pictures", ""]
    md.append(f"![accuracy by method and positives]({plot_summary(groups, out / 'summary.png').name})")
    for run_dir in run_dirs:
        for png in plot_run(run_dir, out / "pictures"):
            md.append(f"![{png.stem}]({png.relative_to(out).as_posix()})")
    md_path = write_new(out / "report.md", "\n".join(md) + "\n")
    return {"report": str(md_path), "csv": str(csv_path), "groups": groups, "verdicts": verdicts(groups)}


@dataclass(frozen=True)
class AllConfig:
    run_dir: str
    shards: str
    out: str
    eval: EvalConfig = field(default_factory=EvalConfig)
    audit_anchors: int = 256


def evaluate_all(cfg: AllConfig) -> dict:
    """One run end to end: kNN + linear, audit of its shards, pictures, contact sheet, report (all under cfg.out)."""
    from eval.audit import AuditConfig, audit_shards, write_audit
    from shards.sheet import contact_sheet

    out = Path(cfg.out)
    results = evaluate_run(cfg.run_dir, cfg.eval)
    audit_json, audit_md = write_audit(audit_shards(cfg.shards, cfg.eval.source, AuditConfig(cfg.audit_anchors)), out)
    out.mkdir(parents=True, exist_ok=True)
    temp = out / ".contact_sheet.tmp.png"
    contact_sheet(cfg.shards, temp)  # the lead's sheet writes in place; keep our no-overwrite rule on the result
    sheet = write_new(out / "contact_sheet.png", temp.read_bytes())
    temp.unlink()
    summary = report([cfg.run_dir], out)
    return {**summary, "results": results, "audit": str(audit_json), "audit_md": str(audit_md), "sheet": str(sheet)}


@dataclass(frozen=True)
class StudyConfig:
    shards: str
    source: str
    out: str
    methods: tuple[str, ...] = ("simclr", "moco")
    positives: tuple[str, ...] = ("none", "augment", "synthetic")
    seeds: tuple[int, ...] = (0, 1, 2)
    train_preset: str | None = "embedded"
    train_options: tuple[tuple[str, object], ...] = ()  # extra TrainConfig options, e.g. (("epochs", 5),)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if not (self.methods and self.positives and self.seeds):
            raise ValueError("a study needs at least one method, one kind of positives and one seed")


def study(cfg: StudyConfig) -> dict:
    """Train and evaluate every (method, positives, seed) under cfg.out/runs/, then report on all of them.

    Resumable: a run with results is skipped; an unfinished training run is resumed from its checkpoint.
    """
    from train.loop import make_config, train

    run_dirs = []
    for method in cfg.methods:
        for positives in cfg.positives:
            for seed in cfg.seeds:
                run_dir = Path(cfg.out) / "runs" / f"{method}-{positives}-seed{seed}"
                run_dirs.append(run_dir)
                if latest(run_dir / "eval" / "results.json") is not None:
                    print(f"{run_dir.name}: results exist, skipped")
                    continue
                train(make_config(cfg.train_preset, **{**dict(cfg.train_options), "shards": cfg.shards,
                                  "out": str(run_dir), "method": method, "positives": positives, "seed": seed,
                                  "resume": True}))
                result = evaluate_run(run_dir, replace(cfg.eval, source=cfg.source))
                print(f"{run_dir.name}: kNN best {result['knn_best']:.2f}%, linear {result['linear_top1']:.2f}%")
    return report(run_dirs, cfg.out)
