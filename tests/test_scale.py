"""Scale guards: what an ImageNet-100-sized source (126,689 images; 17.8 GiB as uint8 at 224 px) must not do twice, or
in time that grows faster than the images."""
from __future__ import annotations

import numpy as np
import pytest

from test_eval import TINY_TRAIN, tiny_world  # noqa: F401 (a module fixture)


def test_eval_all_holds_the_train_split_once(tiny_world, monkeypatch):  # noqa: F811
    """`clsp eval all` reads the train split for the bank and then the audit: the audit must use the arrays already
    in memory, not a second copy of the split (two at once: 35.5 GiB at 224 px)."""
    import clsp.sources
    from clsp.eval.evaluate import EvalConfig
    from clsp.eval.evaluate_all import AllConfig, evaluate_all
    from clsp.eval.linear import ProbeConfig
    from clsp.train.loop import make_config, train

    root, shards, source = tiny_world
    run = root / "run-scale"
    train(make_config(None, shards=str(shards), out=str(run), method="simclr", positives="synthetic",
                      **dict(TINY_TRAIN)))
    reads, load = [], clsp.sources.load_arrays

    def counted(src, *args, **kwargs):
        reads.append(src.split)
        return load(src, *args, **kwargs)

    monkeypatch.setattr(clsp.sources, "load_arrays", counted)
    result = evaluate_all(AllConfig(str(run), str(shards), str(root / "report-scale"),
                                    EvalConfig(source=source, probe=ProbeConfig(epochs=2, milestones=(1,))),
                                    audit_anchors=8))
    assert reads.count("train") == 1 and reads.count("test") == 1, reads
    assert result["results"]["knn_best"] >= 0


def test_parquet_row_numbers_do_not_walk_the_row_groups(tmp_path):
    """A Hugging Face image Parquet file has row groups of 100 rows (datasets' PARQUET_ROW_GROUP_SIZE_FOR_IMAGE_DATASETS):
    one id must not cost a walk over the groups before it (126,689 rows in one file: 80 M metadata calls a pass)."""
    from conftest import write_hf_parquet

    from clsp.sources import open_source

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(50)]
    write_hf_parquet(tmp_path / "train-0.parquet", images, [i % 3 for i in range(50)], row_group_size=3)
    source = open_source(f"parquet:{tmp_path}")
    ids = [r.anchor_id for r in source]
    assert ids[49].endswith("-0000049")

    class NoMetadata:  # the row number must come from offsets taken once when the source is opened
        def __getattr__(self, name):
            raise AssertionError(f"per-row metadata read: {name}")

    real, source._files = source._files, [NoMetadata()]
    try:
        assert [source._row_number(*h) for h in source._handles] == list(range(50))
    finally:
        source._files = real


def test_the_reference_classifier_fits_the_labelled_images_of_a_mostly_unlabelled_split():
    """STL-10's train split: 5,000 labelled among 105,000. A fit sample drawn over all rows gives the classifier 464
    labelled images (seed 0); it must get min(max_fit, labelled) of them."""
    from clsp.eval.audit import AuditConfig, fit_reference

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2100, 4, 4, 3), dtype=np.uint8)
    labels = np.r_[np.arange(100) % 5, -np.ones(2000, np.int64)]  # 100 labelled, then 2,000 unlabelled
    config = AuditConfig(max_fit=500, pca_components=4)
    reference = fit_reference(images, labels, config)
    assert reference.classifier[0].n_samples_seen_ == 100
    assert reference.describe().endswith("fitted on 500 real images (100 labelled)")  # what a manifest records
    full = fit_reference(images[:500], np.arange(500) % 5, config)  # every row labelled: the fit sample as before
    assert full.classifier[0].n_samples_seen_ == 500 and full.describe().endswith("fitted on 500 real images")


def test_the_manifest_indexes_shards_on_several_cores_a_window_at_a_time(tmp_path, monkeypatch):
    """write_manifest decodes every positive of every shard (ImageNet-100 at 224 px, K = 8: 1.1 M PNGs, 44 min on one
    core): shards are indexed a few at a time in threads, at most `cores` shards held at once, into the same index
    as one at a time."""
    import threading

    import clsp.shards.manifest_writer as writer
    from conftest import build_shard_dir

    from clsp.shards.manifest import read_manifest

    monkeypatch.setattr(writer, "available_cores", lambda: 1)
    serial = build_shard_dir(tmp_path / "a", counts=(3, 3, 3, 3, 2), k=2, size=8)
    monkeypatch.setattr(writer, "available_cores", lambda: 3)
    running, most, lock, index_shard = [0], [0], threading.Lock(), writer._index_shard
    together = threading.Barrier(3, timeout=60)  # the first 3 shards wait for each other: they must be read at once

    def counted(*args):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            if args[0].name in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar"):
                together.wait()
            return index_shard(*args)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(writer, "_index_shard", counted)
    threaded = build_shard_dir(tmp_path / "b", counts=(3, 3, 3, 3, 2), k=2, size=8)
    assert most[0] == 3  # three at once, never more
    a, b = read_manifest(serial), read_manifest(threaded)
    assert a.index.equals(b.index) and a.shards == b.shards
