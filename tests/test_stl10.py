"""STL-10 in its official binary form (`stl10:DIR`): the file layout, splits and ids, damaged files, and a run trained
on its train split (labelled + unlabelled images) scored by plain `clsp eval all` on the labelled images only."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from clsp.cli import app
from clsp.errors import UserError
from clsp.shards.schema import ID_PATTERN
from clsp.sources import load_arrays, open_source

SIDE, IMAGE = 96, 3 * 96 * 96
CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
TRAIN_Y, TEST_Y = [1, 2, 3, 10, 5, 6], [1, 1, 2, 2]  # as stored: 1..10


def _stl10(parent: Path, unlabeled: int | None = 5, seed: int = 0) -> Path:
    """parent/stl10_binary as the official archive unpacks it: 6 train, 4 test and `unlabeled` unlabelled 96 px images
    (each channel column-major), train_y/test_y labels 1..10, class_names.txt. -> the stl10_binary folder."""
    folder = parent / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name, count in (("train_X.bin", 6), ("test_X.bin", 4), ("unlabeled_X.bin", unlabeled)):
        if count is not None:
            (folder / name).write_bytes(rng.integers(0, 256, count * IMAGE, dtype=np.uint8).tobytes())
    (folder / "train_y.bin").write_bytes(bytes(TRAIN_Y))
    (folder / "test_y.bin").write_bytes(bytes(TEST_Y))
    (folder / "class_names.txt").write_text("\n".join(CLASSES) + "\n")
    (folder / "fold_indices.txt").write_text("0 1 2\n3 4 5\n")
    return folder


def _poke(file: Path, image: int, channel: int, row: int, column: int, value: int) -> None:
    """Write one byte where the format puts pixel (row, column) of `channel`: a channel is stored column by column."""
    data = bytearray(file.read_bytes())
    data[image * IMAGE + channel * SIDE * SIDE + column * SIDE + row] = value
    file.write_bytes(bytes(data))


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_pixels_land_at_row_column_channel_and_labels_read_0_to_9(tmp_path):
    folder = _stl10(tmp_path)
    _poke(folder / "train_X.bin", 2, 1, 20, 10, 7)  # row 20, column 10: not (10, 20), which a row-major read gives
    _poke(folder / "train_X.bin", 2, 1, 10, 20, 200)
    _poke(folder / "test_X.bin", 3, 2, 95, 0, 9)
    _poke(folder / "unlabeled_X.bin", 4, 0, 0, 95, 11)
    train = open_source(f"stl10:{tmp_path}")  # the parent, as the download root
    images, labels, ids = load_arrays(train)
    assert images.shape == (11, 96, 96, 3) and train.image_size == 96
    assert images[2, 20, 10, 1] == 7 and images[2, 10, 20, 1] == 200
    assert images[10, 0, 95, 0] == 11  # the last unlabelled image
    assert load_arrays(open_source(f"stl10:{folder}", "test"))[0][3, 95, 0, 2] == 9  # the folder itself works too
    assert labels.tolist() == [0, 1, 2, 9, 4, 5] + [-1] * 5
    assert train.classes == CLASSES
    resized = open_source(f"stl10:{folder}", "train", image_size=16)
    assert next(iter(resized)).image.shape == (16, 16, 3) and resized.fingerprint() != train.fingerprint()


def test_splits_and_ids_that_do_not_depend_on_the_split(tmp_path):
    spec = f"stl10:{_stl10(tmp_path)}"
    train, test, every = (open_source(spec, split) for split in ("train", "test", "all"))
    train_ids = [f"stl10-train-{i:05d}" for i in range(6)] + [f"stl10-unlabeled-{i:06d}" for i in range(5)]
    test_ids = [f"stl10-test-{i:05d}" for i in range(4)]
    assert [r.anchor_id for r in train] == train_ids and [r.anchor_id for r in test] == test_ids
    assert [r.anchor_id for r in every] == train_ids + test_ids
    assert all(ID_PATTERN.fullmatch(i) for i in train_ids + test_ids)
    assert [r.label for r in test] == [0, 0, 1, 1] and [r.label for r in every][-4:] == [0, 0, 1, 1]
    pixels = {r.anchor_id: r.image.tobytes() for r in every}
    assert all(pixels[r.anchor_id] == r.image.tobytes() for source in (train, test) for r in source)
    assert "6 labelled, then 5 unlabelled" in train.splits and "test (4 labelled)" in train.splits
    info = _cli("data", "info", spec)
    assert info.exit_code == 0, info.output
    described = json.loads(info.output)
    assert (described["count"], described["labelled"], described["classes"], described["image_size"]) == (11, 6, 10, 96)
    assert described["fingerprint"] == train.fingerprint()
    assert json.loads(_cli("data", "info", spec, "--split", "all").output)["count"] == 15


def test_without_the_unlabelled_file_train_is_the_labelled_images_and_data_info_says_so(tmp_path):
    spec = f"stl10:{_stl10(tmp_path, unlabeled=None)}"
    train = open_source(spec)
    assert [r.label for r in train] == [0, 1, 2, 9, 4, 5] and len(open_source(spec, "all")) == 10
    info = _cli("data", "info", spec)
    assert info.exit_code == 0 and "no unlabeled_X.bin" in json.loads(info.output)["splits"]


def test_opening_reads_no_pixels_and_a_labelled_load_reads_past_the_unlabelled(tmp_path):
    """A sparse 100,000-image unlabeled_X.bin (2.7 GB, no blocks on disk): opening it and loading the labelled images
    reads only those."""
    folder = _stl10(tmp_path, unlabeled=None)
    with open(folder / "unlabeled_X.bin", "wb") as handle:
        handle.truncate(100_000 * IMAGE)
    train = open_source(f"stl10:{tmp_path}")
    assert len(train) == 100_006 and (train.labels() >= 0).sum() == 6
    read = []
    load = train._load
    train._load = lambda i: read.append(i) or load(i)
    images, labels, ids = load_arrays(train, labelled=True)
    assert images.shape == (6, 96, 96, 3) and labels.tolist() == [0, 1, 2, 9, 4, 5] and sorted(read) == list(range(6))
    assert json.loads(_cli("data", "info", f"stl10:{tmp_path}", "--split", "test").output)["count"] == 4


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:-1])


@pytest.mark.parametrize("damage, file, why", [
    (_truncate, "train_X.bin", "165,887 bytes, not a positive multiple of 27,648"),
    (lambda f: f.write_bytes(b""), "unlabeled_X.bin", "0 bytes"),
    (lambda f: f.write_bytes(bytes([1, 2, 3, 0, 5, 6])), "train_y.bin", "label 0 at row 3, where labels are 1..10"),
    (lambda f: f.write_bytes(bytes([1, 11, 2, 2])), "test_y.bin", "label 11 at row 1"),
    (lambda f: f.write_bytes(bytes([1, 2, 3])), "train_y.bin", "3 labels for the 6 images of train_X.bin"),
    (lambda f: f.write_text("cat\ndog\n"), "class_names.txt", "2 class names, not 10"),
])
def test_a_damaged_file_is_one_error_line_naming_it_and_the_fix(tmp_path, damage, file, why):
    folder = _stl10(tmp_path)
    damage(folder / file)
    result = _cli("data", "info", f"stl10:{tmp_path}", "--split", "all")
    assert result.exit_code == 2 and result.output.startswith("error: ") and "Traceback" not in result.output
    assert f"{folder / file} is not a file of STL-10's binary version ({why}" in result.output, result.output
    assert "download the binary version again" in result.output and "stl10_binary.tar.gz" in result.output
    assert "torchvision.datasets.STL10(DIR, download=True)" in result.output


def test_missing_files_name_the_folder_to_point_to(tmp_path):
    folder = _stl10(tmp_path)
    (folder / "test_y.bin").unlink()
    assert len(open_source(f"stl10:{tmp_path}")) == 11  # the train split needs no test file
    result = _cli("data", "info", f"stl10:{tmp_path}", "--split", "test")
    assert result.exit_code == 2 and f"{folder} lacks test_y.bin" in result.output
    assert "stl10_binary" in result.output and "Traceback" not in result.output
    with pytest.raises(UserError, match="lacks train_X.bin, train_y.bin"):
        open_source(f"stl10:{tmp_path / 'nowhere'}")


def test_kfold_scoring_reads_the_labelled_images_of_every_split(tmp_path):
    from clsp.eval.kfold import load_labelled

    data = load_labelled(f"stl10:{_stl10(tmp_path)}", 8)
    assert data.ids == tuple(f"stl10-train-{i:05d}" for i in range(6)) + tuple(f"stl10-test-{i:05d}" for i in range(4))
    assert data.images.shape == (10, 8, 8, 3) and (data.labels >= 0).all()


@pytest.fixture(scope="module")
def stl10_run(tmp_path_factory, generator):
    """A fake STL-10 -> `clsp synth run` (8 px, the tiny untrained UNet) -> `clsp train run`, kNN monitor on it."""
    root = tmp_path_factory.mktemp("stl10")
    spec = f"stl10:{_stl10(root / 'data')}"
    shards, run = root / "shards", root / "run"
    made = _cli("synth", "run", spec, "--model", generator, "--out", shards, "--image-size", "8", "--k", "2",
                "--steps", "1", "--anchors-per-shard", "6")
    assert made.exit_code == 0, made.output
    trained = _cli("train", "run", shards, "--out", run, "--width", "2", "--epochs", "1", "--batch-size", "4",
                   "--workers", "0", "--proj-hidden", "16", "--proj-dim", "8", "--warmup-epochs", "0",
                   "--knn-every", "1", "--knn-source", spec)
    assert trained.exit_code == 0, trained.output
    return root, spec, shards, run


def test_a_run_on_the_train_split_is_scored_on_its_labelled_images_by_plain_eval_all(stl10_run):
    root, spec, shards, run = stl10_run
    with open(run / "log.csv", newline="") as handle:  # the monitor's bank: the labelled images
        assert [row["knn_top1_pct"] for row in csv.DictReader(handle) if row["knn_top1_pct"]]
    result = _cli("eval", "all", run, "--shards", shards, "--out", root / "report", "--probe-epochs", "2",
                  "--audit-anchors", "4")
    assert result.exit_code == 0, result.output
    assert f"kNN bank and linear probe: the 6 labelled images of {spec}[train] (5 unlabelled left out)" in result.output
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["source"] == spec and results["source_check"] == "same" and results["bank_unlabelled_left_out"] == 5
    assert set(results["knn"]) == {"5", "6"}  # k capped at the 6 labelled images of the bank, not its 11
    assert 0.0 <= results["knn_best"] <= 100.0 and 0.0 <= results["linear_top1"] <= 100.0
    assert np.load(run / "eval" / results["test_labels"]).tolist() == [0, 0, 1, 1]
    assert results["class_names"] == CLASSES
    knn = _cli("eval", "knn", run)  # the other commands take it plainly too
    assert knn.exit_code == 0 and json.loads((run / "eval" / "knn.json").read_text())["bank_unlabelled_left_out"] == 5


def test_eval_refuses_a_bank_without_labels_and_a_test_set_with_unlabelled_images(stl10_run, tmp_path):
    from conftest import write_hf_parquet

    _, spec, _, run = stl10_run
    before = sorted((run / "eval").glob("*.json")) if (run / "eval").is_dir() else []
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(4)]
    write_hf_parquet(tmp_path / "some" / "test.parquet", images, [0, None, 1, 2])
    partly = _cli("eval", "knn", run, "--test-source", f"parquet:{tmp_path / 'some' / 'test.parquet'}")
    assert partly.exit_code == 2 and "Traceback" not in partly.output
    assert "has 1 unlabelled images of 4, and the test accuracy is over every test image" in partly.output
    assert "--test-source a test set whose images all have labels" in partly.output
    write_hf_parquet(tmp_path / "none" / "train.parquet", images, [None] * 4)
    write_hf_parquet(tmp_path / "none" / "test.parquet", images[:2], [0, 1])
    bare = _cli("eval", "knn", run, "--source", f"parquet:{tmp_path / 'none'}", "--transfer")
    assert bare.exit_code == 2 and "Traceback" not in bare.output
    assert "has no labelled image" in bare.output and "pass --source a labelled source" in bare.output
    assert (sorted((run / "eval").glob("*.json")) if (run / "eval").is_dir() else []) == before  # nothing written
