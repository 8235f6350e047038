"""The w / steps trade-off, measured: `clsp eval sweep SHARDS_OR_GENERATOR`.

A fixed set of anchors (the smallest hashed ids, as the audit picks them) gets K positives at every (w, steps) setting
of a grid, sampled exactly as the synth job samples them (synth.job.sample_batch, noise keyed on (seed, anchor id,
j)), and at the shards' own setting the shards' positives are read as written (marked as such unless --eta, --seed or
a larger --k than the shards' make it other positives; sampled again, another forward batch could move a pixel). Every
setting is audited in the audit's fixed feature space with one fitted reference (eval.audit.audit_arrays): class
agreement with the anchor, mean distance to the anchor (hardness) and mean distance among the K (diversity), beside
each anchor's nearest real neighbour (NNCLR's positive).
sweep.png draws agreement against hardness, one labelled point per setting, so a team picks w by measurement.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_WS = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0)
DEFAULT_STEPS = (20, 100)
METRICS = ("agreement_pct", "hardness", "diversity")  # the audit's numbers kept per setting


@dataclass(frozen=True)
class SweepConfig:
    target: str  # shard dir (with manifest.json) or generator (dir or hub id)
    out: str  # directory for sweep.json, sweep.csv, sweep.md, sweep.png
    model: str | None = None  # the generator, when target is a shard dir
    source: str | None = None  # labelled real data; None: the shards' source, or the generator card's
    ws: tuple[float, ...] = DEFAULT_WS
    steps: tuple[int, ...] = DEFAULT_STEPS
    anchors: int = 64
    k: int | None = None  # positives per anchor and setting; None: the shards' K, else 4
    eta: float | None = None  # None: the shards' eta, else 0.1 (the paper's)
    seed: int | None = None  # anchor sample and sampler noise; None: the shards' seed, else 0
    pca_components: int = 32
    batch_size: int = 256  # rows (anchors x K) per sampler call
    device: str = "cpu"  # cpu | cuda | cuda:N | auto

    def __post_init__(self) -> None:
        from clsp.accelerator import resolve_device
        from clsp.eval.generator_samples import sampler_config

        problems = []
        if not self.ws or not self.steps:
            problems.append("give at least one --w and one --steps value")
        if self.anchors < 1 or (self.k is not None and self.k < 1) or self.batch_size < 1 or self.pca_components < 1:
            problems.append("--anchors, --k, --forward-batch and --components must be >= 1")
        if self.seed is not None and self.seed < 0:
            problems.append(f"--seed {self.seed}: use a seed >= 0")
        if problems:
            raise ValueError("; ".join(problems))
        resolve_device(self.device)  # --device tpu, or cuda without one: UserError
        for w in self.ws:  # SamplerConfig names the bad value and the fix
            for steps in self.steps:
                sampler_config(w, steps, 0.1 if self.eta is None else self.eta)


@dataclass(frozen=True)
class _Plan:
    generator: str
    spec: str
    k: int
    eta: float
    seed: int
    shards_run: dict | None  # the shard manifest's run record, when the target is a shard dir
    settings: tuple[tuple[float, int], ...]  # (w, steps), sorted
    marked: tuple[float, int] | None  # the shards' own setting
    sampling: dict  # the shards' generator of noise and anchor-noise sharing ({}: the sampler's defaults)
    bf16: bool  # bf16 autocast on a GPU: as the shards were made (their compute.precision), else the job's default


def _plan(config: SweepConfig) -> _Plan:
    """Which generator, source, K, eta, seed and settings: from the options, else the shards, else the defaults."""
    from clsp.eval.generator_samples import card_source, no_source
    from clsp.shards.manifest import MANIFEST, read_manifest

    run = read_manifest(config.target).run if (Path(config.target) / MANIFEST).is_file() else None
    if run is None:
        if config.model is not None and config.model != config.target:
            raise ValueError(f"{config.target} is a generator, not a shard dir: leave --model out (or pass shards)")
        generator, spec, defaults = config.target, config.source or card_source(config.target)[0], {}
        own = marked = None
        sampling, bf16 = {}, True
    else:
        generator = config.model
        if generator is None:
            made_by = run.get("generator", {})
            raise ValueError(f"{config.target} is a shard dir: pass --model, the generator that made it (its manifest "
                             f"names {made_by.get('model_id')!r}, weights {str(made_by.get('weights_sha256'))[:12]})")
        sampler = run.get("sampler", {})
        spec = config.source or run.get("source", {}).get("spec")
        defaults = {"k": run.get("k"), "eta": sampler.get("eta"), "seed": run.get("seed")}
        # the shards' positives only where eta and the seed (which also picks the anchors) are theirs: the first K of
        # each anchor's candidates are its shard positives also for a K below the shards'
        same = all(getattr(config, name) in (None, defaults[name]) for name in ("eta", "seed")) \
            and (config.k is None or config.k <= defaults["k"])
        own = (float(sampler["w"]), int(sampler["steps"]))  # swept in any case, beside the asked grid
        marked = own if same else None
        sampling = {key: sampler[key] for key in ("noise", "share_anchor_noise") if key in sampler}  # as they were made
        bf16 = (run.get("compute") or {}).get("precision") != "fp32"  # fp32 shards are compared with fp32 samples
    if spec is None:
        raise no_source(generator)
    settings = {(float(w), int(s)) for w in config.ws for s in config.steps} | ({own} if own else set())
    pick = lambda name, fallback: next(v for v in (getattr(config, name), defaults.get(name), fallback)  # noqa: E731
                                       if v is not None)
    return _Plan(generator, spec, int(pick("k", 4)), float(pick("eta", 0.1)), int(pick("seed", 0)), run,
                 tuple(sorted(settings, key=lambda ws: (ws[1], ws[0]))), marked, sampling, bf16)


def _anchors(config: SweepConfig, plan: _Plan, real, real_labels, real_ids):
    """(anchor images (A, H, W, 3), labels (A,), ids, row of each in the real set or -1): smallest hashed ids."""
    from clsp.eval.audit import anchor_rows, load_shard_sample, sample_key

    positives = None  # the shards' own positives (A, K', H, W, 3): the point at their setting reads them
    if plan.shards_run is not None:  # the shards' anchors, chosen as the audit chooses them
        images, positives, labels, ids, _ = load_shard_sample(config.target, config.anchors, plan.seed)
    else:
        chosen = sorted(range(len(real_ids)), key=lambda i: (sample_key(plan.seed, real_ids[i]), real_ids[i]))
        chosen = sorted(chosen[: config.anchors], key=lambda i: real_ids[i])  # id order, as load_shard_sample
        images, labels, ids = real[chosen], real_labels[chosen], [real_ids[i] for i in chosen]
    return images, labels, ids, anchor_rows(ids, images, real_ids, real), positives  # rows by id, else by pixels


def _open_generator(config: SweepConfig, plan: _Plan):
    """(unet, scheduler, info, device) after the job's checks (steps <= T, RGB; an --out inside the source refused)
    and, for shards, the check that this generator made them."""
    from clsp.eval.generator_samples import open_generator, sampler_config, synth_config

    longest = sampler_config(1.0, max(s for _, s in plan.settings), plan.eta)
    opened = open_generator(synth_config(plan.generator, plan.spec, config.out, plan.k, longest, plan.seed, plan.bf16),
                            config.device)
    _check_made_by(config, plan, opened[2])
    return opened


# what identifies a generator in the shards' record (synth.job_setup.run_metadata), as a sweep's error names it
GENERATOR_PARTS = {"weights_sha256": "weights", "scheduler_sha256": "scheduler config",
                   "unet_config_sha256": "UNet config"}


def _check_made_by(config: SweepConfig, plan: _Plan, info: dict) -> None:
    """The point at the shards' setting is their positives only when --model is the generator that made them: the same
    weights, and the same scheduler and UNet configs (beta schedule, prediction type, ...), which change the samples
    and no weight. `info` holds the digests the synth job computes (synth.job_setup.load_job_generator). A digest
    that an older manifest lacks was not recorded, so it reads as this generator's, as a synth resume reads it."""
    from clsp.synth.job_setup import GENERATOR_CONFIGS

    made_by = (plan.shards_run or {}).get("generator") or {}
    differ = [key for key in ("weights_sha256", *GENERATOR_CONFIGS) if made_by.get(key) not in (None, info[key])]
    if differ:
        what = "; ".join(f"{GENERATOR_PARTS[key]} {info[key][:12]} here, {str(made_by[key])[:12]} in the shards' "
                         f"manifest" for key in differ)
        raise ValueError(f"--model {plan.generator} did not make {config.target} ({what}): its samples are not the "
                         f"shards' positives; pass the generator that made the shards")


def _check_source_made_the_shards(config: SweepConfig, plan: _Plan, source) -> None:
    """With shards, the anchors and their labels come from the shards, the real images and the labels the reference
    classifier learns from the source: it must be the data the shards were made from (fingerprints cover ids, labels,
    pixels and image size). Other data, or the same place holding other images now, pairs the anchors with other
    images and may number the classes otherwise (numbered class folders are read in name order, 0, 1, 10, 2, ...; a
    Parquet copy of them in numeric order), and class agreement would then be wrong without a sign."""
    from clsp.errors import UserError
    from clsp.eval.evaluate import compare_with_record

    made_from = (plan.shards_run or {}).get("source") or {}
    if plan.shards_run is None or made_from.get("fingerprint") is None:  # a generator's sweep; an unrecorded source
        return
    split = made_from.get("split", "train")
    try:
        verdict, now = compare_with_record(made_from, plan.spec, split, source.image_size, opened=source)
    except UserError:  # e.g. a source without the shards' split: not the data they were made from
        verdict, now = ("changed" if made_from.get("spec") == plan.spec else "other data"), None
    if verdict == "same":
        return
    was = f"{made_from.get('spec')}[{split}] (fingerprint {made_from['fingerprint'][:12]})"
    held = f"fingerprint {now[:12]}" if now else f"no {split} split"
    if verdict == "changed":
        raise ValueError(f"{plan.spec} has changed since {config.target} were made from it: {was} then, {held} now; "
                         f"put back the images the shards were made from")
    raise ValueError(f"{config.target} were made from {was}, not from {plan.spec} ({held}): the anchors' labels and "
                     f"the reference classifier's would come from other data, and class agreement would mean nothing; "
                     f"leave --source out, or pass the data the shards were made from")


def sweep(config: SweepConfig) -> dict:
    """Audit numbers of K positives per anchor at every (w, steps) setting, beside the nearest real neighbour."""
    from clsp.sources import load_arrays, open_source
    from clsp.eval.audit import AuditConfig, fit_reference
    from clsp.eval.generator_samples import image_size, sampler_config

    plan = _plan(config)
    unet, scheduler, info, device = _open_generator(config, plan)
    size = image_size(info)
    source = open_source(plan.spec, "train", image_size=size)
    _check_source_made_the_shards(config, plan, source)
    real, real_labels, real_ids = load_arrays(source)
    anchors, labels, ids, index, own_positives = _anchors(config, plan, real, real_labels, real_ids)
    if anchors.shape[1:] != real.shape[1:]:
        raise ValueError(f"the shards' images are {anchors.shape[1]} px, the generator's {size} px: sweep the "
                         "generator that made them")
    audit_config = AuditConfig(max_anchors=config.anchors, pca_components=config.pca_components, seed=plan.seed)
    reference = fit_reference(real, real_labels, audit_config, audit_config.folds)

    def audit(positives):  # (A, K, H, W, 3) -> the audit's numbers, in the one fitted feature space
        from clsp.eval.audit import audit_arrays

        return audit_arrays(anchors, positives, labels, real, real_labels, index, config=audit_config,
                            reference=reference)

    points, last = _measure(config, plan, (ids, anchors, labels), (unet, scheduler, device), audit, own_positives)
    return {
        "generator": info,
        "shards": config.target if plan.shards_run is not None else None,
        "source": {"spec": plan.spec, "split": "train", "fingerprint": source.fingerprint(), "count": len(real)},
        "anchors": len(ids), "k": plan.k, "eta": plan.eta, "seed": plan.seed,
        "noise": sampler_config(0.0, 1, plan.eta, **plan.sampling).noise,  # the bytes of the positives depend on it
        "precision": "bf16" if plan.bf16 and device.type == "cuda" else "fp32",  # ... and so does this
        "labelled_anchors": last["labelled_anchors"],
        "feature_space": last["feature_space"],
        "typical_real_pair_distance": last["typical_real_pair_distance"],
        "classes": int(len(reference.classifier.classes_)),
        "settings": points,
        "nearest_real": {key: last[key]["nearest_real"] for key in METRICS},
        "anchor_itself_agreement_pct": last["agreement_pct"]["anchor_itself"],
        "config": asdict(config),
    }


def _measure(config: SweepConfig, plan: _Plan, anchors, model, audit, own_positives=None) -> tuple[list[dict], dict]:
    """Sample K positives per anchor at each setting and audit them -> (one point per setting, the last audit)."""
    from tqdm.auto import tqdm

    from clsp.sources import Record
    from clsp.eval.generator_samples import sample_records, sampler_config, synth_config

    records = [Record(i, image, int(label)) for i, image, label in zip(*anchors)]
    points, last = [], {}
    with tqdm(total=len(plan.settings) * len(records) * plan.k, desc="sweep", unit="img", dynamic_ncols=True) as bar:
        for w, steps in plan.settings:
            bar.set_postfix(w=w, steps=steps)
            sampler = sampler_config(w, steps, plan.eta, **plan.sampling)
            cfg = synth_config(plan.generator, plan.spec, config.out, plan.k, sampler, plan.seed, plan.bf16)
            if (w, steps) == plan.marked and own_positives is not None:
                # the shards' own positives, as written: sampled again here, with another forward batch (and, on
                # the CPU, thread count) than the job's, a pixel may move by one level (README: --forward-batch)
                last = audit(own_positives[:, :plan.k])
                bar.update(len(records) * plan.k)
            else:
                last = audit(sample_records(cfg, records, *model, config.batch_size, bar))
            points.append({"w": w, "steps": steps, **{key: last[key]["synthetic"] for key in METRICS},
                           "shards_setting": (w, steps) == plan.marked})
    return points, last


# --- output --------------------------------------------------------------------------------------------------------
def sweep_rows(result: dict) -> list[dict]:
    """One row per setting, then the nearest-real-neighbour reference (kind = nearest_real)."""
    rows = [{"kind": "synthetic", "w": p["w"], "steps": p["steps"], "agreement_pct": p["agreement_pct"],
             "hardness": p["hardness"], "diversity": p["diversity"], "shards_setting": p["shards_setting"]}
            for p in result["settings"]]
    nn = result["nearest_real"]
    rows.append({"kind": "nearest_real", "w": None, "steps": None, "agreement_pct": nn["agreement_pct"],
                 "hardness": nn["hardness"], "diversity": nn["diversity"], "shards_setting": False})
    return rows


def sweep_csv(result: dict) -> str:
    buffer = io.StringIO()
    rows = sweep_rows(result)
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: "" if value is None else value for key, value in row.items()} for row in rows)
    return buffer.getvalue()


def sweep_markdown(result: dict) -> str:
    fmt = lambda v, p=1: "n/a" if v is None or v != v else f"{v:.{p}f}"  # noqa: E731  (None or NaN)
    lines = [f"Sweep of {result['generator']['model_id']} on {result['anchors']} anchors of {result['source']['spec']}"
             f" x K = {result['k']} (eta {result['eta']}, seed {result['seed']}, {result.get('noise', 'counter')} "
             f"noise). Feature space: "
             f"{result['feature_space']}; two random real images lie {result['typical_real_pair_distance']:.2f} apart.",
             "", "| w | steps | class agreement, % | distance to anchor | diversity among K |", "|---|---|---|---|---|"]
    for row in sweep_rows(result):
        name = ("nearest real (NNCLR)", "") if row["kind"] == "nearest_real" else (
            f"{row['w']:g}" + (" (shards)" if row["shards_setting"] else ""), str(row["steps"]))
        lines.append(f"| {name[0]} | {name[1]} | {fmt(row['agreement_pct'])} | {fmt(row['hardness'], 3)} | "
                     f"{fmt(row['diversity'], 3)} |")
    lines += ["", f"The reference classifier labels the anchors themselves correctly "
                  f"{fmt(result['anchor_itself_agreement_pct'])}% of the time; chance is "
                  f"{100.0 / result['classes']:.1f}%."]
    return "\n".join(lines) + "\n"


def _label_groups(points: list[dict], tol_x: float, tol_y: float) -> list[tuple[dict, str]]:
    """Points of one line (sorted by w) that fall on the same spot share one label: [(first point, "w=0, 0.1")]."""
    groups: list[list[dict]] = []
    for p in points:
        first = groups[-1][0] if groups else None
        near = first is not None and abs(p["hardness"] - first["hardness"]) < tol_x and abs(
            p["agreement_pct"] - first["agreement_pct"]) < tol_y
        if near:
            groups[-1].append(p)
        else:
            groups.append([p])
    return [(g[0], "w=" + ", ".join(f"{p['w']:g}" for p in g)) for g in groups]


def plot_sweep(result: dict) -> bytes:
    """PNG: class agreement (y) against distance to the anchor (x), one labelled point per setting, a line per step
    count, the nearest real neighbour as a star, and the distance between two random real images as the scale."""
    from clsp.eval.plots import figure_png, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.8, 4.8))
    nn, typical = result["nearest_real"], result["typical_real_pair_distance"]
    tol_x = 0.03 * max([typical, nn["hardness"]] + [p["hardness"] for p in result["settings"]])  # 3% of the x axis
    for line_no, steps in enumerate(sorted({p["steps"] for p in result["settings"]})):
        row = sorted((p for p in result["settings"] if p["steps"] == steps), key=lambda p: p["w"])
        line, = ax.plot([p["hardness"] for p in row], [p["agreement_pct"] for p in row], marker="o", ms=5, lw=1,
                        label=f"{steps} steps")
        for p, text in _label_groups(row, tol_x, 3.0):
            ax.annotate(text, (p["hardness"], p["agreement_pct"]), textcoords="offset points", fontsize=7,
                        xytext=(5, 5 - 11 * line_no), color=line.get_color())  # lines' labels stacked, not overlaid
        for p in row:
            if p["shards_setting"]:
                ax.scatter([p["hardness"]], [p["agreement_pct"]], s=160, facecolors="none", edgecolors="black",
                           label="the shards' setting", zorder=3)
    ax.scatter([nn["hardness"]], [nn["agreement_pct"]], marker="*", s=180, color="black", zorder=4,
               label="nearest real neighbour (NNCLR)")
    ax.axhline(result["anchor_itself_agreement_pct"], color="grey", ls="--", lw=0.8,
               label="classifier on the anchors themselves")
    ax.axhline(100.0 / result["classes"], color="grey", ls=":", lw=0.8, label="chance")
    ax.axvline(typical, color="tab:red", ls=":", lw=0.8, label="two random real images")
    ax.set(xlabel="distance to the anchor (hardness, PCA features)", ylabel="class agreement with the anchor (%)",
           title=f"{result['generator']['model_id']}: {result['anchors']} anchors x K = {result['k']}, "
                 f"eta {result['eta']}")
    ax.set_xlim(left=0)
    ax.set_ylim(-2, 102)
    ax.legend(frameon=False, fontsize=7, loc="best")
    fig.tight_layout()
    return figure_png(fig)


def run_sweep(config: SweepConfig) -> dict:
    """Sweep, then write sweep.json, sweep.csv, sweep.md and sweep.png to config.out, under one number (nothing is
    overwritten)."""
    from clsp.eval import write_new_set

    result = sweep(config)
    out = Path(config.out)
    files = {"json": (out / "sweep.json", json.dumps(result, indent=2, sort_keys=True) + "\n"),
             "csv": (out / "sweep.csv", sweep_csv(result)), "md": (out / "sweep.md", sweep_markdown(result)),
             "png": (out / "sweep.png", plot_sweep(result))}
    written = write_new_set(dict(files.values()))
    return {"result": result, **dict(zip(files, written))}


def numbers(text: str, kind: type, option: str) -> tuple:
    """'0,0.1,1' -> (0.0, 0.1, 1.0) with kind float; a bad item names the option and an example."""
    try:
        return tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        example = "0,0.1,0.5,1" if kind is float else "20,100"
        raise ValueError(f"{option} {text!r}: give comma-separated numbers, e.g. {option} {example}") from None
