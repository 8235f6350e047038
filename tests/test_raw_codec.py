"""The raw image codec (schema 3): .npy members written byte for byte as `np.save` writes them, read by our own strict
header parser (never `np.load`), one codec per run as its manifest says, the same pixels and scores as a PNG run."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import numpy.lib.format
import pytest

from conftest import Planted, build_shard_dir
from clsp.shards.codecs import SchemaError, check_npy, decode_npy, encode_npy, encode_png
from clsp.shards.manifest import MANIFEST, read_manifest
from clsp.shards.manifest_writer import write_manifest
from clsp.shards.schema import is_schema_key, member_keys
from clsp.shards.verify import verify
from clsp.shards.writer import ShardWriter, shard_name
from test_hostile_shards import TRAIN, edited_manifest, error_lines, forge_manifest, replace_member, runner, tar_members
from test_stream import write_raw_shard
from clsp.cli import app

RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)


def saved(array: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("shape", [(1, 1, 3), (8, 8, 3), (32, 32, 3), (7, 100, 3), (999, 1000, 3), (1024, 1024, 3)])
def test_encode_writes_what_np_save_writes_and_decode_reads_it_back(shape):
    image = RNG.integers(0, 256, shape, dtype=np.uint8)
    data = encode_npy(image)
    assert data == saved(image)  # header (padding to 64 bytes included) and pixels, byte for byte
    assert (data.index(b"\n") + 1) % 64 == 0 and data[:8] == b"\x93NUMPY\x01\x00"
    assert np.array_equal(np.load(io.BytesIO(data), allow_pickle=False), image)  # numpy's own reader agrees
    assert np.array_equal(numpy.lib.format.read_array(io.BytesIO(data), allow_pickle=False), image)
    decoded = decode_npy(data, "x", size=shape[0] if shape[0] == shape[1] else None)
    assert decoded.dtype == np.uint8 and decoded.shape == shape and np.array_equal(decoded, image)
    assert encode_npy(image) == data and encode_npy(np.asfortranarray(image)) == data  # C order whatever the input


def _padding(data: bytes, old: bytes, new: bytes) -> bytes:
    return data.replace(old, new, 1)


BAD = {  # name -> (bytes of a would-be 8x8 image, words the refusal names)
    "empty": (lambda: b"", "not a .npy"),
    "bad magic": (lambda: b"\x93NUMPZ" + encode_npy(IMAGE)[6:], "not a .npy"),
    "version 2.0": (lambda: b"\x93NUMPY\x02\x00" + encode_npy(IMAGE)[8:], "version 2.0"),
    "header length past the end": (lambda: b"\x93NUMPY\x01\x00\xff\xff{'descr'", "truncated inside its header"),
    "truncated pixels": (lambda: encode_npy(IMAGE)[:-1], "191 bytes of pixels"),
    "extra bytes": (lambda: encode_npy(IMAGE) + b"\0", "193 bytes of pixels"),
    "uint16": (lambda: saved(IMAGE.astype("<u2")), "'<u2'"),
    "big-endian": (lambda: saved(IMAGE.astype(">u2")), "'>u2'"),
    "fortran order": (lambda: saved(np.asfortranarray(IMAGE)), "'fortran_order': True"),
    "2-d": (lambda: saved(IMAGE[..., 0]), "(8, 8)"),
    "4-d": (lambda: saved(IMAGE[..., None]), "(8, 8, 3, 1)"),
    "RGBA": (lambda: saved(np.zeros((8, 8, 4), np.uint8)), "(8, 8, 4)"),
    "no rows": (lambda: saved(np.zeros((0, 8, 3), np.uint8)), "(0, 8, 3)"),
    "16x16, manifest says 8": (lambda: encode_npy(np.zeros((16, 16, 3), np.uint8)), "16x16; the manifest says 8x8"),
    "a tab in the padding": (lambda: _padding(encode_npy(IMAGE), b"  \n", b" \t\n"), "padded with spaces"),
    "no final newline": (lambda: _padding(encode_npy(IMAGE), b" \n", b"  "), "padded with spaces"),
    "header not aligned to 64": (lambda: b"\x93NUMPY\x01\x00" + (117).to_bytes(2, "little")  # numpy reads it
                                 + encode_npy(IMAGE)[10:126] + b"\n" + IMAGE.tobytes(), "multiple of 64"),
    "leading zeros": (lambda: _padding(encode_npy(IMAGE), b"(8, 8, 3), } ", b"(08, 8, 3), }"), "(08, 8, 3)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_every_other_npy_is_refused_naming_the_member_without_np_load(case, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("np.load / read_array called on shard data")
    monkeypatch.setattr(np, "load", never)
    monkeypatch.setattr(numpy.lib.format, "read_array", never)
    make, words = BAD[case]
    data = make()
    for read in (check_npy, decode_npy):
        with pytest.raises(SchemaError) as refused:
            read(data, "shard-000000.tar: a.anchor.npy", 8)
        assert str(refused.value).startswith("shard-000000.tar: a.anchor.npy ") and words in str(refused.value)


def test_a_pickled_object_array_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    data = saved(np.array([Planted(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(SchemaError, match=r"a.anchor.npy has the .npy header \"\{'descr': '\|O'"):
        decode_npy(data, "a.anchor.npy")
    assert not marker.exists()


def test_the_schema_keys_admit_npy_images_and_nothing_else():
    assert member_keys(2, "raw") == ["anchor.npy", "cls.txt", "meta.json", "pos0.npy", "pos1.npy"]
    assert member_keys(1) == ["anchor.png", "cls.txt", "meta.json", "pos0.png"]
    assert all(is_schema_key(key) for key in ("anchor.npy", "pos0.npy", "pos999.npy", "anchor.png", "pos12.png"))
    assert not any(is_schema_key(key) for key in ("anchor.npz", "pos0.pth", "anchor.pyd", "pos1.pickle", "x.npy",
                                                  "pos01.npy", "pos1000.npy", "anchor.npy.pyd", "meta.npy"))
    with pytest.raises(ValueError, match="unknown image codec 'jpeg': use png or raw"):
        ShardWriter(shard_name(0), 1, 8, codec="jpeg")


# --- directories ---------------------------------------------------------------------------------------------------
@pytest.fixture
def raw_dir(tmp_path):
    return build_shard_dir(tmp_path / "raw", codec="raw")


def test_png_and_raw_directories_hold_the_same_pixels_scores_and_labels(tmp_path, raw_dir):
    png_dir = build_shard_dir(tmp_path / "png")
    png, raw = read_manifest(png_dir), read_manifest(raw_dir)
    assert (png.schema_version, png.codec, raw.schema_version, raw.codec) == (2, "png", 3, "raw")
    assert "codec" not in json.loads((png_dir / MANIFEST).read_text())["run"]
    assert json.loads((raw_dir / MANIFEST).read_text())["run"]["codec"] == "raw"
    same = ["anchor_id", "shard", "label", "positive_distance"]
    assert png.index.select(same).equals(raw.index.select(same))
    assert all(a != b for a, b in zip(png.index.column("sha256").to_pylist(), raw.index.column("sha256").to_pylist()))
    for ours, theirs in zip(png.samples(), raw.samples()):
        assert sorted(theirs.members) == sorted(member_keys(2, "raw")) and ours.meta == theirs.meta
        assert np.array_equal(ours.anchor(), theirs.anchor()) and ours.label == theirs.label
        assert all(np.array_equal(ours.positive(j), theirs.positive(j)) for j in range(2))
    assert verify(raw_dir) == []


def test_a_png_run_names_no_codec_its_manifest_as_before(tmp_path):
    """write_manifest drops run.codec "png": a PNG run's manifest is byte for byte what schema 2 wrote."""
    directory = build_shard_dir(tmp_path / "png")
    before = (directory / MANIFEST).read_bytes()
    run = {key: value for key, value in json.loads(before)["run"].items() if key != "scores"}
    write_manifest(directory, {**run, "codec": "png"})
    assert (directory / MANIFEST).read_bytes() == before and json.loads(before)["schema_version"] == 2


def test_a_member_of_the_other_codec_is_refused_naming_it(raw_dir, tmp_path):
    members = [(name.replace("anchor-00001.pos0.npy", "anchor-00001.pos0.png"),
                encode_png(IMAGE) if name == "anchor-00001.pos0.npy" else data)
               for name, data in tar_members(raw_dir / shard_name(0))]
    write_raw_shard(raw_dir / shard_name(0), members)
    forge_manifest(raw_dir)
    problems = verify(raw_dir)
    assert any("anchor-00001.pos0.png is a png image; manifest.json says every image of this run is raw (.npy)" in p
               for p in problems), problems
    png_dir = build_shard_dir(tmp_path / "png")  # and the other way round
    replace = [(n.replace("anchor-00002.anchor.png", "anchor-00002.anchor.npy"), d)
               for n, d in tar_members(png_dir / shard_name(0))]
    write_raw_shard(png_dir / shard_name(0), replace)
    forge_manifest(png_dir)
    assert any("anchor-00002.anchor.npy is a raw image; manifest.json says every image of this run is png (.png)" in p
               for p in verify(png_dir))


@pytest.mark.parametrize("edit, words", [
    (lambda doc: doc.update(schema_version=2), "run.codec is 'raw' under schema version 2: raw images need schema "
                                               "version 3"),
    (lambda doc: doc.update(schema_version=1), "run.codec is 'raw' under schema version 1"),
    (lambda doc: doc["run"].update(codec="jpeg"), "run.codec is 'jpeg': the image codec must be 'png' or 'raw'"),
    (lambda doc: doc["run"].update(codec=["raw"]), "run.codec is ['raw']"),
])
def test_the_manifest_checks_refuse_codecs_the_version_does_not_have(raw_dir, edit, words):
    edited_manifest(raw_dir, edit)
    problems = verify(raw_dir)
    assert any(words in p for p in problems), problems


def test_a_png_codec_may_be_named_under_version_2_or_3(tmp_path):
    directory = build_shard_dir(tmp_path / "png")
    edited_manifest(directory, lambda doc: doc["run"].update(codec="png"))
    assert verify(directory) == [] and read_manifest(directory).codec == "png"
    edited_manifest(directory, lambda doc: doc.update(schema_version=3))
    assert verify(directory) == []


def test_a_pickle_in_an_npy_member_fails_verify_and_training_and_is_never_run(raw_dir, tmp_path):
    marker = tmp_path / "pwned"
    replace_member(raw_dir / shard_name(1), "anchor-00005.pos1.npy",
                   saved(np.array([Planted(marker)], dtype=object), allow_pickle=True))
    forge_manifest(raw_dir)
    assert any("anchor-00005.pos1.npy has the .npy header" in p and "'|O'" in p for p in verify(raw_dir))
    trained = runner.invoke(app, ["train", "run", str(raw_dir), "--out", str(tmp_path / "run"), "--workers", "0",
                                  *TRAIN])
    (line,) = error_lines(trained.output)
    assert trained.exit_code == 2 and "anchor-00005.pos1.npy" in line
    assert not marker.exists()


def test_training_runs_from_raw_shards(raw_dir, tmp_path):
    trained = runner.invoke(app, ["train", "run", str(raw_dir), "--out", str(tmp_path / "run"), "--workers", "0",
                                  *TRAIN])
    assert trained.exit_code == 0, trained.output
    assert (tmp_path / "run" / "summary.json").exists()


def test_the_stream_and_the_cache_give_the_same_batches_from_either_codec(raw_dir, tmp_path):
    import torch

    from clsp.train.cache import CachedStream
    from clsp.train.stream import ShardStream, StreamConfig, steps_per_epoch

    def batches(directory, cached: bool) -> list[dict]:
        manifest = read_manifest(directory)
        contract = manifest.contract()
        cfg = StreamConfig(tuple(manifest.shard_locations()), 3, steps_per_epoch(manifest.count, 1, 3), manifest.k,
                           seed=3)
        stream = CachedStream(cfg, contract, progress=False) if cached else ShardStream(cfg, contract.rows, contract)
        stream.set_position(1, 0)
        return list(stream)

    png_dir = build_shard_dir(tmp_path / "png")
    for cached in (False, True):
        raw, png = batches(raw_dir, cached), batches(png_dir, cached)
        assert len(raw) == len(png) == 3
        for a, b in zip(raw, png):
            assert all(torch.equal(a[key], b[key]) for key in ("anchor", "positive", "ids", "labels"))
            assert a["skipped"] == b["skipped"] == []


# --- the synth job -------------------------------------------------------------------------------------------------
def synth_options(generator, out, *more) -> list[str]:
    return ["synth", "run", "digits", "--model", str(generator), "--out", str(out), "--image-size", "8", "--k", "2",
            "--steps", "2", "--limit", "5", "--anchors-per-shard", "3", "--device", "cpu", *more]


@pytest.fixture(scope="module")
def runs(generator, tmp_path_factory) -> dict:
    """The same synth command written with each codec (through the CLI, `--codec raw` for one), with conftest's
    tiny generator."""
    root = tmp_path_factory.mktemp("runs")
    for codec in ("png", "raw"):
        result = runner.invoke(app, synth_options(generator, root / codec, *(["--codec", "raw"] if codec == "raw"
                                                                            else [])))
        assert result.exit_code == 0, result.output
    return {codec: root / codec for codec in ("png", "raw")}


def test_a_raw_synth_run_verifies_and_holds_the_png_runs_pixels_scores_labels_and_seeds(runs):
    checked = runner.invoke(app, ["shards", "verify", str(runs["raw"])])
    assert checked.exit_code == 0 and "OK (5 anchors x 2 positives in 2 shards)" in checked.output, checked.output
    png, raw = read_manifest(runs["png"]), read_manifest(runs["raw"])
    assert (png.schema_version, raw.schema_version, raw.run["codec"], raw.run["schema_version"]) == (2, 3, "raw", 3)
    assert "codec" not in png.run and png.run["schema_version"] == 2
    assert {k: v for k, v in raw.run.items() if k not in ("codec", "schema_version")} == \
        {k: v for k, v in png.run.items() if k != "schema_version"}
    same = ["anchor_id", "shard", "label", "positive_distance"]
    assert png.index.select(same).equals(raw.index.select(same))
    for ours, theirs in zip(png.samples(), raw.samples()):
        assert ours.key == theirs.key and ours.label == theirs.label and ours.meta == theirs.meta  # seeds too
        assert np.array_equal(ours.anchor(), theirs.anchor())
        assert all(np.array_equal(ours.positive(j), theirs.positive(j)) for j in range(2))
        assert "anchor.npy" in theirs.members and "anchor.png" not in theirs.members


def test_a_run_resumes_only_with_its_own_codec(generator, runs, tmp_path):
    out = shutil.copytree(runs["png"], tmp_path / "png")
    before = {p.name: p.read_bytes() for p in out.glob("shard-*.tar")}
    refused = runner.invoke(app, synth_options(generator, out, "--codec", "raw"))
    assert refused.exit_code == 2 and "codec: 'png' there, 'raw' now" in refused.output, refused.output
    record = json.loads((out / "run.json").read_text())
    assert record["codec"] == "png"
    record.pop("codec")  # as a clsp before the raw codec wrote it: reads as png
    (out / "run.json").write_text(json.dumps(record))
    assert runner.invoke(app, synth_options(generator, out)).exit_code == 0
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.tar")} == before
    assert (out / MANIFEST).read_bytes() == (runs["png"] / MANIFEST).read_bytes()
    again = runner.invoke(app, synth_options(generator, runs["raw"]))  # a raw run, resumed without --codec raw
    assert again.exit_code == 2 and "codec: 'raw' there, 'png' now" in again.output
