"""Audit of synthetic positives: do they keep the anchor's class, how hard are they, how varied are they?

Fixed feature space: PCA of raw pixels (scaled to [0, 1]) fitted on the real training images. It needs no download, does
not depend on the model being evaluated (so every run is audited in the same space), and its distances are pixel
distances along the data's main directions of variation. A randomly initialised CNN would be a fixed space too, but its
distances measure nothing learned; a pretrained network would need a download. Each number for the synthetic positives
stands beside the same number for each anchor's nearest real neighbour in that space (NNCLR's positive).

Reference classifier: scikit-learn LogisticRegression on the standardised PCA features of the labelled real images; its
accuracy on the held-out split is reported so that the agreement numbers can be trusted (or not). The audit scores
every image as unseen: a real image (an anchor, a nearest neighbour) by the classifier of the fold that left it out,
and an anchor's positives by the classifier that left out their anchor. A classifier fitted on every real image scores
the real images on labels it has learnt (on the embedded digits it labels the anchors themselves 100 % correctly in
sample, 96.5 % as unseen, matching its 96.9 % on held-out images), so its agreements are not those of unseen images.
"""

from __future__ import annotations

import hashlib
import heapq
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from clsp.hashing import keyed_seed


@dataclass(frozen=True)
class AuditConfig:
    max_anchors: int = 256  # anchors sampled from the shards (by hashed id, so the sample does not depend on order)
    pca_components: int = 32
    max_fit: int = 10000  # real images used to fit PCA and the classifier (the neighbour search uses all of them)
    seed: int = 0
    folds: int = 5  # classifiers that each leave out one fold of the fitted images, to score every image as unseen

    def __post_init__(self) -> None:
        if self.max_anchors <= 0 or self.pca_components <= 0 or self.max_fit <= 1 or self.folds < 2:
            raise ValueError("audit max_anchors, pca_components must be > 0, max_fit > 1 and folds >= 2")


def _flat(images: np.ndarray) -> np.ndarray:
    return images.reshape(images.shape[0], -1).astype(np.float32) / 255.0  # (N, H*W*3) in [0, 1]


def _mean_pairwise(points: np.ndarray) -> np.ndarray:
    """(N, K, c) -> (N,) mean Euclidean distance over the K*(K-1)/2 pairs of each row."""
    diff = points[:, :, None, :] - points[:, None, :, :]  # (N, K, K, c)
    dist = np.sqrt((diff**2).sum(-1))  # (N, K, K)
    k = points.shape[1]
    return dist.sum(axis=(1, 2)) / (k * (k - 1))


def pairwise_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, c), (M, c) -> (N, M) Euclidean distances, via |a|^2 + |b|^2 - 2ab (never an (N, M, c) tensor)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    sq = (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(sq, 0.0))


def _pct(mask: np.ndarray) -> float:
    return float(mask.mean() * 100.0) if mask.size else float("nan")


@dataclass(frozen=True)
class Reference:
    """The fixed feature space and the reference classifier, fitted once on the real images (audit, sweep, quality)."""

    pca: object  # sklearn PCA of raw pixels in [0, 1]
    classifier: object  # StandardScaler -> LogisticRegression on the PCA features of the labelled real images
    real_z: np.ndarray  # (M, c) features of every real image, in the real set's row order
    fit_count: int  # real images PCA was fitted on
    labelled_count: int  # those of them with a label, which the classifier was fitted on
    typical_distance: float  # median distance between two random real images: the scale of every distance
    fold_of_row: np.ndarray | None = None  # (M,) fold of each real image among the fitted ones, -1 for the others
    fold_classifiers: tuple = ()  # classifier f: the same fitted on the fitted images outside fold f

    def features(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, c) PCA features."""
        return self.pca.transform(_flat(images))

    def describe(self) -> str:
        labelled = f" ({self.labelled_count} labelled)" if self.labelled_count < self.fit_count else ""
        return f"PCA({self.pca.n_components_}) of raw pixels in [0,1], fitted on {self.fit_count} real images{labelled}"

    def predict_unseen(self, z: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """(N, c) features and (N,) the real image each belongs to (its row in the real set: the image itself, or the
        anchor a positive was made from; -1: none) -> (N,) classes predicted by a classifier that did not see that
        image: the one that left out its fold, or the full one for an image it was not fitted on."""
        if not self.fold_classifiers:
            raise ValueError("this reference has no out-of-fold classifiers: fit it with fit_reference(..., folds=N)")
        rows = np.asarray(rows)
        fold = np.where(rows >= 0, self.fold_of_row[np.maximum(rows, 0)], -1)  # (N,)
        predicted = np.empty(len(z), dtype=self.classifier.classes_.dtype)
        for f in np.unique(fold):
            chosen = fold == f
            predicted[chosen] = (self.classifier if f < 0 else self.fold_classifiers[f]).predict(z[chosen])
        return predicted

    def class_probability(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 images, (N,) class numbers -> (N,) the classifier's probability of each image's class
        (0 for a class it was not fitted on)."""
        proba = self.classifier.predict_proba(self.features(images))  # (N, C), columns in classes_ order
        classes = self.classifier.classes_
        column = np.clip(np.searchsorted(classes, labels), 0, len(classes) - 1)  # (N,)
        return np.where(classes[column] == labels, proba[np.arange(len(labels)), column], 0.0)


def fit_reference(real_images: np.ndarray, real_labels: np.ndarray, config: AuditConfig = AuditConfig(),
                  folds: int = 0) -> Reference:
    """PCA and the reference classifier fitted on (at most config.max_fit of) the real images (M,H,W,3), labels (M,);
    with `folds` >= 2 also one classifier per fold that leaves that fold out (Reference.predict_unseen: the audit)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(config.seed)
    order = rng.permutation(real_images.shape[0])
    # labelled rows first (a stable sort: a fully labelled set keeps its order, and its fit sample as before), so that
    # a split that is mostly unlabelled (STL-10's train: 5,000 of 105,000) gives the classifier its labelled images,
    # not the 464 that a sample of 10,000 over all rows holds
    fit_rows = order[np.argsort(real_labels[order] < 0, kind="stable")][: config.max_fit]
    fit_x = _flat(real_images[fit_rows])  # (min(M, max_fit), P): never all M images as floats
    pca = PCA(n_components=min(config.pca_components, len(fit_rows), fit_x.shape[1]), random_state=config.seed)
    pca.fit(fit_x)
    del fit_x
    chunk = max(1, 2**22 // real_images[0].size)  # rows whose floats take 16 MiB
    real_z = np.concatenate([pca.transform(_flat(real_images[i:i + chunk]))  # (M, c), a chunk's floats at a time
                             for i in range(0, len(real_images), chunk)])
    labelled = real_labels[fit_rows] >= 0
    if len(np.unique(real_labels[fit_rows][labelled])) < 2:
        raise ValueError("the real data needs labels of at least 2 classes for the reference classifier")
    fit = lambda rows: make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)).fit(  # noqa: E731
        real_z[rows], real_labels[rows])
    classifier = fit(fit_rows[labelled])
    pair_a, pair_b = rng.integers(0, len(real_z), 2000), rng.integers(0, len(real_z), 2000)
    typical = float(np.median(np.sqrt(((real_z[pair_a] - real_z[pair_b]) ** 2).sum(-1))))
    if folds < 2:
        return Reference(pca, classifier, real_z, len(fit_rows), int(labelled.sum()), typical)
    fold_of_row = np.full(len(real_z), -1)
    fold_of_row[fit_rows] = np.arange(len(fit_rows)) % folds  # fit_rows is a seeded permutation: random folds
    fold_classifiers = tuple(fit(fit_rows[labelled & (fold_of_row[fit_rows] != f)]) for f in range(folds))
    return Reference(pca, classifier, real_z, len(fit_rows), int(labelled.sum()), typical, fold_of_row,
                     fold_classifiers)


def _check_shapes(anchors: np.ndarray, positives: np.ndarray, anchor_labels: np.ndarray,
                  real_images: np.ndarray) -> None:
    n = positives.shape[0]
    if anchors.shape[0] != n or anchor_labels.shape[0] != n or positives.shape[2:] != anchors.shape[1:]:
        raise ValueError(f"anchors {anchors.shape}, positives {positives.shape}, labels {anchor_labels.shape} disagree")
    if real_images.shape[1:] != anchors.shape[1:]:
        raise ValueError(f"real images {real_images.shape[1:]} and shard images {anchors.shape[1:]} differ in size: "
                         "open the source at the shards' image size")


def _nearest_real(anchor_z: np.ndarray, real_z: np.ndarray, index: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Distances (N, M) from each anchor to every real image, and its k nearest real rows (N, k), nearest first; an
    anchor is never its own neighbour (by its row `index[i]`, or where that is -1, by an exact match)."""
    dist = pairwise_distance(anchor_z, real_z)  # (N, M)
    own = index >= 0
    dist[np.arange(len(anchor_z))[own], index[own]] = np.inf
    dist[(~own)[:, None] & (dist <= 1e-4)] = np.inf
    return dist, np.argsort(dist, axis=1)[:, :k]


def audit_arrays(
    anchors: np.ndarray,
    positives: np.ndarray,
    anchor_labels: np.ndarray,
    real_images: np.ndarray,
    real_labels: np.ndarray,
    anchor_real_index: np.ndarray | None = None,
    heldout_images: np.ndarray | None = None,
    heldout_labels: np.ndarray | None = None,
    config: AuditConfig = AuditConfig(),
    reference: Reference | None = None,
) -> dict:
    """Audit numbers from arrays: anchors (N,H,W,3), positives (N,K,H,W,3), labels (N,), real set (M,H,W,3)/(M,).

    `anchor_real_index[i]` is anchor i's row in the real set (-1 if absent); that row is never its own neighbour.
    `reference`: one fitted on these real images with config.folds folds (fit_reference) to reuse across calls; None
    fits it here. Every image is classified as unseen (Reference.predict_unseen; the module doc says why).
    """
    n, k = positives.shape[:2]
    _check_shapes(anchors, positives, anchor_labels, real_images)
    index = np.full(n, -1) if anchor_real_index is None else np.asarray(anchor_real_index)
    ref = reference if reference is not None else fit_reference(real_images, real_labels, config, config.folds)
    if ref.real_z.shape[0] != real_images.shape[0]:
        raise ValueError(f"the reference was fitted on {ref.real_z.shape[0]} real images, not these {len(real_images)}")
    real_z = ref.real_z  # (M, c)
    anchor_z = ref.features(anchors)  # (N, c)
    pos_z = ref.features(positives.reshape(n * k, *anchors.shape[1:])).reshape(n, k, -1)  # (N, K, c)

    dist, knn_idx = _nearest_real(anchor_z, real_z, index, k)  # (N, M), (N, K)
    nn_idx = knn_idx[:, 0]  # (N,)

    has_label = anchor_labels >= 0
    pos_pred = ref.predict_unseen(pos_z.reshape(n * k, -1), np.repeat(index, k)).reshape(n, k)  # (N, K)
    nn_pred = ref.predict_unseen(real_z[nn_idx], nn_idx)  # (N,)
    anchor_pred = ref.predict_unseen(anchor_z, index)  # (N,)
    labels_l = anchor_labels[has_label]
    # a neighbour's true label is known only where it has one: STL-10's train split is 5,000 labelled images and
    # 100,000 unlabelled ones (-1), and an unlabelled neighbour is of unknown class, not of another one
    nn_labels = real_labels[nn_idx]  # (N,)
    known_nn = has_label & (nn_labels >= 0)
    hard_pos = np.sqrt(((pos_z - anchor_z[:, None, :]) ** 2).sum(-1))  # (N, K)
    hard_nn = dist[np.arange(n), nn_idx]  # (N,)
    result = {
        "anchors": int(n),
        "k": int(k),
        "labelled_anchors": int(has_label.sum()),
        "nearest_real_labelled": int(known_nn.sum()),  # labelled anchors whose nearest real neighbour has a label
        "feature_space": ref.describe(),
        "explained_variance_pct": float(ref.pca.explained_variance_ratio_.sum() * 100.0),
        "reference_classifier": f"LogisticRegression on standardised PCA features of the real labelled images, "
                                f"each image scored as unseen ({len(ref.fold_classifiers)}-fold)",
        "typical_real_pair_distance": ref.typical_distance,
        "agreement_pct": {
            "synthetic": _pct(pos_pred[has_label] == labels_l[:, None]),
            "nearest_real": _pct(nn_pred[has_label] == labels_l),
            "nearest_real_true_label": _pct(nn_labels[known_nn] == anchor_labels[known_nn]),
            "anchor_itself": _pct(anchor_pred[has_label] == labels_l),
        },
        "hardness": {"synthetic": float(hard_pos.mean()), "nearest_real": float(hard_nn.mean())},
        "diversity": {
            "synthetic": float(_mean_pairwise(pos_z).mean()) if k > 1 else None,
            "nearest_real": float(_mean_pairwise(real_z[knn_idx]).mean()) if k > 1 else None,
        },
        "config": asdict(config),
    }
    if heldout_images is not None and heldout_labels is not None and (heldout_labels >= 0).any():
        keep = heldout_labels >= 0
        pred = ref.classifier.predict(ref.features(heldout_images[keep]))
        result["reference_heldout_accuracy_pct"] = _pct(pred == heldout_labels[keep])
    return result


def audit_markdown(result: dict) -> str:
    """The audit as a Markdown table (synthetic positives beside each anchor's nearest real neighbour)."""
    a, h, d = result["agreement_pct"], result["hardness"], result["diversity"]
    fmt = lambda v, p=1: "n/a" if v is None or v != v else f"{v:.{p}f}"  # noqa: E731  (NaN: no such image)
    labelled, anchors = result.get("labelled_anchors", result["anchors"]), result["anchors"]
    over = f" ({labelled} labelled: the class agreements are over these)" if labelled < anchors else ""
    known_nn = result.get("nearest_real_labelled", labelled)
    nn_over = (f" (of the {known_nn} labelled anchors whose nearest neighbour has a label)" if known_nn < labelled
               else "")
    lines = [
        f"Audit of {anchors} anchors{over} x {result['k']} synthetic positives. Feature space: "
        f"{result['feature_space']} ({result['explained_variance_pct']:.1f}% of pixel variance).",
        "",
        "| metric | synthetic positives | nearest real neighbour (NNCLR) |",
        "|---|---|---|",
        f"| class agreement with anchor, % (reference classifier) | {fmt(a['synthetic'])} | {fmt(a['nearest_real'])} |",
        f"| hardness: distance to anchor (mean) | {fmt(h['synthetic'], 3)} | {fmt(h['nearest_real'], 3)} |",
        f"| diversity: mean pairwise distance among {result['k']} | {fmt(d['synthetic'], 3)} | "
        f"{fmt(d['nearest_real'], 3)} (its {result['k']} nearest) |",
        "",
        f"Scale: median distance between two random real images {result['typical_real_pair_distance']:.3f}. "
        f"The nearest neighbour's true label matches the anchor's {fmt(a['nearest_real_true_label'])}% of the time"
        f"{nn_over}; "
        f"the reference classifier ({result['reference_classifier']}) labels the anchors themselves correctly "
        f"{fmt(a['anchor_itself'])}% of the time"
        + (f" and held-out real images {fmt(result['reference_heldout_accuracy_pct'])}%." if
           "reference_heldout_accuracy_pct" in result else "."),
    ]
    if result.get("source_matches_shards") is False:
        lines += ["", "WARNING: the shards were not made from this source (fingerprints differ): the anchors' nearest "
                      "real neighbours and the reference classifier come from other data."]
    return "\n".join(lines) + "\n"


def sample_key(seed: int, anchor_id: str) -> int:
    return keyed_seed(seed, anchor_id)


def load_shard_sample(shards_dir: str, max_anchors: int, seed: int = 0):
    """(anchors (N,H,W,3), positives (N,K,H,W,3), labels (N,), ids, manifest run dict) for a hashed-id sample."""
    from clsp.shards.manifest import read_manifest

    manifest = read_manifest(shards_dir)
    heap: list[tuple[int, str, object]] = []  # max-heap (negated keys) of the max_anchors smallest hashed ids
    for sample in manifest.samples():  # each checked against the manifest, as training reads them: a sample or shard
        # it does not vouch for (changed pixels, an extra anchor or positive, another image size) is refused
        item = (-sample_key(seed, sample.key), sample.key, sample)
        if len(heap) < max_anchors:
            heapq.heappush(heap, item)
        elif item[0] > heap[0][0]:
            heapq.heapreplace(heap, item)
    if not heap:
        raise ValueError(f"{shards_dir} holds no samples: build shards with `clsp synth run` first")
    chosen = [s for _, _, s in sorted(heap, key=lambda t: t[1])]  # id order
    anchors = np.stack([s.anchor() for s in chosen])
    positives = np.stack([np.stack([s.positive(j) for j in range(s.k)]) for s in chosen])
    labels = np.array([s.label for s in chosen], dtype=np.int64)
    return anchors, positives, labels, [s.key for s in chosen], manifest.run


def anchor_rows(ids: list[str], anchors: np.ndarray, real_ids: list[str], real_images: np.ndarray) -> np.ndarray:
    """(N,) each anchor's row in the real set (N anchors (N, H, W, 3), M real images (M, H, W, 3)): by its id where
    that row holds the anchor's pixels, else by its pixels; -1 where it is not there. Pixels too, because the audit
    reads the train split and ids under --split all name the split (cifar10-all-00003 is cifar10-train-00003; a
    folder's train/ images gain a `train-` prefix): an anchor not found would be judged by a classifier fitted on it.
    And an id alone is not enough: two splits' images can share one (a folder's train/cat/0.png and test/cat/0.png are
    both cat-0 under their own split), and a test anchor taken for a train image would leave that image out."""
    by_id = {anchor_id: i for i, anchor_id in enumerate(real_ids)}
    rows = np.array([by_id.get(anchor_id, -1) for anchor_id in ids], dtype=np.int64)
    for i in np.flatnonzero(rows >= 0):
        if not np.array_equal(anchors[i], real_images[rows[i]]):
            rows[i] = -1
    if (rows < 0).any():
        by_pixels = {hashlib.sha256(image.tobytes()).digest(): i for i, image in enumerate(real_images)}
        for i in np.flatnonzero(rows < 0):
            rows[i] = by_pixels.get(hashlib.sha256(anchors[i].tobytes()).digest(), -1)
    return rows


def audit_shards(shards_dir: str, source_spec: str, config: AuditConfig = AuditConfig(), real: tuple | None = None,
                 held: tuple | None = None) -> dict:
    """Audit a sample of a shard directory against its real source (train split fits, test split checks).

    `real`: (images, labels, ids, fingerprint) of the whole train split of `source_spec`, and `held`: (images, labels)
    of its test split, when the caller holds them already (`clsp eval all`): used where their image size is the
    shards', so that the split is not held twice (at 224 px ImageNet-100's train split takes 17.8 GiB)."""
    from clsp.errors import UserError
    from clsp.sources import load_arrays, open_source

    anchors, positives, labels, ids, run = load_shard_sample(shards_dir, config.max_anchors, config.seed)
    size = int(anchors.shape[1])
    if real is not None and real[0].shape[1:] != anchors.shape[1:]:
        real = None
    real_images, real_labels, real_ids = real[:3] if real is not None else \
        load_arrays(open_source(source_spec, "train", image_size=size))
    index = anchor_rows(ids, anchors, real_ids, real_images)
    if held is not None and held[0].shape[1:] == anchors.shape[1:]:
        held_images, held_labels = held[:2]
    else:
        try:
            held_images, held_labels, _ = load_arrays(open_source(source_spec, "test", image_size=size))
        except UserError:  # a source without a test split is audited without the held-out check
            held_images, held_labels = None, None
    result = audit_arrays(anchors, positives, labels, real_images, real_labels, index, held_images, held_labels, config)
    result["shards"] = {"source": run.get("source"), "generator": run.get("generator"), "sampler": run.get("sampler")}
    made_from = run.get("source") or {}
    try:  # were the shards made from this very source? (fingerprints cover ids, labels, pixels and image size)
        same = real[3] if real is not None and made_from.get("split", "train") == "train" else \
            open_source(source_spec, made_from.get("split", "train"), image_size=size).fingerprint()
        result["source_matches_shards"] = same == made_from.get("fingerprint")
    except UserError:
        result["source_matches_shards"] = False
    result["anchors_found_in_source"] = int((index >= 0).sum())
    return result


def write_audit(result: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """audit.json and audit.md in out_dir (never silently replacing an earlier, different audit)."""
    from clsp.eval import write_new_set

    json_path, md_path = write_new_set(audit_files(result, out_dir))
    return json_path, md_path


def audit_files(result: dict, out_dir: str | Path) -> dict[Path, str]:
    """{path: text} of audit.json (a figure over no image, NaN in `result`, as null: strict JSON) and audit.md."""
    out_dir = Path(out_dir)
    strict = json.loads(json.dumps(result), parse_constant=lambda name: None)  # NaN, Infinity -> None
    return {out_dir / "audit.json": json.dumps(strict, indent=2, sort_keys=True, allow_nan=False) + "\n",
            out_dir / "audit.md": audit_markdown(result)}
