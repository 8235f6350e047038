"""Rerunning a synth job on its own folder loses nothing: a finished folder's manifest and index (with the agreement
scores a plain rerun was not asked to make) are kept, a rewrite scores what the old index scored, an interrupted rerun
leaves the old manifest, a manifest is never written over missing shards, and a record written before clsp recorded
Pillow still resumes. Tiny 8 px generator, K=2, 2 DDIM steps, 6 anchors in 2 shards."""
from __future__ import annotations

import json
import resource
import subprocess
import sys

import pytest

from clsp.errors import UserError
from clsp.file_io import write_atomic
from clsp.shards import atomic
from clsp.shards.manifest import INDEX, MANIFEST, ShardError, read_manifest
from clsp.shards.manifest_writer import write_manifest
from clsp.shards.writer import temp_files
from clsp.synth.job import SynthConfig, run_synth
from conftest import build_shard_dir
from test_synth_job import ROOT, cli_options, config, shard_hashes, subprocess_env

SMALL = dict(limit=6)  # 2 shards of 3 anchors


def files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".clsp-lock"}


@pytest.fixture(scope="module")
def scored(generator, tmp_path_factory):
    """A finished folder whose index holds agreement scores (--score-reference), its files and its index rows."""
    out = tmp_path_factory.mktemp("scored") / "shards"
    run_synth(config(generator, out, score_reference=True, **SMALL))
    assert read_manifest(out).scores("agreement") is not None
    return out, files(out), read_manifest(out).index.to_pylist()


def test_a_plain_rerun_of_a_finished_folder_keeps_its_manifest_and_scores(generator, scored):
    out, before, _ = scored
    run_synth(config(generator, out, **SMALL))  # the same command without --score-reference
    assert files(out) == before
    assert read_manifest(out).scores("agreement") is not None


def test_a_rerun_that_must_rewrite_the_manifest_scores_agreement_again(generator, scored, tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    for name, data in scored[1].items():
        (out / name).write_bytes(data)
    (out / "shard-000001.tar").unlink()  # made again, so the manifest is written again
    run_synth(config(generator, out, **SMALL))
    assert shard_hashes(out) == shard_hashes(scored[0])
    assert read_manifest(out).index.to_pylist() == scored[2]  # positive_agreement included


def test_an_interrupted_rerun_leaves_the_finished_manifest(generator, tmp_path):
    out = tmp_path / "shards"
    run_synth(config(generator, out))  # cli_options' settings: 15 anchors in 5 shards
    (out / "shard-000004.tar").unlink()
    kept = {name: (out / name).read_bytes() for name in (MANIFEST, INDEX)}
    # a file-size limit (as in test_faults) stops the rerun while it writes the shard again
    full = subprocess.run([sys.executable, "-m", "clsp", "synth", *cli_options(generator, out)], env=subprocess_env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192)))
    assert full.returncode == 2 and "file-size limit" in full.stderr, full.stderr[-2000:]
    assert {name: (out / name).read_bytes() for name in (MANIFEST, INDEX)} == kept and temp_files(out) == []


def test_a_manifest_is_not_written_over_missing_shards_or_other_counts(generator, tmp_path):
    out = tmp_path / "shards"
    run_synth(config(generator, out, **SMALL))
    run = json.loads((out / "run.json").read_text())
    before = files(out)
    for change, message in ((dict(count=9), "missing shard-000002.tar"),  # the run says 3 shards, 2 are here
                            (dict(count=5), "shard-000001.tar holds 3 anchors, expected 2")):
        with pytest.raises(ShardError, match=message):
            write_manifest(out, {**run, "source": {**run["source"], **change}}, complete=True)
    (out / "shard-000000.tar").unlink()
    with pytest.raises(ShardError, match="missing shard-000000.tar.*rerun the same `clsp synth run` command"):
        write_manifest(out, run, complete=True)
    assert files(out) == {name: data for name, data in before.items() if name != "shard-000000.tar"}


def test_a_manifest_write_that_runs_out_of_room_leaves_the_old_one_and_no_temp(tmp_path):
    assert write_atomic is atomic.write_atomic  # one implementation, for the shards and every stage
    directory = build_shard_dir(tmp_path / "shards")
    run, before = read_manifest(directory).run, files(directory)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))  # the index does not fit
    try:
        with pytest.raises(OSError, match="File too large"):
            write_manifest(directory, run)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert files(directory) == before


def test_a_record_begun_before_pillow_was_recorded_resumes_and_another_pillow_is_refused(generator, tmp_path):
    out = tmp_path / "shards"
    run_synth(config(generator, out, **SMALL))
    compute = read_manifest(out).run["compute"]
    assert {"pillow", "zlib", "zlib_ng"} <= set(compute) and compute["pillow"]  # PNG bytes depend on its deflate
    reference = shard_hashes(out)
    record = json.loads((out / "run.json").read_text())
    for key in ("pillow", "zlib", "zlib_ng"):  # as an older clsp wrote it
        record["compute"].pop(key)
    (out / "run.json").write_text(json.dumps(record))
    (out / "shard-000001.tar").unlink()
    run_synth(config(generator, out, **SMALL))
    assert shard_hashes(out) == reference and read_manifest(out).run["compute"] == compute
    record["compute"]["pillow"] = "0.0"  # as if begun with another Pillow: its PNG members could differ
    (out / "run.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match=r"compute\.pillow: '0\.0' there"):
        run_synth(config(generator, out, **SMALL))


def test_a_model_that_is_neither_a_folder_nor_a_hub_id_is_refused_up_front(tmp_path):
    with pytest.raises(UserError, match="does not exist"):  # ".." is never part of a hub id (synth.models.HUB_ID)
        SynthConfig(source="digits", model="owner../name", out=tmp_path / "o", device="cpu")
