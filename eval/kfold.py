"""Scores over every labelled image by k-fold evaluation, for comparisons that must see a 1-point effect.

Each image is scored by a kNN bank / linear probe fitted on the other folds, so a run's accuracy is over all N labelled
images (digits: 1,797 rather than the 360 of its test split) and two runs can be compared image by image. Folds are
keyed on image ids, so every run scored on the same images uses the same folds, whatever order the images come in.
The backbone has seen the train split's images (without labels) while training; the folds only decide which labels
the probe and the kNN bank may read.

`kfold_accuracy` works on arrays; `evaluate_run_kfold` scores one run and writes `<run>/eval/kfold.json`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from clsp.errors import UserError
from clsp.hashing import keyed_seed
from clsp.eval import write_result
from clsp.eval.knn import KNN_KS, KNN_TEMPERATURE, best_k, knn_predict
from clsp.eval.linear import ProbeConfig, train_linear_probe
from clsp.eval.evaluate import check_trained_on, open_run
from clsp.eval.results import current_result, current_weights, with_identity

FOLD_SALT = "clsp-kfold"  # part of every fold key: change it and every fold changes
CORRECT_METRICS = ("knn_best", "knn_k20", "linear_top1")  # kept image by image (for the paired bootstrap)


def assign_folds(ids: Sequence[str], folds: int) -> np.ndarray:
    """Fold (N,) int64 in [0, folds) of each id: ids ranked by a keyed hash, then rank % folds.

    The same set of ids gets the same folds in every call and in any order; fold sizes differ by at most one."""
    ids = [str(i) for i in ids]
    if folds < 2 or len(ids) < folds:
        raise ValueError(f"k-fold needs 2 <= folds <= images, got {folds} folds of {len(ids)} images")
    if len(set(ids)) != len(ids):
        raise ValueError("image ids must be unique: a fold is keyed on the id")
    rank = sorted(range(len(ids)), key=lambda i: (keyed_seed(FOLD_SALT, ids[i]), ids[i]))
    assignment = np.empty(len(ids), dtype=np.int64)
    assignment[rank] = np.arange(len(ids)) % folds
    return assignment


def kfold_accuracy(features: np.ndarray, labels: np.ndarray, ids: Sequence[str], folds: int = 5,
                   probe: ProbeConfig = ProbeConfig(), ks: tuple[int, ...] = KNN_KS,
                   temperature: float = KNN_TEMPERATURE, device: str = "cpu") -> dict:
    """kNN and linear-probe top-1 % over all N images, each predicted by a bank / probe fitted on the other folds.

    features (N, D), labels (N,) >= 0, ids (N,). Returns {knn: {k: %}, knn_best, knn_best_k, knn_k20, linear_top1,
    correct: {metric: (N,) bool in input order}, fold_sizes}. k is capped at the smallest bank (as knn_predict caps
    it at one bank), so every fold uses the same ks."""
    labels = np.asarray(labels)
    if features.ndim != 2 or labels.shape != (features.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"need features (N, D) and integer labels (N,), got {features.shape} and {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError("labels hold unknown entries (-1): k-fold scoring needs every image labelled")
    if 20 not in ks:  # knn_k20 is reported beside the best k: without 20 it would be another k's score
        raise ValueError(f"ks {tuple(ks)} must include 20 (the k every run reports beside its best)")
    if len(ids) != labels.shape[0]:
        raise ValueError(f"{len(ids)} ids for {labels.shape[0]} images: pass one id per image")
    fold = assign_folds(ids, folds)  # (N,)
    sizes = np.bincount(fold, minlength=folds)
    ks = tuple(sorted({min(k, int(labels.size - sizes.max())) for k in ks}))  # every bank holds >= max(ks) images
    classes = int(labels.max()) + 1
    knn_pred = {k: np.empty_like(labels) for k in ks}  # (N,) each
    linear_pred = np.empty_like(labels)
    for f in range(folds):
        held, bank = fold == f, fold != f
        for k, pred in knn_predict(features[bank], labels[bank], features[held], ks, temperature, classes,
                                   device=device).items():
            knn_pred[k][held] = pred
        linear_pred[held] = train_linear_probe(features[bank], labels[bank], probe).predict(features[held])
    correct = {k: pred == labels for k, pred in knn_pred.items()}
    knn = {k: float(c.mean() * 100.0) for k, c in correct.items()}
    k_best, top1 = best_k(knn)
    return {"knn": knn, "knn_best": top1, "knn_best_k": k_best, "knn_k20": knn.get(20),  # None: banks < 20 images
            "linear_top1": float((linear_pred == labels).mean() * 100.0),
            "correct": {"knn_best": correct[k_best], "linear_top1": linear_pred == labels,
                        **({"knn_k20": correct[20]} if 20 in correct else {})},
            "fold_sizes": [int(s) for s in sizes]}


@dataclass(frozen=True)
class LabelledSet:
    """Every labelled image of a source (its `all` split), loaded once for all the runs a study scores."""

    spec: str
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64
    ids: tuple[str, ...]
    fingerprint: str  # of the `all` split at this image size


def load_labelled(spec: str, image_size: int) -> LabelledSet:
    """The labelled images of the `all` split of `spec` at `image_size` (STL-10's unlabelled ones are read past, never
    kept); a UserError when no image has a label."""
    from clsp.sources import NoLabelsError, load_arrays, open_source

    source = open_source(spec, "all", image_size=image_size)
    try:
        images, labels, ids = load_arrays(source, labelled=True)
    except NoLabelsError as error:
        raise UserError(f"{error}: k-fold scoring needs labelled images; pass --source a labelled one") from None
    if len(ids) < len(source):
        print(f"k-fold scoring: the {len(ids):,} labelled images of {source.name} ({len(source) - len(ids):,} "
              f"unlabelled left out)", file=sys.stderr)
    return LabelledSet(spec, images, labels, tuple(ids), source.fingerprint())


def scoring_key(data: LabelledSet, folds: int, config) -> dict:
    """What a k-fold score depends on besides the weights; a run whose kfold.json records another key is rescored."""
    key = {"folds": folds, "fold_salt": FOLD_SALT, "source": data.spec, "fingerprint": data.fingerprint,
           "count": len(data.ids), "probe": asdict(config.probe), "ks": list(config.ks),
           "temperature": config.temperature}
    return json.loads(json.dumps(key))  # as read back from the file (tuples -> lists)


def load_kfold(run_dir: str | Path) -> dict | None:
    """The `<run>/eval/kfold.json` last written from the run's current weights, with the run's identity from
    config.json; None when these weights were not scored (a kfold.json of earlier weights is not this run's)."""
    result, _ = current_result(run_dir, "kfold.json", current_weights(run_dir))
    return None if result is None else with_identity(result, run_dir)


def evaluate_run_kfold(run_dir: str | Path, data: LabelledSet, bank, config, folds: int = 5) -> dict:
    """Score a run over every image of `data` by k-fold (`config`: an EvalConfig for probe, ks, batch, device) and
    write `<run>/eval/kfold.json`. `bank`: the train split of the source, to check the run trained on it."""
    from clsp.hashing import weights_sha256
    from clsp.eval.features import extract_features

    run = open_run(run_dir, data.spec)
    check = check_trained_on(run.run_dir, run.record, bank, config.transfer)
    if data.images.shape[1] != run.image_size:
        raise UserError(f"{run.run_dir} trained at {run.image_size} px but the images to score are "
                        f"{data.images.shape[1]} px: score it with the shards it trained on")
    mean, std = run.normalize
    features = extract_features(run.backbone, data.images, mean, std, config.batch_size, config.device,
                                run.run_dir / "features", data.fingerprint)  # (N, D), cached beside the run
    scores = kfold_accuracy(features, data.labels, data.ids, folds, config.probe, config.ks, config.temperature,
                            config.device)
    per_image = scores.pop("correct")  # metric -> (N,) bool
    correct = {name: "".join("1" if c else "0" for c in per_image[name])
               for name in CORRECT_METRICS if name in per_image}  # knn_k20 is absent where the banks hold < 20
    result = {**run.identity, "run": run.run_dir.name, "source": data.spec, "source_check": check,
              "train_fingerprint": data.fingerprint, "test_fingerprint": data.fingerprint,
              "weights_sha256": weights_sha256(run.backbone), "scoring": scoring_key(data, folds, config),
              **scores, "knn": {str(k): v for k, v in scores["knn"].items()},
              "ids": list(data.ids), "correct": correct}  # correct: "0110..." per image, in the order of ids
    outputs = {*scores, "correct"}  # a rerun with equal inputs replaces these in kfold.json
    result["results_file"] = write_result(run.run_dir / "eval" / "kfold.json", result, outputs).name
    return result
