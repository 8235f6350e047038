"""Audit of synthetic positives on hand-made arrays: identical positives, wrong-class positives, spread positives."""

import json
import math

import numpy as np
import pytest

from clsp.eval.audit import AuditConfig, audit_arrays, audit_files, audit_markdown, write_audit


def digit_like(n_per_class: int, seed: int):
    """Three classes of 8x8 RGB images: a bright bar in a class-specific place, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), n_per_class)
    images = rng.integers(0, 40, size=(len(labels), 8, 8, 3))
    for c in range(3):
        images[labels == c, 2 * c + 1 : 2 * c + 3, :, :] += 200
    return images.astype(np.uint8), labels


CONFIG = AuditConfig(max_anchors=64, pca_components=8)


def test_positives_equal_to_anchors_are_easy_and_agree():
    real, labels = digit_like(20, 0)
    anchors, anchor_labels = real[::4], labels[::4]
    positives = np.repeat(anchors[:, None], 3, axis=1)  # (N, 3, 8, 8, 3): K copies of the anchor
    result = audit_arrays(anchors, positives, anchor_labels, real, labels, np.arange(0, len(real), 4), config=CONFIG)
    assert result["hardness"]["synthetic"] == pytest.approx(0.0, abs=1e-6)
    assert result["diversity"]["synthetic"] == pytest.approx(0.0, abs=1e-6)
    assert result["agreement_pct"]["synthetic"] == 100.0
    assert result["hardness"]["nearest_real"] > 0.0  # the anchor itself is never its own neighbour
    assert result["agreement_pct"]["nearest_real_true_label"] == 100.0
    assert result["diversity"]["nearest_real"] > 0.0


def test_wrong_class_positives_disagree_and_are_far():
    real, labels = digit_like(20, 1)
    anchors, anchor_labels = real[labels == 0][:10], labels[labels == 0][:10]
    positives = np.repeat(real[labels == 2][:10, None], 2, axis=1)  # class-2 images as "positives" of class 0
    result = audit_arrays(anchors, positives, anchor_labels, real, labels, config=CONFIG)
    assert result["agreement_pct"]["synthetic"] == 0.0
    assert result["hardness"]["synthetic"] > result["hardness"]["nearest_real"]
    assert result["agreement_pct"]["anchor_itself"] == 100.0


def test_audit_writes_json_and_markdown_without_overwriting(tmp_path):
    real, labels = digit_like(10, 2)
    positives = np.stack([real[:6], np.roll(real[:6], 1, axis=1)], axis=1)  # (6, 2, 8, 8, 3)
    result = audit_arrays(real[:6], positives, labels[:6], real, labels, heldout_images=real, heldout_labels=labels,
                          config=CONFIG)
    json_path, md_path = write_audit(result, tmp_path)
    assert json.loads(json_path.read_text())["k"] == 2
    table = md_path.read_text()
    assert "| class agreement with anchor" in table and "held-out real images" in table
    changed = dict(result, anchors=7)
    assert write_audit(changed, tmp_path)[0].name == "audit-2.json"
    assert "synthetic positives" in audit_markdown(result)


def test_audit_refuses_size_mismatch():
    real, labels = digit_like(5, 3)
    with pytest.raises(ValueError, match="image size"):
        audit_arrays(real[:2, :4, :4], np.zeros((2, 2, 4, 4, 3), np.uint8), labels[:2], real, labels, config=CONFIG)


def test_real_images_are_scored_by_a_classifier_that_did_not_see_them():
    """Labels that have nothing to do with the pixels: a classifier fitted on every real image recalls many of them
    (its own training labels), which made the anchors and their neighbours look far more class-consistent than the
    positives. Scored as unseen (each image by the fold that left it out, each positive by the fold that left out its
    anchor), every column is near chance, as it must be when there is nothing to learn."""
    from clsp.eval.audit import fit_reference

    rng = np.random.default_rng(5)
    real = rng.integers(0, 256, size=(90, 8, 8, 3)).astype(np.uint8)
    labels = rng.integers(0, 3, 90)  # chance: 1/3
    config = AuditConfig(max_anchors=90, pca_components=48)
    seen = fit_reference(real, labels, config).classifier
    remembered = float((seen.predict(fit_reference(real, labels, config).features(real)) == labels).mean()) * 100
    assert remembered > 90  # in sample, the classifier knows its training labels
    positives = real[:, None].repeat(2, axis=1)  # (90, 2, 8, 8, 3): each anchor's positives are its own pixels
    result = audit_arrays(real, positives, labels, real, labels, np.arange(90), config=config)
    agreement = result["agreement_pct"]
    for column in ("synthetic", "nearest_real", "anchor_itself"):
        assert agreement[column] < 60, (column, agreement)
    assert agreement["synthetic"] == agreement["anchor_itself"]  # the same pixels, by the same (anchor's) classifier


def test_anchors_of_shards_made_under_split_all_are_found_in_the_train_split(tmp_path):
    """Ids under --split all name the split (cifar10-all-00003 is cifar10-train-00003), so the audit found none of
    such shards' anchors in the train split it reads, and judged their positives by a classifier fitted on them."""
    from clsp.eval.audit import anchor_rows
    from clsp.sources import load_arrays, open_source
    from test_sources import fake_cifar10

    fake_cifar10(tmp_path)
    spec = f"cifar10:{tmp_path}"
    anchors, _, ids = load_arrays(open_source(spec, "all"))  # 10 train images, then 3 test images
    real_images, _, real_ids = load_arrays(open_source(spec, "train"))
    assert not set(ids) & set(real_ids)  # no id in common: found by pixels
    assert anchor_rows(ids, anchors, real_ids, real_images).tolist() == [*range(10), -1, -1, -1]
    assert anchor_rows(real_ids[::-1], real_images[::-1], real_ids, real_images).tolist() == list(range(10))[::-1]
    # a test image whose id a train image has too (a folder's train/cat/0.png and test/cat/0.png are both cat-0): it
    # was taken for that train image, which the audit then left out of the anchor's neighbours
    assert anchor_rows(real_ids[:3], anchors[10:], real_ids, real_images).tolist() == [-1, -1, -1]


def test_the_reference_never_holds_every_real_image_as_floats():
    """It fits on at most max_fit images and projects the rest in chunks: a float copy of a large train split (4x its
    bytes) is gigabytes."""
    import tracemalloc

    from clsp.eval.audit import fit_reference

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40000, 12, 12, 3), dtype=np.uint8)  # 17 MB
    labels = np.arange(len(images)) % 4
    tracemalloc.start()
    try:
        reference = fit_reference(images, labels, AuditConfig(max_fit=200), folds=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert reference.real_z.shape[0] == len(images)
    assert peak < 4 * images.nbytes, f"peak {peak / 2**20:.1f} MiB for {images.nbytes / 2**20:.1f} MiB of images"


def test_an_unlabelled_nearest_neighbour_is_not_counted_as_a_label_mismatch():
    real, labels = digit_like(20, 0)  # 60 labelled images, 3 classes
    rows = np.arange(0, len(real), 4)  # 15 anchors, each a row of the real set
    anchors = real[rows]
    copies = anchors[::2]  # unlabelled near-duplicates of 8 anchors, as STL-10's 100,000 unlabelled images hold
    real_all = np.concatenate([real, copies])
    labels_all = np.concatenate([labels, np.full(len(copies), -1)])
    positives = np.repeat(anchors[:, None], 2, axis=1)
    result = audit_arrays(anchors, positives, labels[rows], real_all, labels_all, rows, config=CONFIG)
    # 8 anchors' nearest neighbour is an unlabelled copy: its label is unknown, not another class; the other 7 agree
    assert result["agreement_pct"]["nearest_real_true_label"] == 100.0
    assert "true label matches the anchor's 100.0% of the time" in audit_markdown(result)


def test_an_stl10_audit_reads_unlabelled_neighbours_as_unknown(tmp_path):
    """The same through `stl10:DIR` on disk: every labelled train image has a near-copy among unlabeled_X.bin."""
    from clsp.eval.audit import audit_shards
    from clsp.sources import open_source
    from clsp.shards.manifest_writer import write_manifest
    from clsp.shards.schema import ShardSample
    from clsp.shards.writer import ShardWriter, shard_name

    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 3)
    train = rng.integers(0, 40, (9, 3, 96, 96)).astype(np.uint8)
    for i, label in enumerate(labels):
        train[i, :, 20 * label:20 * label + 20, :] += 200  # a class-specific band of columns
    (folder / "train_X.bin").write_bytes(train.tobytes())
    (folder / "train_y.bin").write_bytes(bytes((labels + 1).tolist()))
    near = np.clip(train.astype(int) + rng.integers(-2, 3, train.shape), 0, 255).astype(np.uint8)
    (folder / "unlabeled_X.bin").write_bytes(near.tobytes())
    spec = f"stl10:{tmp_path}"
    source = open_source(spec, "train", image_size=16)
    shards = tmp_path / "shards"
    shards.mkdir()
    with ShardWriter(shards / shard_name(0), 2, 16, "png") as writer:
        for record in source:
            positives = np.stack([record.image] * 2)
            writer.write(ShardSample(record.anchor_id, record.image, positives, record.label, [1, 2]))
    write_manifest(shards, {"source": {"spec": spec, "split": "train", "fingerprint": source.fingerprint(),
                                       "count": len(source)},
                            "generator": {"model_id": "none", "weights_sha256": "0" * 64},
                            "sampler": {"w": 0.1, "steps": 2, "eta": 0.1}, "k": 2, "seed": 0, "image_size": 16,
                            "anchors_per_shard": len(source), "package_version": "test"})
    result = audit_shards(str(shards), spec, AuditConfig(max_anchors=64, pca_components=4))
    assert result["labelled_anchors"] == 9
    # every labelled anchor's nearest neighbour is its unlabelled near-copy: no labelled neighbour to compare with,
    # so no figure (not 0 %, which read as "every neighbour is of another class")
    assert result["nearest_real_labelled"] == 0 and math.isnan(result["agreement_pct"]["nearest_real_true_label"])
    assert "matches the anchor's n/a% of the time (of the 0 labelled anchors" in audit_markdown(result)
    written = json.loads(audit_files(result, tmp_path)[tmp_path / "audit.json"], parse_constant=pytest.fail)
    assert written["agreement_pct"]["nearest_real_true_label"] is None  # strict JSON: null, not NaN
