"""Per-positive scores in the index (schema version 2) and the trainer's --positive-filter / --positive-weighting:
scores match a direct computation, version-1 directories still read, the filter keeps exactly the passing positives,
weighting draws farther positives more often (reproducibly), and shards without scores are refused clearly."""
from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from clsp.cli import app
from clsp.errors import UserError
from conftest import build_shard_dir, random_sample
from clsp.shards.manifest import INDEX, MANIFEST, ManifestError, read_manifest
from clsp.shards.verify import verify
from clsp.synth.job import SynthConfig, run_synth
from clsp.synth.sampler import SamplerConfig
from clsp.train.loop import make_config, train
from clsp.train.stream import ShardStream, StreamConfig, positive_draw, positive_index, steps_per_epoch

BASE_COLUMNS = ["anchor_id", "shard", "label", "sha256"]


def direct_distance(anchor: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """(H, W, 3), (K, H, W, 3) uint8 -> (K,) RMS of the pixel differences in [0, 1] units, in float64."""
    diff = positives.astype(np.float64) / 255.0 - anchor.astype(np.float64)[None] / 255.0
    return np.sqrt((diff**2).reshape(len(positives), -1).mean(axis=1))


def rewrite_index(directory: Path, table: pa.Table, version: int | None = None) -> None:
    """Replace index.parquet (and its checksum in manifest.json) with `table`; `version`: also the schema version."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    (directory / INDEX).write_bytes(buffer.getvalue())
    document = json.loads((directory / MANIFEST).read_text())
    document["index"]["sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()
    if version is not None:
        document["schema_version"] = version
        document["run"].pop("scores", None)
    (directory / MANIFEST).write_text(json.dumps(document))


def as_version_1(directory: Path) -> Path:
    """The directory as a clsp of schema version 1 wrote it: the same shards, an index without scores."""
    rewrite_index(directory, pq.read_table(directory / INDEX).select(BASE_COLUMNS), version=1)
    return directory


def original(anchor_id: str, k: int):
    n = int(anchor_id.split("-")[1])  # conftest made anchor-n from seed n, label n % 3
    return random_sample(anchor_id, k, 8, n % 3, seed=n)


# --- the scores in the index ------------------------------------------------------------------------------------------
def test_every_positive_is_scored_with_its_distance_to_the_anchor(tmp_path):
    manifest = read_manifest(build_shard_dir(tmp_path / "s", counts=(4, 3), k=3))
    assert manifest.schema_version == 2
    distance = manifest.scores("distance")  # (N, K)
    assert distance.shape == (7, 3) and distance.dtype == np.float32
    for row, anchor_id in enumerate(manifest.index.column("anchor_id").to_pylist()):
        sample = original(anchor_id, 3)
        assert np.allclose(distance[row], direct_distance(sample.anchor, sample.positives), atol=1e-6)
    assert manifest.scores("agreement") is None and set(manifest.run["scores"]) == {"distance"}


def test_a_sample_that_cannot_be_scored_has_null_scores_and_is_still_reported(tmp_path):
    from clsp.shards.manifest_writer import write_manifest
    from clsp.shards.writer import ShardWriter, shard_name

    directory = build_shard_dir(tmp_path / "s", counts=(2,), k=2)
    with ShardWriter(directory / shard_name(1), k=1, image_size=8) as writer:
        writer.write(random_sample("short-one", 1, 8, 0, 0))
    manifest = write_manifest(directory, read_manifest(str(directory)).run)
    distance = read_manifest(str(directory)).scores("distance")
    assert np.isnan(distance[2]).all() and not np.isnan(distance[:2]).any()
    assert manifest.contract().unscored == {2}
    assert any("short-one has 1 positives, expected 2" in p for p in verify(directory))


def test_the_synth_job_scores_agreement_with_the_reference_classifier_when_asked(generator, tmp_path):
    from clsp.sources import load_arrays, open_source
    from clsp.eval.audit import fit_reference

    out = tmp_path / "shards"
    cfg = SynthConfig(source="digits", model=str(generator), out=out, image_size=8, k=2, device="cpu",
                      sampler=SamplerConfig(steps=2), anchors_per_shard=3, limit=6)
    run_synth(cfg)
    assert read_manifest(out).scores("agreement") is None  # off by default
    before = {p.name: p.read_bytes() for p in out.glob("shard-*.tar")}
    run_synth(SynthConfig(**{**cfg.__dict__, "score_reference": True}))  # a finished job, rerun: rescored
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.tar")} == before  # the shards are untouched

    manifest = read_manifest(out)
    train_split = open_source("digits", "train", 8)
    reference = fit_reference(*load_arrays(train_split)[:2])
    classes = list(reference.classifier.classes_)
    agreement, distance = manifest.scores("agreement"), manifest.scores("distance")
    rows = {a: i for i, a in enumerate(manifest.index.column("anchor_id").to_pylist())}
    for sample in manifest.samples():
        row, positives = rows[sample.key], np.stack([sample.positive(j) for j in range(2)])
        proba = reference.classifier.predict_proba(reference.pca.transform(positives.reshape(2, -1) / 255.0))
        assert np.allclose(agreement[row], proba[:, classes.index(sample.label)], atol=1e-6)
        assert np.allclose(distance[row], direct_distance(sample.anchor(), positives), atol=1e-6)
    assert manifest.run["scores"]["agreement"]["fitted_on"]["fingerprint"] == train_split.fingerprint()


# --- version 1 and the index's checks ---------------------------------------------------------------------------------
def test_version_1_directories_still_read_verify_and_stream(tmp_path):
    directory = as_version_1(build_shard_dir(tmp_path / "s", counts=(4, 4), k=2))
    manifest = read_manifest(str(directory))
    assert manifest.schema_version == 1 and manifest.scores("distance") is None
    assert verify(directory) == []
    cfg = StreamConfig(tuple(manifest.shard_locations()), 2, steps_per_epoch(manifest.count, 1, 2), manifest.k)
    contract = manifest.contract()
    assert len([b for b in ShardStream(cfg, contract.rows, contract) if "error" not in b]) == 4

    scored = pq.read_table(build_shard_dir(tmp_path / "v2", counts=(4, 4), k=2) / INDEX)
    rewrite_index(directory, scored)  # score columns under version 1: not what version 1 is
    with pytest.raises(ManifestError, match="index.parquet has columns .*positive_distance"):
        read_manifest(str(directory))


def _set_row(table: pa.Table, name: str, row: int, value, kind=pa.list_(pa.float32())) -> pa.Table:
    values = table.column(name).to_pylist()
    values[row] = value
    return table.set_column(table.column_names.index(name), name, pa.array(values, kind))


def _with_agreement_for_an_unlabelled_anchor(table: pa.Table) -> pa.Table:
    table = _set_row(table, "label", 0, -1, pa.int64())
    return table.append_column("positive_agreement", pa.array([[0.5, 0.5]] * table.num_rows, pa.list_(pa.float32())))


BROKEN_INDEX = {
    "too few values": (lambda t: _set_row(t, "positive_distance", 1, [0.2]),
                       r"positive_distance holds 1 value\(s\) for anchor anchor-00001 .* expected K=2"),
    "not a number": (lambda t: _set_row(t, "positive_distance", 0, [0.2, float("nan")]), "not numbers in 0..1"),
    "above 1": (lambda t: _set_row(t, "positive_distance", 0, [0.2, 1.5]), "not numbers in 0..1"),
    "below 0": (lambda t: _set_row(t, "positive_distance", 3, [-0.1, 0.5]), "not numbers in 0..1"),
    "float64": (lambda t: t.set_column(4, "positive_distance", t.column(4).cast(pa.list_(pa.float64()))),
                "has columns .*positive_distance \\(list<element: double>\\)"),
    "agreement without a label": (_with_agreement_for_an_unlabelled_anchor, "anchors without a label"),
}


@pytest.mark.parametrize("case", BROKEN_INDEX)
def test_scores_that_break_the_schema_are_refused(tmp_path, case):
    directory = build_shard_dir(tmp_path / "s", counts=(4, 4), k=2)
    edit, message = BROKEN_INDEX[case]
    rewrite_index(directory, edit(pq.read_table(directory / INDEX)))
    with pytest.raises(ManifestError, match=message):
        read_manifest(str(directory))


# --- the draw ---------------------------------------------------------------------------------------------------------
def draws(directory: Path, draw, epochs: int = 3) -> list[tuple[str, int]]:
    """(anchor id, drawn positive j) of every visit of `epochs` epochs, j recovered from the decoded positive."""
    manifest = read_manifest(str(directory))
    cfg = StreamConfig(tuple(manifest.shard_locations()), 3, steps_per_epoch(manifest.count, 1, 3), manifest.k, seed=5)
    contract = manifest.contract()
    stream, names, seen = ShardStream(cfg, contract.rows, contract, draw), list(contract.rows), []
    for epoch in range(epochs):
        stream.set_position(epoch)
        for batch in stream:
            for positive, row in zip(batch["positive"].numpy(), batch["ids"].tolist()):
                candidates = original(names[row], manifest.k).positives
                seen.append((names[row], next(j for j, p in enumerate(candidates) if np.array_equal(p, positive))))
    return seen


def test_the_filter_draws_exactly_the_passing_positives_and_the_best_one_when_none_passes(tmp_path):
    directory = build_shard_dir(tmp_path / "s", counts=(6, 6), k=4)
    manifest = read_manifest(str(directory))
    distance = manifest.scores("distance")  # (12, 4)
    threshold = float(np.sort(distance.max(axis=1))[1])  # the anchor with the lowest farthest positive keeps none
    draw = positive_draw(f"distance >= {threshold!r}", None, manifest.scores, "here")
    passing = distance >= np.float32(threshold)
    expected = passing.copy()
    for row in np.flatnonzero(~passing.any(axis=1)):
        expected[row, np.argmax(distance[row])] = True
    assert (~passing.any(axis=1)).sum() == 1 and (passing.sum(axis=1) >= 2).any()  # both cases occur
    assert np.array_equal(draw.keep, expected) and draw.weight is None
    assert "keeps" in draw.note and "1 anchor(s) with none left keep their highest one" in draw.note
    rows = {a: i for i, a in enumerate(manifest.index.column("anchor_id").to_pylist())}
    seen = draws(directory, draw)
    assert all(expected[rows[anchor_id], j] for anchor_id, j in seen)  # the fallback row: always its farthest

    # a row without scores keeps all; "<" falls back to the lowest score
    scores = np.array([[0.2, 0.7], [0.9, 0.6], [np.nan, np.nan]], np.float32)
    narrow = positive_draw("agreement<0.5", "uniform", lambda metric: scores, "here")
    assert narrow.keep.tolist() == [[True, False], [False, True], [True, True]]


def test_a_filter_that_keeps_every_positive_draws_as_the_default_does():
    keep = np.ones(4, bool)
    for epoch in range(20):
        for visit in (0, 1):
            for i in range(30):
                assert positive_index(7, epoch, f"a{i}", 4, visit, keep) == positive_index(7, epoch, f"a{i}", 4, visit)


def test_harder_weighting_draws_farther_positives_more_often_and_reproducibly(tmp_path):
    weight = np.array([0.1, 0.3, 0.0, 0.6])  # distances: positive 2 is the anchor itself
    keyed = lambda: [positive_index(0, epoch, f"a{i}", 4, 0, None, weight)  # noqa: E731
                     for epoch in range(40) for i in range(100)]  # 4000 visits
    first = keyed()
    counts = Counter(first)
    for j, p in enumerate(weight):
        assert abs(counts[j] - 4000 * p) <= 5 * np.sqrt(4000 * p * (1 - p)) + 1e-9  # within 5 sigma
    assert counts[0] < counts[1] < counts[3] and counts[2] == 0
    assert keyed() == first  # keyed on (seed, epoch, anchor id): the same draws again
    kept = Counter(positive_index(0, e, f"a{i}", 4, 0, np.array([1, 1, 1, 0], bool), weight)
                   for e in range(40) for i in range(100))
    assert set(kept) == {0, 1} and kept[1] > 2 * kept[0]  # the filter first, then the weights

    directory = build_shard_dir(tmp_path / "s", counts=(6, 6), k=4)
    manifest = read_manifest(str(directory))
    draw = positive_draw(None, "harder", manifest.scores, "here")
    assert np.array_equal(draw.weight, manifest.scores("distance").astype(np.float64)) and draw.keep is None
    assert draws(directory, draw) == draws(directory, draw)  # the stream too: reproducible


# --- the trainer's options --------------------------------------------------------------------------------------------
TINY = dict(width=4, epochs=1, batch_size=4, lr=0.05, warmup_epochs=0.0, proj_hidden=16, proj_dim=8, workers=0, seed=1)


def test_the_options_refuse_shards_without_scores_and_bad_values_clearly(tmp_path):
    scored = build_shard_dir(tmp_path / "v2", counts=(4, 4), k=2)
    old = as_version_1(build_shard_dir(tmp_path / "v1", counts=(4, 4), k=2))
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"schema version 1\) holds no per-positive distance scores.*rerun the `clsp "
                                        r"synth run` command"):
        train(make_config(shards=str(old), out=str(out), positive_filter="distance>=0.1", **TINY))
    with pytest.raises(UserError, match="no per-positive agreement scores.*with --score-reference"):
        train(make_config(shards=str(scored), out=str(out), positive_filter="agreement>=0.5", **TINY))
    assert not out.exists()
    runner = CliRunner()
    for options, message in [(["--positive-weighting", "harder"], "holds no per-positive distance scores"),
                             (["--positive-filter", "distance=>0.1"], "is not METRIC OP NUMBER"),
                             (["--positive-filter", "distance>=2"], "a number in 0..1"),
                             (["--positive-weighting", "hardest"], "must be one of uniform, harder"),
                             (["--positive-filter", "distance>=0.1", "--positives", "augment"],
                              "use --positives synthetic")]:
        result = runner.invoke(app, ["train", "run", str(old), "--out", str(out), *options])
        assert result.exit_code == 2 and "error: " in result.output and message in result.output, result.output
        assert "Traceback" not in result.output and not out.exists()


def test_a_run_records_its_draw_options_and_a_default_run_records_none(tmp_path):
    shards = build_shard_dir(tmp_path / "s", counts=(4, 4), k=2)
    default = train(make_config(shards=str(shards), out=str(tmp_path / "default"), **TINY))
    assert not {"positive_filter", "positive_weighting"} & set(json.loads((default / "config.json").read_text())
                                                               ["config"])  # as before the options existed
    run = train(make_config(shards=str(shards), out=str(tmp_path / "run"), positive_filter=" distance >= 0.3",
                            positive_weighting="harder", **TINY))
    config = json.loads((run / "config.json").read_text())["config"]
    assert config["positive_filter"] == "distance>=0.3" and config["positive_weighting"] == "harder"
    with pytest.raises(UserError, match="positive_filter"):  # an identity field: another filter is another run
        train(make_config(shards=str(shards), out=str(run), positive_filter="distance>=0.2",
                          positive_weighting="harder", resume=True, **TINY))
