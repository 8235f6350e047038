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
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from clsp.accelerator import resolve_device

CONFIDENCE = 0.9  # classifier probability that makes a sample "confident"
FID_EXTRA = "pip install 'clsp-positives[fid]' (torchmetrics + torch-fidelity)"


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
            problems.append("--neighbours, --components and --batch-size must be >= 1 and --seed >= 0")
        if self.inception_weights is not None and not Path(self.inception_weights).is_file():
            problems.append(f"--inception-weights {self.inception_weights} is not a file: give the path of "
                            "torch-fidelity's weights-inception-2015-12-05-6726825d.pth, or leave the option out")
        if problems:
            raise ValueError("; ".join(problems))
        sampler_config(1.0, self.steps, self.eta)  # validates steps and eta
        resolve_device(self.device)  # --device tpu, or cuda without one: UserError


# --- metrics on features -------------------------------------------------------------------------------------------
def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """(N, c), (M, c) -> |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussian fits of the two sets."""
    from scipy import linalg

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))  # (c, c)
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():  # singular product (too few samples): offset the diagonals, as pytorch-fid does
        offset = np.eye(len(cov_a)) * 1e-6
        covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    mean_term = ((a.mean(0) - b.mean(0)) ** 2).sum()
    return float(mean_term + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean.real))  # .real: rounding


def _kth_distance(points: np.ndarray, k: int) -> np.ndarray:
    """(N, c) -> (N,) distance from each point to its k-th nearest other point (the radius of its k-NN ball)."""
    from sklearn.neighbors import NearestNeighbors

    dist, _ = NearestNeighbors(n_neighbors=k + 1).fit(points).kneighbors(points)  # (N, k + 1); column 0: itself
    return dist[:, k]


def _covered(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """(P,) bool: point p lies in the ball of some centre j (radius radii[j]), i.e. on the centres' k-NN manifold."""
    from eval.audit import pairwise_distance

    inside = np.empty(len(points), dtype=bool)
    for start in range(0, len(points), chunk):  # (chunk, C) distances at a time, never (P, C)
        dist = pairwise_distance(points[start:start + chunk], centres)
        inside[start:start + chunk] = (dist <= radii[None, :]).any(axis=1)
    return inside


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019), in %: fake in the real manifold, real in the fake."""
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} images on each side")
    precision = _covered(fake, real, _kth_distance(real, k)).mean()
    recall = _covered(real, fake, _kth_distance(fake, k)).mean()
    return float(precision * 100.0), float(recall * 100.0)


def set_metrics(reference, real_z: np.ndarray, other_z: np.ndarray, k: int) -> dict:
    """Frechet distance, precision/recall, confident share and predicted class shares of `other_z` against real_z."""
    precision, recall = precision_recall(real_z, other_z, k)
    proba = reference.classifier.predict_proba(other_z)  # (N, classes)
    predicted = proba.argmax(1)
    classes = reference.classifier.classes_
    return {
        "count": int(len(other_z)),
        "frechet_distance": frechet_distance(real_z, other_z),
        "precision_pct": precision,
        "recall_pct": recall,
        "confident_pct": float((proba.max(1) >= CONFIDENCE).mean() * 100.0),
        "class_pct": {str(c): float((predicted == i).mean() * 100.0) for i, c in enumerate(classes)},
    }


# --- generator and samples -----------------------------------------------------------------------------------------
def sampler_config(w: float, steps: int, eta: float):
    from synth.sampler import SamplerConfig

    return SamplerConfig(w=float(w), steps=int(steps), eta=float(eta))


def card_source(generator: str) -> tuple[str | None, str | None]:
    """(source spec, split) recorded in a generator dir's card.json, or (None, None)."""
    from synth.models import CARD_NAME

    card_file = Path(generator).expanduser() / CARD_NAME
    card = json.loads(card_file.read_text()) if card_file.is_file() else {}
    source = card.get("source") if isinstance(card.get("source"), dict) else {}
    return source.get("spec"), source.get("split")


def synth_config(generator: str, source: str, out: str | Path, k: int, sampler, seed: int):
    """The synth job's config for sampling outside the job (sample_batch reads k, seed, sampler and bf16)."""
    from synth.job import SynthConfig

    return SynthConfig(source=source, model=generator, out=Path(out), k=k, sampler=sampler, seed=seed)


def open_generator(synth_cfg, device: str):
    """(unet prepared on the device, scheduler, info, torch device), with the job's own checks (RGB, steps <= T)."""
    from synth.job import load_job_generator, prepare_unet

    target = resolve_device(device)
    unet, scheduler, info = load_job_generator(synth_cfg)
    return prepare_unet(unet, target), scheduler, info, target


def sample_records(synth_cfg, records: list, unet, scheduler, device, batch_rows: int, progress) -> np.ndarray:
    """K images per record through the job's sample_batch (noise keyed on (seed, id, j)) -> (A, K, H, W, 3) uint8."""
    from synth.job import sample_batch

    per_batch = max(1, batch_rows // synth_cfg.k)  # whole anchors per call
    chunks = []
    for start in range(0, len(records), per_batch):
        images, _ = sample_batch(synth_cfg, records[start:start + per_batch], unet, scheduler, device)
        chunks.append(images)
        progress.update(images.shape[0] * images.shape[1])
    return np.concatenate(chunks)


def plain_samples(synth_cfg, count: int, size: int, unet, scheduler, device, batch_rows: int) -> np.ndarray:
    """`count` unconditional samples (synth_cfg.sampler.w must be 1) -> (count, H, W, 3) uint8, row i keyed on i."""
    from tqdm.auto import tqdm

    from clsp.sources import Record

    if synth_cfg.sampler.w != 1.0:
        raise ValueError("plain samples need w = 1 (the anchor's bottleneck then has weight 0)")
    grey = np.full((size, size, 3), 128, dtype=np.uint8)  # an anchor the sampler ignores at w = 1
    records = [Record(f"plain-{i:06d}", grey, -1) for i in range(count)]
    with tqdm(total=count, desc="plain samples", unit="img", dynamic_ncols=True) as progress:
        return sample_records(synth_cfg, records, unet, scheduler, device, batch_rows, progress)[:, 0]


# --- real FID (optional extra) -------------------------------------------------------------------------------------
def _fid_metric_class():
    try:
        import torch_fidelity  # noqa: F401  (torchmetrics' Inception network)
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        raise ValueError(f"real FID (--inception-weights) needs the optional extra: {FID_EXTRA}; or leave "
                         "--inception-weights out for the offline numbers only") from None
    return FrechetInceptionDistance


@contextmanager
def _weights_only_loads():
    """torch.load refuses pickled code while the block runs (torch-fidelity loads its weights with
    weights_only=False; torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides that)."""
    saved = {name: os.environ.pop(name, None) for name in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD",
                                                            "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def inception_fid(real: np.ndarray, fake: np.ndarray, weights: str, device, batch_size: int) -> dict:
    """FID (torchmetrics, Inception-v3 pool3, 2048 features) of uint8 (N, H, W, 3) real vs fake images."""
    import pickle

    import torch

    from clsp.hashing import weights_sha256

    metric_class = _fid_metric_class()
    try:
        with _weights_only_loads():
            metric = metric_class(feature=2048, feature_extractor_weights_path=str(weights), normalize=False)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"--inception-weights {weights} is not a plain state dict of Inception-v3 tensors ({first}): "
                         "give torch-fidelity's weights-inception-2015-12-05-6726825d.pth") from None
    metric = metric.to(device)
    with torch.inference_mode():
        for images, is_real in ((real, True), (fake, False)):
            for start in range(0, len(images), batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))  # (B, H, W, 3)
                metric.update(batch.permute(0, 3, 1, 2).to(device), real=is_real)  # (B, 3, H, W) uint8
        value = float(metric.compute())
    return {"value": value, "features": "Inception-v3 pool3 (2048), torchmetrics FrechetInceptionDistance",
            "weights_sha256": weights_sha256(metric.inception), "real": int(len(real)), "generated": int(len(fake))}


# --- the evaluation ------------------------------------------------------------------------------------------------
def image_size(info: dict) -> int:
    """The generator's sample size in pixels (diffusers stores an int or an (H, W) pair)."""
    size = info["sample_size"]
    return int(size if isinstance(size, int) else size[0])


def _source_split(config: QualityConfig) -> tuple[str, str]:
    card_spec, card_split = card_source(config.generator)
    spec = config.source or card_spec
    if spec is None:
        raise ValueError(f"{config.generator} records no source (no card.json with a source): pass --source, the "
                         "labelled data the generator was trained on (e.g. --source cifar10:DIR)")
    return spec, config.split or card_split or "train"


def _real_sets(spec: str, split: str, size: int):
    """(images, labels, held-out images or None, held-out labels or None, source description)."""
    from clsp.errors import UserError
    from clsp.sources import load_arrays, open_source

    source = open_source(spec, split, image_size=size)
    images, labels, _ = load_arrays(source)
    held, held_labels = None, None
    if split != "test":
        try:  # a source without a test split is scored without the held-out scale
            held, held_labels, _ = load_arrays(open_source(spec, "test", image_size=size))
        except UserError:
            pass
    described = {"spec": spec, "split": split, "count": int(len(images)), "fingerprint": source.fingerprint()}
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


def evaluate_generator(config: QualityConfig) -> dict:
    """Offline quality numbers of a generator (and real FID with local Inception weights) as a result dict."""
    from eval.audit import AuditConfig, fit_reference

    spec, split = _source_split(config)
    if config.inception_weights is not None:
        _fid_metric_class()  # a missing extra fails now, before minutes of sampling
    sampler = sampler_config(1.0, config.steps, config.eta)
    synth_cfg = synth_config(config.generator, spec, config.out or config.generator, 1, sampler, config.seed)
    unet, scheduler, info, device = open_generator(synth_cfg, config.device)
    real, labels, held, held_labels, described = _real_sets(spec, split, image_size(info))
    reference = fit_reference(real, labels, AuditConfig(pca_components=config.pca_components, seed=config.seed))
    fake = plain_samples(synth_cfg, config.samples, image_size(info), unet, scheduler, device, config.batch_size)

    rows = np.random.default_rng(config.seed).permutation(len(real))[: config.samples]  # the real sample
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
    classes = gen["class_pct"]
    low, high = min(classes, key=classes.get), max(classes, key=classes.get)
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
                  f"{low}) to {classes[high]:.1f}% (class {high}); an even spread is {100.0 / len(classes):.1f}%."]
    if result.get("reference_heldout_accuracy_pct") is not None:
        lines.append(f"The reference classifier labels held-out real images correctly "
                     f"{result['reference_heldout_accuracy_pct']:.1f}% of the time.")
    return "\n".join(lines) + "\n"


def write_quality(result: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """quality.json and quality.md in out_dir (an earlier, different result is never replaced)."""
    from eval import write_new

    out_dir = Path(out_dir)
    json_path = write_new(out_dir / "quality.json", json.dumps(result, indent=2, sort_keys=True) + "\n")
    return json_path, write_new(out_dir / "quality.md", quality_markdown(result))


def record_in_card(generator_dir: str | Path, result: dict, json_path: Path) -> bool:
    """Add the headline numbers to a saved generator's card.json and README.md; False when it has no card."""
    from clsp.run_dir import write_atomic
    from synth.models import CARD_NAME, card_readme

    card_file = Path(generator_dir).expanduser() / CARD_NAME
    if not card_file.is_file():
        return False
    card = json.loads(card_file.read_text())
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
    write_atomic(card_file, json.dumps(card, indent=2, sort_keys=True, default=str))
    write_atomic(card_file.with_name("README.md"), card_readme(card) + "\n## Quality\n\n" + quality_markdown(result))
    return True


def run_quality(config: QualityConfig) -> dict:
    """Evaluate, write quality.json/.md to config.out (default: the generator dir, whose card then records them)."""
    if config.out is None and not Path(config.generator).expanduser().is_dir():
        raise ValueError(f"{config.generator} is not a local directory: pass --out DIR for quality.json")
    result = evaluate_generator(config)
    json_path, md_path = write_quality(result, config.out or config.generator)
    carded = config.out is None and record_in_card(config.generator, result, json_path)
    return {"result": result, "json": json_path, "md": md_path, "card": carded}
