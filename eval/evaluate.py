"""Evaluate one run: kNN + linear probe of its frozen backbone on labelled data, every input checked first.

`evaluate_run` writes `<run>/eval/results.json` (or knn.json / linear.json for one part) and the test-split embeddings
`<run>/eval/test_features.npy` + `test_labels.npy` that the t-SNE plot reads (the result names the files it wrote, and
holds the class names, so a picture always belongs to its result). A result is never replaced by one of other inputs;
a rerun on the same inputs replaces its own (`eval.write_new_set`, `eval.write_result`).

Numbers you can trust: the kNN bank / probe train set must be the data the run trained on (its config.json records the
shards' source; `--transfer` scores other data on purpose), and every input is checked before anything is written.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from clsp.accelerator import resolve_device
from clsp.errors import UserError
from clsp.eval import write_new_set, write_result
from clsp.eval.knn import KNN_KS, KNN_TEMPERATURE, best_k, knn_accuracy
from clsp.eval.linear import PROBE_PRESETS, ProbeConfig, probe_backbone

RUN_KEYS = ("method", "positives", "lam", "seed")
# what a rerun on the same inputs may change: the scores, the files it wrote, and how it was computed (the device and
# --forward-batch change nothing but float rounding); every other key of a result is an input (eval.write_result)
OUTPUTS = {"linear_top1", "linear_train_top1", "knn", "knn_best", "knn_best_k", "knn_k20", "test_features",
           "test_labels", "computed_with", "test_images_in_train"}  # the last: follows from the fingerprints


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
        if self.batch_size <= 0:
            raise ValueError(f"--forward-batch {self.batch_size}: use 1 or more rows (e.g. 256)")
        if self.temperature <= 0:
            raise ValueError(f"the kNN temperature {self.temperature} must be > 0")
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


def compare_with_record(record: dict, spec: str, split: str, size: int, opened=None) -> tuple[str, str]:
    """How spec[split], read at `size` px (the size the record's fingerprint was taken at), stands to the source a
    record names ({spec, split, fingerprint, count}) -> (verdict, its fingerprint now). Verdicts: "same" (equal
    fingerprints: ids, labels, pixels and size), "other split" (the recorded place, another split), "changed" (the
    recorded place and split, holding other images now) or "other data". `opened`: that source if already open at
    `size`. Each caller words its own error: what the mismatch breaks differs between them."""
    from clsp.sources import open_source

    source = opened if opened is not None and (opened.split, opened.image_size) == (split, size) else \
        open_source(spec, split, size)
    now = source.fingerprint()
    if now == record["fingerprint"]:
        return "same", now
    if record.get("spec") != spec:
        return "other data", now
    return ("other split" if record.get("split", "train") != split else "changed"), now


def check_trained_on(run_dir: str | Path, record: dict | None, bank, transfer: bool) -> str:
    """Is the kNN bank / probe train set the data the run trained on? "same" (equal fingerprints at the shards' image
    size), "transfer" (not, and --transfer says so) or "unrecorded" (a run from before the record: warned); else
    a UserError naming both fingerprints and the fix."""
    if record is None:
        print(f"warning: {run_dir} does not record the data it trained on, so {bank.name} cannot be checked against "
              f"it: its scores mean something only if that is the same data", file=sys.stderr)
        return "unrecorded"
    size = record.get("image_size") or bank.image_size
    verdict, fingerprint = compare_with_record(record, bank.spec, bank.split, size, opened=bank)
    if verdict == "same":
        return "same"
    if transfer:
        return "transfer"
    if verdict == "other split":  # --source SPEC would fail the same way
        raise UserError(f"{run_dir} trained on shards made from the {record.get('split')} split of {bank.spec}, but "
                        f"the kNN bank / probe train set is its {bank.split} split: pass --transfer to score it on "
                        f"those splits anyway (its training saw the {record.get('split')} images, without labels), "
                        f"or train on shards made with `clsp synth run --split {bank.split}`")
    if verdict == "changed":  # the place named is right: what it holds is not what the shards were made of
        raise UserError(f"{bank.name} has changed since {run_dir}'s shards were made from it ({record.get('count')} "
                        f"anchors, fingerprint {record['fingerprint'][:12]} then; {len(bank)} images, fingerprint "
                        f"{fingerprint[:12]} at {size} px now): put back the images it trained on, or pass --transfer "
                        f"to score the data as it is now on purpose")
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


def _labelled_bank(source) -> tuple[tuple[np.ndarray, np.ndarray, str], int, list[str]]:
    """((images (N, H, W, 3) uint8, labels (N,), fingerprint), unlabelled left out, ids) of the kNN bank / probe train
    set: its labelled images only (STL-10's train split: 5,000 labelled, 100,000 unlabelled read past, never kept)."""
    from clsp.sources import NoLabelsError, load_arrays

    try:
        images, labels, ids = load_arrays(source, labelled=True)
    except NoLabelsError:
        raise UserError(f"{source.name} has no labelled image, and the kNN bank and the linear probe are fitted on "
                        f"labelled ones: pass --source a labelled source of the images the run trained on (--transfer "
                        f"for other data), and --test-source for its test images when it has no test split") from None
    left_out = len(source) - len(labels)
    if left_out:
        print(f"kNN bank and linear probe: the {len(labels):,} labelled images of {source.name} ({left_out:,} "
              f"unlabelled left out)", file=sys.stderr)
    return (images, labels, source.fingerprint()), left_out, ids


def _labelled_test(source) -> tuple[np.ndarray, np.ndarray, str]:
    """(images (N, H, W, 3) uint8, labels (N,), fingerprint) of a test set whose images all have labels: the accuracy
    is over every test image, so an unlabelled one is refused (before any image is read where the source knows its
    labels without reading them)."""
    from clsp.sources import load_arrays

    known = source.labels()
    if known is not None and (known < 0).any():
        images, labels = None, known  # refused below, before any image is read
    else:
        images, labels, _ = load_arrays(source)
    if (labels < 0).any():
        raise UserError(f"{source.name} has {int((labels < 0).sum()):,} unlabelled images of {len(labels):,}, and the "
                        f"test accuracy is over every test image: pass --test-source a test set whose images all have "
                        f"labels")
    return images, labels, source.fingerprint()


def _check_disjoint(train, test, train_images: np.ndarray, test_images: np.ndarray) -> int:
    """How many test images are also training images (byte for byte): a warning when any are, since those score
    memory; refused when most are (the same files given as both)."""
    seen = {hashlib.sha256(image.tobytes()).digest() for image in train_images}
    shared = sum(hashlib.sha256(image.tobytes()).digest() in seen for image in test_images)
    if 2 * shared > len(test_images):
        raise UserError(f"{shared} of the {len(test_images)} test images of {test.name} are also in {train.name}: "
                        f"score on held-out images (a test split, or --test-source naming other files)")
    if shared:
        print(f"warning: {shared} of the {len(test_images)} test images of {test.name} are also in {train.name} "
              f"(byte for byte), so the scores are partly memory; results.json records the count "
              f"(test_images_in_train): score on held-out images to compare with others", file=sys.stderr)
    return shared


@dataclass
class EvalInputs:
    """Everything one evaluation reads, all checked before anything is computed or written."""

    run_dir: Path
    backbone: object  # nn.Module in eval mode
    normalize: tuple  # (mean, std) per RGB channel
    train: tuple[np.ndarray, np.ndarray, str]  # images (N, H, W, 3) uint8, labels (N,), fingerprint
    test: tuple[np.ndarray, np.ndarray, str]
    result: dict  # the start of results.json: the run's identity, the data it is scored on and the class names
    train_ids: tuple[str, ...] = ()  # ids of `train`'s images, in its order (eval all hands them to the audit)


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
    from clsp.eval.features import normalization_from_config
    from clsp.file_checks import small_json
    from clsp.train.checkpoint import SUMMARY, load_backbone

    run_dir = Path(run_dir)
    backbone, run_config = load_backbone(run_dir)
    summary = small_json(run_dir / SUMMARY)
    if not (isinstance(summary, dict) and summary.get("finished") is True):  # the backbone of its last checkpoint
        raise UserError(f"{run_dir} has not finished training (no {SUMMARY}: it was stopped or is still running), so "
                        f"its backbone is an intermediate one: finish it with `clsp train run SHARDS --out {run_dir} "
                        f"--resume` (the same options), then evaluate")
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
    try:
        bank = open_source(run.spec, config.train_split, image_size=run.image_size)
    except UserError as error:
        location = run.spec.partition(":")[2]
        if config.source is not None or not location or os.path.isabs(os.path.expanduser(location)):
            raise
        raise UserError(f"{error} (the source {run.spec} is the one {run.run_dir}/config.json records: a relative path "
                        f"there is relative to where the run was made; pass --source with its path from here)") \
            from None
    check = check_trained_on(run.run_dir, run.record, bank, config.transfer)
    test = _open_test(config.test_source or run.spec, config.test_split, run.image_size,
                      explicit=config.test_source is not None)
    _check_classes(bank, test)
    (train, left_out, train_ids), held_out = _labelled_bank(bank), _labelled_test(test)
    shared = _check_disjoint(bank, test, train[0], held_out[0])
    settings = asdict(replace(config, source=run.spec, test_source=test.spec))  # the sources as resolved
    computed_with = {"device": settings.pop("device"), "forward_batch": settings.pop("batch_size")}
    result = dict(run.identity)
    result.update(run=run.run_dir.name, source=run.spec, test_source=test.spec, trained_on=run.record,
                  source_check=check, weights_sha256=weights_sha256(run.backbone), train_fingerprint=train[2],
                  test_fingerprint=held_out[2], test_images_in_train=shared, eval_config=settings,
                  computed_with=computed_with, class_names=list(test.classes or bank.classes))
    if left_out:  # recorded only then: a result of a fully labelled bank reads as before
        result["bank_unlabelled_left_out"] = left_out
    return EvalInputs(run.run_dir, run.backbone, run.normalize, train, held_out, result, tuple(train_ids))


def _check_classes(bank, test) -> None:
    """A label must name one class in both sources. Two sources that name their classes must name the same ones. When
    only one does, the other's label i can only be read as the named one's i-th class: refused where that is known to
    be wrong-prone (class folders named by numbers, which read in name order: 0, 1, 10, 2, ...; a bare label 2 there
    means class '10'), and said otherwise, since CIFAR's and STL-10's names read in name order are their numbering."""
    if bank.classes and test.classes:
        if bank.classes != test.classes:
            raise UserError(f"{bank.name} and {test.name} name other classes ({_class_difference(bank, test)}), so a "
                            f"label would name another class in each: {_one_dataset_fix(bank, test)}")
        return
    named, bare = (bank, test) if bank.classes else (test, bank)
    if not named.classes or named.classes == [str(i) for i in range(len(named.classes))]:
        return  # no names at all, or names that are the labels themselves
    numbers = all(name.isdigit() for name in named.classes)
    if numbers and named.classes != sorted(named.classes, key=int):  # zero-padded numbers read in their own order
        raise UserError(f"{named.name} names its classes by numbers, in name order ({', '.join(named.classes[:4])}, "
                        f"...: its label 2 is class {named.classes[2] if len(named.classes) > 2 else '?'}), and "
                        f"{bare.name} gives bare labels, whose numbering cannot be matched to those names: give both "
                        f"splits in one format, or name {bare.name}'s classes (a Parquet file's huggingface metadata, "
                        f"as a datasets ClassLabel writes it)")
    print(f"warning: {bare.name} does not name its classes: its label i is read as {named.name}'s i-th class "
          f"({', '.join(f'{i} = {n}' for i, n in enumerate(named.classes[:3]))}, ...); if it numbers them otherwise, "
          f"these accuracies are wrong", file=sys.stderr)


def _class_difference(bank, test) -> str:
    """What differs between two class lists, e.g. "n06 only in ...[train]", or the first label they read otherwise."""
    shown = lambda names: ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")  # noqa
    in_bank, in_test = set(bank.classes), set(test.classes)
    only_bank, only_test = [c for c in bank.classes if c not in in_test], [c for c in test.classes if c not in in_bank]
    parts = [f"{shown(names)} only in {source.name}" for names, source in ((only_bank, bank), (only_test, test))
             if names]
    if parts:
        return "; ".join(parts)
    first = next(i for i, (a, b) in enumerate(zip(bank.classes, test.classes)) if a != b)
    return f"the same names in another order: label {first} is {bank.classes[first]} in one, {test.classes[first]} " \
           f"in the other"


def _one_dataset_fix(bank, test) -> str:
    """The fix for split folders given one by one (DIR/train and DIR/val): the folder holding both, whose classes
    are those of every split, so each label names one class in both."""
    kinds = {s.spec.partition(":")[0] for s in (bank, test)}
    parents = {Path(s.spec.partition(":")[2]).expanduser().resolve().parent for s in (bank, test)}
    if kinds == {"folder"} and len(parents) == 1:
        return (f"pass --source folder:{parents.pop()} (no --test-source), whose classes are those of every split "
                f"folder, or add the missing class folders")
    return "give splits of one dataset, or add the missing classes"


def evaluate_run(run_dir: str | Path, config: EvalConfig = EvalConfig()) -> dict:
    """kNN and/or linear probe of a run's backbone on the source's train/test splits; writes <run>/eval/ files."""
    return score_run(prepare_eval(run_dir, config), config)


def score_run(inputs: EvalInputs, config: EvalConfig) -> dict:
    """kNN and/or linear probe on prepared inputs; writes <run>/eval/ files (and the feature cache) only now."""
    from clsp.eval.features import extract_features, npy_bytes

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
        accs = knn_accuracy(train_feats, train_labels, test_feats, test_labels, config.ks, config.temperature,
                            device=config.device)  # where the features came from (a GPU: 5k x 126k x 2048 in seconds)
        k, top1 = best_k(accs)
        if 20 in config.ks and len(train_labels) < 20:  # knn_k20 would be k = len(train_labels)'s score
            print(f"warning: the kNN bank holds {len(train_labels)} images, fewer than k = 20: knn_k20 is left out "
                  f"(n/a), and k above {len(train_labels)} is scored as k = {len(train_labels)}", file=sys.stderr)
        result.update(knn={str(key): v for key, v in accs.items()}, knn_best=top1, knn_best_k=k,
                      knn_k20=accs.get(20))  # None when the bank holds < 20 images: k = 20 was never computed
    out = inputs.run_dir / "eval"
    feats_path, labels_path = write_new_set({out / "test_features.npy": npy_bytes(test_feats),  # the t-SNE's
                                             out / "test_labels.npy": npy_bytes(test_labels.astype(np.int64))},
                                            named=True)  # the result names them: an earlier equal pair serves
    result.update(test_features=feats_path.name, test_labels=labels_path.name)
    result["results_file"] = write_result(out / config.results_name, result, OUTPUTS).name
    return result
