"""Data sources: the embedded digits, HF-layout Parquet, an image folder and torchvision's CIFAR folders."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clsp.errors import UserError
from clsp.shards.schema import ID_PATTERN, MAX_ID_CHARS
from clsp.sources import load_arrays, open_source
from conftest import Planted, png_bytes, write_hf_parquet


def _png(rng, size=8) -> bytes:
    return png_bytes(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _parquet(directory, rng, n=7, split="train") -> None:
    """A hub-style file of n 8 px images with ClassLabel names, in row groups of 3."""
    images = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(n)]
    write_hf_parquet(directory / f"{split}-00000-of-00001.parquet", images, [i % 3 for i in range(n)],
                     class_names=["cat", "dog", "eel"], row_group_size=3)


def _assert_ids_good(source):
    ids = [r.anchor_id for r in source]
    assert len(ids) == len(set(ids)) == len(source)
    assert all("." not in i and "/" not in i for i in ids)
    return ids


def test_digits_is_the_real_dataset_with_a_fixed_split():
    train, test = open_source("digits"), open_source("digits", split="test")
    assert (len(train), len(test), train.image_size) == (1437, 360, 16)
    images, labels, ids = load_arrays(test)
    assert images.shape == (360, 16, 16, 3) and images.dtype == np.uint8
    assert sorted(set(labels.tolist())) == list(range(10))
    assert ids[:2] == ["digits-0000", "digits-0005"] and not set(ids) & set(_assert_ids_good(train))
    assert _assert_ids_good(train) == load_arrays(open_source("digits"))[2]  # stable across opens
    assert open_source("digits", image_size=8).records(0, 1).__next__().image.shape == (8, 8, 3)


def test_fingerprint_is_stable_and_tracks_content_and_size():
    a, b = open_source("digits", split="test"), open_source("digits", split="test")
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != open_source("digits", split="test", image_size=8).fingerprint()
    assert a.fingerprint() != open_source("digits", split="train").fingerprint()


def test_parquet_in_hub_layout_reads_in_row_groups(tmp_path):
    rng = np.random.default_rng(0)
    _parquet(tmp_path / "plain_text", rng, n=7)
    _parquet(tmp_path / "plain_text", rng, n=2, split="test")
    source = open_source(f"parquet:{tmp_path}")
    assert len(source) == 7 and source.classes == ["cat", "dog", "eel"]
    ids = _assert_ids_good(source)
    assert ids[0] == "train-00000-of-00001-0000000" and ids[-1].endswith("0000006")
    tail = list(source.records(4, 7))  # slicing crosses row groups of 3
    assert [r.anchor_id for r in tail] == ids[4:] and [r.label for r in tail] == [1, 2, 0]
    assert len(open_source(f"parquet:{tmp_path}", split="test")) == 2
    before = source.fingerprint()
    _parquet(tmp_path / "plain_text", np.random.default_rng(1), n=7)  # same ids and labels, other pixels
    assert open_source(f"parquet:{tmp_path}").fingerprint() != before


def test_image_folder_with_classes_and_resizing(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("b", "a"):
        (tmp_path / name / "sub").mkdir(parents=True)
        for i in range(3):
            (tmp_path / name / f"img.{i}.png").write_bytes(_png(rng, size=12))
        (tmp_path / name / "sub" / "x.png").write_bytes(_png(rng, size=12))
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    source = open_source(f"folder:{tmp_path}", image_size=8)
    assert source.classes == ["a", "b"] and len(source) == 8
    ids = _assert_ids_good(source)
    assert ids[0] == "a-img_0" and "a-sub_x" in ids
    images, labels, _ = load_arrays(source)
    assert images.shape == (8, 8, 8, 3) and labels.tolist() == [0] * 4 + [1] * 4


@pytest.mark.parametrize("kind", ["folder", "parquet"])
def test_one_image_of_another_size_is_refused_when_the_source_is_fingerprinted_before_any_sampling(tmp_path, kind):
    """At the native size the first image sets the size; an odd one far down the id order was refused only when the
    synth job reached it, hours of shards in. The fingerprint, which the job records before sampling, reads every
    file: it now checks each one's size from its header (a 12x16 image crops to 12x12 and passes)."""
    rng = np.random.default_rng(0)
    images = [_png(rng, size=12)] * 5 + [png_bytes(np.zeros((16, 12, 3), np.uint8)), _png(rng, size=14)]
    if kind == "folder":
        (tmp_path / "a").mkdir()
        for i, data in enumerate(images):
            (tmp_path / "a" / f"{i}.png").write_bytes(data)
    else:
        pq.write_table(pa.table({"img": [{"bytes": d, "path": None} for d in images], "label": [0] * 7}),
                       tmp_path / "train.parquet")
    with pytest.raises(UserError, match=r"image \S+6 is 14x14, the others 12x12: pass --image-size to resize"):
        open_source(f"{kind}:{tmp_path}").fingerprint()
    assert len(open_source(f"{kind}:{tmp_path}", image_size=12).fingerprint()) == 64  # resized: any size


def test_a_limited_load_spreads_over_every_class_of_a_class_sorted_folder(tmp_path):
    """A folder source lists its images class by class: `limit` images (the training loop's kNN monitor takes 5,000)
    spread over all of it, not the first classes only (CIFAR-10 as folders would have given class 0 alone)."""
    rng = np.random.default_rng(1)
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        for i in range(4):
            (tmp_path / name / f"{i}.png").write_bytes(_png(rng))
    source = open_source(f"folder:{tmp_path}")
    images, labels, ids = load_arrays(source, limit=6)
    assert len(ids) == 6 and sorted(set(labels.tolist())) == [0, 1, 2]
    assert ids == sorted(ids) and ids[0] == "a-0" and ids[-1] == "c-3"  # evenly spaced, first to last, in id order
    assert load_arrays(source, limit=100)[2] == load_arrays(source)[2]


def test_long_file_names_give_short_unique_ids_the_shards_accept(tmp_path):
    rng = np.random.default_rng(0)
    long_name = "photo_" + "x" * 84  # with its class: 92 characters, over the schema's 80
    (tmp_path / "folder" / "cat").mkdir(parents=True)
    for tail in ("1", "2"):  # the same 67-character head: only the hash tells them apart
        (tmp_path / "folder" / "cat" / f"{long_name}{tail}.png").write_bytes(_png(rng))
    images = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(2)]
    write_hf_parquet(tmp_path / "hub" / f"train-{'p' * 90}.parquet", images, [0, 1])  # a stem over the limit
    for spec in (f"folder:{tmp_path / 'folder'}", f"parquet:{tmp_path / 'hub'}"):
        ids = _assert_ids_good(open_source(spec))
        assert all(ID_PATTERN.match(i) and len(i) <= MAX_ID_CHARS for i in ids), ids
    assert ids == [f"{ids[0][:-8]}-{row:07d}" for row in range(2)]  # the row number survives


def test_parquet_split_folders_with_the_same_file_names_read_as_all(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        images = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(n)]
        write_hf_parquet(tmp_path / split / "0000.parquet", images, list(range(n)))
    assert _assert_ids_good(open_source(f"parquet:{tmp_path}"))[0] == "0000-0000000"  # one file: its stem alone
    ids = _assert_ids_good(open_source(f"parquet:{tmp_path}", split="all"))
    assert sorted(ids) == [f"{split}-0000-{row:07d}" for split, n in (("test", 2), ("train", 3)) for row in range(n)]


def test_16_bit_grayscale_keeps_its_levels(tmp_path):
    levels = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1028  # 0 .. 64764: 64 grey levels over the 16-bit range
    (tmp_path / "c").mkdir()
    Image.fromarray(levels).save(tmp_path / "c" / "deep.png")  # PIL writes a 16-bit greyscale PNG (mode I;16)
    (record,) = open_source(f"folder:{tmp_path}")
    assert np.array_equal(record.image, np.repeat((levels >> 8).astype(np.uint8)[..., None], 3, axis=2))


def test_unreadable_images_and_empty_or_flat_sources_are_one_error_naming_them(tmp_path):
    (tmp_path / "cut" / "c").mkdir(parents=True)
    whole = _png(np.random.default_rng(0), size=32)
    (tmp_path / "cut" / "c" / "x.png").write_bytes(whole[:100])  # an interrupted copy
    with pytest.raises(UserError, match=r"x\.png cannot be read as an image .*replace it or move it out"):
        open_source(f"folder:{tmp_path / 'cut'}").image_size
    for name in ("flat", "empty"):  # images without class folders; nothing at all
        (tmp_path / name).mkdir()
    (tmp_path / "flat" / "x.png").write_bytes(whole)
    for name in ("flat", "empty"):
        with pytest.raises(UserError, match="has no class sub-folders"):
            open_source(f"folder:{tmp_path / name}")
    write_hf_parquet(tmp_path / "none.parquet", [], [])
    with pytest.raises(UserError, match="holds no images"):
        open_source(f"parquet:{tmp_path / 'none.parquet'}").image_size


def test_a_class_folder_without_images_in_any_split_is_refused_by_name(tmp_path):
    image = _png(np.random.default_rng(0), size=8)
    for split, name in (("train", "cat"), ("test", "cat"), ("test", "dog")):
        (tmp_path / split / name).mkdir(parents=True)
        (tmp_path / split / name / "x.png").write_bytes(image)
    (tmp_path / "train" / "dog").mkdir()  # dog lacks train images but has test ones: a class, label 1 in both splits
    assert open_source(f"folder:{tmp_path}", split="train").classes == ["cat", "dog"]
    (tmp_path / "train" / "bird" / "sub").mkdir(parents=True)  # nothing in any split, only a sub-folder
    (tmp_path / "train" / "bird" / "sub" / "notes.txt").write_text("not an image")
    for split in ("train", "test"):
        with pytest.raises(UserError, match=r"class folder\(s\) bird under .* hold no images .*move the folder"):
            open_source(f"folder:{tmp_path}", split=split)


def test_a_null_parquet_label_reads_as_unknown(tmp_path):
    images = [np.zeros((8, 8, 3), np.uint8)] * 2
    write_hf_parquet(tmp_path / "train.parquet", images, [1, None])
    assert [r.label for r in open_source(f"parquet:{tmp_path / 'train.parquet'}")] == [1, -1]



def test_a_parquet_file_without_the_image_column_of_the_first_is_refused_naming_it(tmp_path):
    write_hf_parquet(tmp_path / "a" / "train.parquet", [np.zeros((8, 8, 3), np.uint8)] * 2, [0, 1])
    (tmp_path / "b").mkdir()
    pq.write_table(pa.table({"label": [0, 1]}), tmp_path / "b" / "train.parquet")  # e.g. a folder of another table
    with pytest.raises(UserError, match=r"b/train.parquet has no `img` column, which .*a/train.parquet holds images "
                                        r"in: the files of a source must be parts of one table"):
        open_source(f"parquet:{tmp_path}")


def test_a_tilde_in_a_source_path_is_the_home_folder(tmp_path, monkeypatch):
    """The shell expands ~ at the start of a word only: in `folder:~/images` it reaches clsp as it is."""
    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / label / "0.png")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert [r.label for r in open_source("folder:~/images")] == [0, 1]


@pytest.mark.parametrize("labels, kind", [(["cat", "dog"], "string"), ([0.0, 0.5], "double")])
def test_parquet_labels_that_are_not_class_numbers_are_refused(tmp_path, labels, kind):
    """A string label ended in a traceback from int(); a float one was truncated (0.5 read as class 0)."""
    images = [np.zeros((8, 8, 3), np.uint8)] * 2
    write_hf_parquet(tmp_path / "train.parquet", images, labels)
    with pytest.raises(UserError, match=rf"train.parquet: the label column `label` holds {kind}, not class numbers"):
        open_source(f"parquet:{tmp_path / 'train.parquet'}")


def test_a_class_folder_named_like_a_split_is_a_class(tmp_path):
    """CIFAR-100 as an image folder has a class named `train`: it was taken for a split folder, and the source was
    refused as mixing splits with other folders. A folder that holds images itself is a class folder."""
    rng = np.random.default_rng(0)
    for name in ("apple", "train", "tractor"):
        (tmp_path / "c100" / name).mkdir(parents=True)
        (tmp_path / "c100" / name / "0.png").write_bytes(_png(rng))
    source = open_source(f"folder:{tmp_path / 'c100'}")
    assert source.classes == ["apple", "tractor", "train"] and len(source) == 3
    for split in ("train", "test"):  # split folders holding class folders still are splits
        (tmp_path / "split" / split / "apple").mkdir(parents=True)
        (tmp_path / "split" / split / "apple" / "0.png").write_bytes(_png(rng))
    assert len(open_source(f"folder:{tmp_path / 'split'}", split="test")) == 1

def _cifar_batch(path, n, rng, label_key=b"labels", payload=None) -> None:
    batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), label_key: list(range(n))}
    if payload is not None:
        batch[b"extra"] = payload
    path.write_bytes(pickle.dumps(batch))


def fake_cifar10(parent: Path, seed: int = 0) -> Path:
    """torchvision's CIFAR-10 folder layout under `parent`: five train batches of 2 images, a test batch of 3."""
    rng = np.random.default_rng(seed)
    root = parent / "cifar-10-batches-py"
    root.mkdir()
    for i in range(1, 6):
        _cifar_batch(root / f"data_batch_{i}", 2, rng)
    _cifar_batch(root / "test_batch", 3, rng)
    return root


def test_cifar10_folder_reads_like_torchvision(tmp_path):
    root = fake_cifar10(tmp_path)
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"airplane", b"automobile"]}))
    train = open_source(f"cifar10:{tmp_path}")
    assert len(train) == 10 and train.classes == ["airplane", "automobile"]
    record = next(iter(open_source(f"cifar10:{root}", split="test")))
    assert record.anchor_id == "cifar10-test-00000" and record.image.shape == (32, 32, 3)
    raw = pickle.loads((root / "test_batch").read_bytes())[b"data"][0]
    assert np.array_equal(record.image, raw.reshape(3, 32, 32).transpose(1, 2, 0))
    assert train.describe()["splits"] == "train, test"
    (root / "test_batch").unlink()  # `data info` said "train, test" without it; --split test then failed
    assert open_source(f"cifar10:{tmp_path}").describe()["splits"] == "train"


def test_cifar_batch_with_code_in_it_is_refused_and_not_run(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    marker = tmp_path / "pwned"
    _cifar_batch(root / "train", 2, rng, b"fine_labels", payload=Planted(marker))
    with pytest.raises(UserError, match="not a CIFAR file.*refers to pathlib.Path.touch"):
        open_source(f"cifar100:{tmp_path}")
    assert not marker.exists()


@pytest.mark.parametrize("content, why", [
    (b"", "Ran out of input"),  # empty (a download cut off at once): EOFError
    (b"not a pickle at all", "invalid load key"),  # garbage: UnpicklingError
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)})[:40], "data"),  # truncated
    (pickle.dumps({b"labels": [1]}), "it holds no data"),  # a pickle of something else: KeyError
    (pickle.dumps([1, 2]), "it holds no data, labels"),
    (pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}), "not uint8 (N, 3072)"),
])
def test_a_damaged_cifar_file_is_one_error_line_naming_it(tmp_path, content, why):
    from typer.testing import CliRunner

    from clsp.cli import app

    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for i in range(1, 6):
        _cifar_batch(root / f"data_batch_{i}", 2, rng)
    (root / "test_batch").write_bytes(content)
    result = CliRunner().invoke(app, ["data", "info", f"cifar10:{tmp_path}", "--split", "test"])
    assert result.exit_code == 2 and result.output.startswith("error: ") and "Traceback" not in result.output
    assert f"{root / 'test_batch'} is not a CIFAR file" in result.output and why in result.output
    assert "download the dataset again" in result.output


@pytest.mark.parametrize("spec, message", [
    ("mnist", "unknown source"), ("webdataset:/x", "unknown source kind"), ("folder:/no/such/dir", "does not exist"),
    ("parquet:/no/such/*.parquet", "no Parquet files"), ("cifar10:/no/such", "lacks data_batch_1"),
])
def test_bad_specs_name_the_problem(spec, message):
    with pytest.raises(UserError, match=message):
        open_source(spec)


def test_bad_split_and_size_are_refused():
    with pytest.raises(UserError, match="unknown split 'val'"):
        open_source("digits", split="val")
    with pytest.raises(UserError, match="out of range"):
        open_source("digits", image_size=2)


def test_check_readable_names_the_first_bad_image_in_id_order_with_threads(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "c").mkdir()
    for i in range(40):
        (tmp_path / "c" / f"{i:02d}.png").write_bytes(_png(rng, size=8))
    for bad in ("07", "30"):
        (tmp_path / "c" / f"{bad}.png").write_bytes(b"not an image")
    source = open_source(f"folder:{tmp_path}", "train", 8)
    source.check_readable(range(7), threads=4)  # the good ones pass
    for threads in (1, 4):
        with pytest.raises(UserError, match=r"07\.png cannot be read"):
            source.check_readable(range(40), threads=threads)


def test_load_arrays_fills_one_array_and_shows_its_progress(tmp_path, capsys):
    """One copy of the images at the peak (a list of records then np.stack held two), and a bar on stderr: a large
    folder takes minutes to decode."""
    import tracemalloc

    rng = np.random.default_rng(0)
    (tmp_path / "c").mkdir()
    for i in range(300):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "c" / f"{i}.png")
    source = open_source(f"folder:{tmp_path}", "train", 32)
    source.image_size
    tracemalloc.start()
    try:
        images, labels, ids = load_arrays(source)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert images.shape == (300, 32, 32, 3) and len(ids) == 300 and (labels == 0).all()
    assert peak < 1.5 * images.nbytes, f"peak {peak / 2**20:.2f} MiB for {images.nbytes / 2**20:.2f} MiB of images"
    assert "reading folder:" in capsys.readouterr().err
    source.describe()
    assert "reading folder:" in capsys.readouterr().err


def test_parquet_images_that_are_not_encoded_bytes_are_refused_naming_the_row_or_the_column(tmp_path):
    """A string (a file path) or a pixel array in the image column ended in a TypeError traceback; a missing image
    was named by its row within its row group, and a path-only struct was told to be a {bytes, path} struct."""
    rng = np.random.default_rng(0)
    cells = [{"bytes": _png(rng, size=8), "path": None} for _ in range(30)]
    cells[25] = None
    cells[27] = {"bytes": None, "path": "/elsewhere/27.png"}  # datasets' to_parquet of images loaded from paths
    pq.write_table(pa.table({"img": cells, "label": [0] * 30}), tmp_path / "gaps.parquet", row_group_size=10)
    source = open_source(f"parquet:{tmp_path / 'gaps.parquet'}")
    with pytest.raises(UserError, match=r"row 25 of .*gaps.parquet has no image bytes: store each image's file bytes"):
        source.fingerprint()
    with pytest.raises(UserError, match=r"row 27 of .*gaps.parquet has no image bytes \(only a path, which is never "
                                        r"followed\)"):
        list(source.records(26, 28))
    for name, column in (("paths", ["/data/0.png", "/data/1.png"]), ("arrays", [[0.5] * 12, [0.25] * 12])):
        pq.write_table(pa.table({"image": column, "label": [0, 1]}), tmp_path / f"{name}.parquet")
        with pytest.raises(UserError, match=rf"{name}.parquet: the image column `image` holds .*, not encoded images: "
                                            rf"store each image's file bytes"):
            open_source(f"parquet:{tmp_path / name}.parquet")


def test_parquet_labels_outside_the_class_names_or_in_only_some_files_are_refused_at_open(tmp_path):
    """A label past the ClassLabel names was found by the manifest after every shard was sampled, with "regenerate the
    shards" as its fix; a label column that the first file lacks made the whole source unlabelled without a word."""
    images = [np.zeros((8, 8, 3), np.uint8)] * 3
    for labels in ([0, 3, 1], [0, -5, 1]):
        write_hf_parquet(tmp_path / "named" / "train.parquet", images, labels, class_names=["a", "b", "c"])
        with pytest.raises(UserError, match=rf"train.parquet: the label column `label` holds labels from {min(labels)} "
                                            rf"to {max(labels)}: a label must be -1 \(unknown\) or a class 0..2"):
            open_source(f"parquet:{tmp_path / 'named'}")
    write_hf_parquet(tmp_path / "named" / "train.parquet", images, [0, 2, None], class_names=["a", "b", "c"])
    assert [r.label for r in open_source(f"parquet:{tmp_path / 'named'}")] == [0, 2, -1]  # nulls are unknown
    (tmp_path / "mixed").mkdir()
    unlabelled = pa.table({"img": [{"bytes": png_bytes(image), "path": None} for image in images]})
    pq.write_table(unlabelled, tmp_path / "mixed" / "train-0.parquet")
    write_hf_parquet(tmp_path / "mixed" / "train-1.parquet", images, [0, 1, 2])
    with pytest.raises(UserError, match=r"train-0.parquet has no `label` column, which .*train-1.parquet has: add one "
                                        r"to it \(-1 where a label is unknown\), or leave that file out"):
        open_source(f"parquet:{tmp_path / 'mixed'}")
