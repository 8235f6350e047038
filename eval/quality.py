"""A quality number for generators that works offline: `clsp diffusion eval GENERATOR`.

N plain samples (the CLSP sampler at w = 1, i.e. ordinary unconditional DDIM, each keyed on its own seed) are compared
with N real images of the generator's source in the audit's fixed feature space (eval.audit.fit_reference: PCA of raw
pixels fitted on the real images, plus the reference classifier):
  - Frechet distance between Gaussian fits of the two feature sets. It is NOT FID: Inception features need a download.
    The number is comparable only between generators scored on the same source with the same settings.
  - precision / recall: the k-NN manifold estimate of Kynkaanniemi et al. 2019 (k = 3): the share of generated images
    inside the real images' k-NN balls, and of real images inside the generated images' balls.
  - confident samples: the share of generated images the reference classifier labels with probability >= 0.9.
The same numbers for the source's held-out real images (test split) against the same real sample are the scale.
Real FID runs only when the user gives local Inception weights and installed the `fid` extra (torchmetrics).
The metrics are in eval/feature_metrics.py, the sampling in eval/generator_samples.py, real FID in eval/fid.py.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from clsp.accelerator import resolve_device
from clsp.eval.feature_metrics import CONFIDENCE, set_metrics
from clsp.eval.fid import fid_metric_class, inception_fid
from clsp.eval.generator_samples import (card_source, card_source_record, image_size, no_source, open_generator,
                                         plain_samples, sampler_config, synth_config)


@dataclass(frozen=True)
class QualityConfig:
    generator: str  # generator dir or hub id
    source: str | None = None  # labelled real data; None: the source recorded in the generator's card.json
    split: str | None = None  # None: the split recorded in the card, else train
    out: str | None = None  # None: the generator dir
    samples: int = 1000  # generated images (and at most as many real ones)
    steps: int = 50  # DDIM steps of the plain samples
    eta: float = 0.0  # DDIM noise of the plain samples
    seed: int = 0
    neighbours: int = 3  # k of the k-NN manifolds (precision / recall)
    pca_components: int = 32
    batch_size: int = 256  # images per sampler call
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    inception_weights: str | None = None  # local torch-fidelity Inception-v3 weights (.pth): adds real FID

    def __post_init__(self) -> None:
        problems = []
        if self.samples < max(2, self.neighbours + 1):
            problems.append(f"--samples {self.samples}: use at least {max(2, self.neighbours + 1)} (e.g. 1000)")
        if self.neighbours < 1 or self.pca_components < 1 or self.batch_size < 1 or self.seed < 0:
            problems.append("--neighbours, --components and --forward-batch must be >= 1 and --seed >= 0")
        if self.inception_weights is not None and not Path(self.inception_weights).is_file():
            problems.append(f"--inception-weights {self.inception_weights} is not a file: give the path of "
                            "torch-fidelity's weights-inception-2015-12-05-6726825d.pth, or leave the option out")
        if problems:
            raise ValueError("; ".join(problems))
        sampler_config(1.0, self.steps, self.eta)  # validates steps and eta
        resolve_device(self.device)  # --device tpu, or cuda without one: UserError


# --- the evaluation ------------------------------------------------------------------------------------------------
def _source_split(config: QualityConfig) -> tuple[str, str]:
    card_spec, card_split = card_source(config.generator)
    spec = config.source or card_spec
    if spec is None:
        raise no_source(config.generator)
    return spec, config.split or card_split or "train"


def _check_card_source(config: QualityConfig, described: dict) -> None:
    """The card's source, taken by default, must still hold the images the generator was trained on (its fingerprint
    covers ids, labels, pixels and size): a relative folder:DIR read elsewhere, or a folder changed since, would be
    scored without a word, and the numbers recorded in the card."""
    made = card_source_record(config.generator)
    if config.source is not None or not made.get("fingerprint") \
            or described["split"] != made.get("split", "train") or described["fingerprint"] == made["fingerprint"]:
        return
    raise ValueError(f"{described['spec']}[{described['split']}] does not hold the images {config.generator} was "
                     f"trained on (fingerprint {made['fingerprint'][:12]} in its card, {described['fingerprint'][:12]} "
                     f"now): run from where its relative path points, put back the images, or pass --source")


def _real_sets(spec: str, split: str, size: int):
    """(images, labels, held-out images or None, held-out labels or None, source description)."""
    from clsp.errors import UserError
    from clsp.sources import load_arrays, open_source

    source = open_source(spec, split, image_size=size)
    images, labels, _ = load_arrays(source)
    held, held_labels = None, None
    if split == "all":  # the test images are in the real set: no held-out scale
        print(f"note: {spec}[all] holds the test split, so no held-out scale is scored (pass --split train for one)",
              file=sys.stderr)
    elif split != "test":
        try:  # a source without a test split is scored without the held-out scale
            held, held_labels, _ = load_arrays(open_source(spec, "test", image_size=size))
        except UserError:
            pass
    described = {"spec": spec, "split": split, "count": int(len(images)), "fingerprint": source.fingerprint()}
    if source.classes and source.classes != [str(i) for i in range(len(source.classes))]:
        described["classes"] = list(source.classes)  # label i is class classes[i] (numbered folders: 0, 1, 10, ...)
    return images, labels, held, held_labels, described


def _heldout(reference, real_z: np.ndarray, held, held_labels, config: QualityConfig):
    """(held-out real images scored like the generated ones, as many as the real sample; reference accuracy on them)."""
    if held is None or len(held) <= config.neighbours:
        return None, None
    held_z = reference.features(held)  # (H, c)
    same_size = np.random.default_rng(config.seed).permutation(len(held))[: len(real_z)]
    keep = held_labels >= 0
    accuracy = None
    if keep.any():
        accuracy = float((reference.classifier.predict(held_z[keep]) == held_labels[keep]).mean() * 100.0)
    return set_metrics(reference, real_z, held_z[same_size], config.neighbours), accuracy


def _row_count(config: QualityConfig, real: int, held) -> int:
    """Images per row (generated, real sample, held-out real): one count for all, since the Frechet distance and
    precision / recall shift with it (on the digits, real images against real images: 1.01 at 360, 0.90 at 437), so
    the held-out row is a scale for the generated one only at the same count. At most --samples, the real set and,
    when there is one to score, the held-out split."""
    count = min(config.samples, real)
    if held is not None and len(held) > config.neighbours and len(held) < count:
        print(f"note: {len(held)} held-out images, so every row is scored on {len(held)} images, not "
              f"{config.samples}", file=sys.stderr)
        count = len(held)
    return count


def evaluate_generator(config: QualityConfig) -> dict:
    """Offline quality numbers of a generator (and real FID with local Inception weights) as a result dict."""
    from clsp.eval.audit import AuditConfig, fit_reference

    spec, split = _source_split(config)
    if config.inception_weights is not None:
        fid_metric_class()  # a missing extra fails now, before minutes of sampling
    sampler = sampler_config(1.0, config.steps, config.eta)
    synth_cfg = synth_config(config.generator, spec, config.out or config.generator, 1, sampler, config.seed)
    unet, scheduler, info, device = open_generator(synth_cfg, config.device)
    real, labels, held, held_labels, described = _real_sets(spec, split, image_size(info))
    _check_card_source(config, described)
    reference = fit_reference(real, labels, AuditConfig(pca_components=config.pca_components, seed=config.seed))
    count = _row_count(config, len(real), held)
    fake = plain_samples(synth_cfg, count, image_size(info), unet, scheduler, device, config.batch_size)

    rows = np.random.default_rng(config.seed).permutation(len(real))[:count]  # the real sample
    real_z = reference.real_z[rows]  # (n, c)
    heldout, accuracy = _heldout(reference, real_z, held, held_labels, config)
    return {
        "generator": info,
        "source": described,
        "sampler": {"w": 1.0, "steps": config.steps, "eta": config.eta, "seed": config.seed},
        "real_sample": int(len(rows)),
        "feature_space": reference.describe(),
        "explained_variance_pct": float(reference.pca.explained_variance_ratio_.sum() * 100.0),
        "metric_names": {"frechet_distance": "Frechet distance between Gaussian fits in the PCA feature space (not "
                                             "FID)", "precision_pct/recall_pct": f"k-NN manifold, k = "
                                             f"{config.neighbours} (Kynkaanniemi et al. 2019), in the same space",
                         "confident_pct": f"reference classifier probability >= {CONFIDENCE}"},
        "generated": set_metrics(reference, real_z, reference.features(fake), config.neighbours),  # fake (N, H, W, 3)
        "heldout_real": heldout,
        "reference_heldout_accuracy_pct": accuracy,
        "fid": None if config.inception_weights is None else inception_fid(
            real[rows], fake, config.inception_weights, device, config.batch_size),
        "config": asdict(config),
    }


# --- output --------------------------------------------------------------------------------------------------------
def quality_markdown(result: dict) -> str:
    """The quality numbers as a Markdown table: generated images beside held-out real images (the scale)."""
    gen, held, fid = result["generated"], result["heldout_real"], result["fid"]
    src, smp, k = result["source"], result["sampler"], result["config"]["neighbours"]
    fmt = lambda m, key, p=1: "n/a" if m is None else f"{m[key]:.{p}f}"  # noqa: E731
    classes = gen["class_pct"]  # label -> share
    low, high = min(classes, key=classes.get), max(classes, key=classes.get)
    name = lambda label: src["classes"][int(label)] if "classes" in src else label  # noqa: E731
    lines = [
        f"Generator {result['generator']['model_id']} (weights {result['generator']['weights_sha256'][:12]}): "
        f"{gen['count']} plain DDIM samples (w = 1, {smp['steps']} steps, eta {smp['eta']}) against "
        f"{result['real_sample']} real images of {src['spec']}[{src['split']}].",
        f"Feature space: {result['feature_space']} ({result['explained_variance_pct']:.1f}% of pixel variance). "
        "The Frechet distance here is NOT FID: compare it only between generators scored on the same source with the "
        "same settings.",
        "",
        f"| metric | generated | held-out real ({src['spec']}[test]) |",
        "|---|---|---|",
        f"| Frechet distance in PCA features (lower is better) | {fmt(gen, 'frechet_distance', 2)} | "
        f"{fmt(held, 'frechet_distance', 2)} |",
        f"| precision, % (k-NN manifold, k = {k}) | {fmt(gen, 'precision_pct')} | {fmt(held, 'precision_pct')} |",
        f"| recall, % | {fmt(gen, 'recall_pct')} | {fmt(held, 'recall_pct')} |",
        f"| confident samples, % (reference classifier p >= {CONFIDENCE}) | {fmt(gen, 'confident_pct')} | "
        f"{fmt(held, 'confident_pct')} |",
    ]
    if fid is not None:
        lines.append(f"| FID, {fid['features']} | {fid['value']:.2f} | n/a |")
    lines += ["", f"Classes the reference classifier gives the generated samples: from {classes[low]:.1f}% (class "
                  f"{name(low)}) to {classes[high]:.1f}% (class {name(high)}); an even spread is "
                  f"{100.0 / len(classes):.1f}%."]
    if result.get("reference_heldout_accuracy_pct") is not None:
        lines.append(f"The reference classifier labels held-out real images correctly "
                     f"{result['reference_heldout_accuracy_pct']:.1f}% of the time.")
    return "\n".join(lines) + "\n"


def write_quality(result: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """quality.json and quality.md in out_dir (an earlier, different result is never replaced)."""
    from clsp.eval import write_new_set

    out_dir = Path(out_dir)
    json_path, md_path = write_new_set({out_dir / "quality.json": json.dumps(result, indent=2, sort_keys=True) + "\n",
                                        out_dir / "quality.md": quality_markdown(result)})
    return json_path, md_path


def record_in_card(generator_dir: str | Path, result: dict, json_path: Path) -> bool:
    """Add the headline numbers to a saved generator's card.json and README.md; False when it has no card."""
    from clsp.file_io import read_json, remove_cut_writes, write_atomic
    from clsp.synth.models import CARD_NAME, card_readme, write_readme

    card_file = Path(generator_dir).expanduser() / CARD_NAME
    if not card_file.is_file():
        return False
    card = read_json(card_file)  # a regular file of bounded size
    if card.get("weights_sha256") != result["generator"]["weights_sha256"]:  # weights replaced after the save
        print(f"note: {card_file} describes other weights than the ones scored: the card is left as it is",
              file=sys.stderr)
        return False
    pick = lambda m: None if m is None else {key: m[key] for key in  # noqa: E731
                                             ("frechet_distance", "precision_pct", "recall_pct", "confident_pct")}
    card["quality"] = {"file": str(json_path.name), "feature_space": result["feature_space"],
                       "source": result["source"]["spec"], "samples": result["generated"]["count"],
                       "sampler": result["sampler"], "generated": pick(result["generated"]),
                       "heldout_real": pick(result["heldout_real"]),
                       "fid": None if result["fid"] is None else result["fid"]["value"]}
    for path in (card_file, card_file.with_name("README.md")):  # what a kill during an earlier write left
        remove_cut_writes(path)
    write_atomic(card_file, json.dumps(card, indent=2, sort_keys=True, default=str))
    write_readme(card_file.with_name("README.md"), card_readme(card) + "\n## Quality\n\n" + quality_markdown(result))
    return True


def run_quality(config: QualityConfig) -> dict:
    """Evaluate, write quality.json/.md to config.out (default: the generator dir, whose card then records them)."""
    if config.out is None and not Path(config.generator).expanduser().is_dir():
        raise ValueError(f"{config.generator} is not a local directory: pass --out DIR for quality.json")
    result = evaluate_generator(config)
    json_path, md_path = write_quality(result, config.out or config.generator)
    carded = config.out is None and record_in_card(config.generator, result, json_path)
    return {"result": result, "json": json_path, "md": md_path, "card": carded}
