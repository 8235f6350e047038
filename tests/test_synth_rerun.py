"""Rerunning a synth job on its own folder loses nothing: a finished folder's manifest and index (with the agreement
scores a plain rerun was not asked to make) are kept, a rewrite scores what the old index scored, an interrupted rerun
leaves the old manifest, a manifest rewrite stopped between its index and its manifest leaves a folder that reads (and
verify names an index left without its manifest), a manifest is never written over missing shards, a record written
before clsp recorded Pillow or the generator's configs still resumes, and a generator whose scheduler or UNet config
changed is refused. Tiny 8 px generator, K=2, 2 DDIM steps, 6 anchors in 2 shards."""
from __future__ import annotations

import errno
import hashlib
import json
import resource
import shutil
import subprocess
import sys

import pytest

from clsp.errors import UserError
from clsp.file_io import write_atomic
from clsp.shards import atomic, manifest_writer
from clsp.shards.manifest import INDEX, MANIFEST, ShardError, pending_index, read_manifest
from clsp.shards.manifest_writer import file_sha256, write_manifest
from clsp.shards.verify import verify
from clsp.shards.writer import temp_files
from clsp.synth.job import SYNTH_RUN, SynthConfig, run_synth
from clsp.synth.job_setup import load_job_generator
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


def test_a_rewrite_whose_manifest_finds_no_room_leaves_the_finished_folder_as_it_was(generator, tmp_path,
                                                                                     monkeypatch):
    """The disk fills up after the new index is written, at manifest.json (a finished job rerun with
    --score-reference): the folder still holds the manifest and index that match, and verifies."""
    out = tmp_path / "shards"
    run_synth(config(generator, out, **SMALL))
    before = files(out)
    write = manifest_writer.write_atomic

    def full_at_the_manifest(path, data, temp_name=None, exclusive=False):
        if path.name == MANIFEST:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return write(path, data, temp_name, exclusive)

    monkeypatch.setattr(manifest_writer, "write_atomic", full_at_the_manifest)
    with pytest.raises(OSError, match="No space left"):
        run_synth(config(generator, out, score_reference=True, **SMALL))
    assert files(out) == before and verify(out) == [] and read_manifest(out).scores("agreement") is None


@pytest.mark.parametrize("stop", ["at the index's rename", "at the folder's sync after manifest.json"])
def test_a_rewrite_stopped_after_its_manifest_reads_its_new_index_and_a_rerun_finishes_it(generator, tmp_path,
                                                                                         monkeypatch, stop):
    """Stopped (Ctrl-C) after manifest.json was replaced, before the new index took the name index.parquet: readers
    and verify read the index the manifest names by its checksum, and the next rerun renames it, keeping the
    manifest."""
    out = tmp_path / "shards"
    run_synth(config(generator, out, **SMALL))
    replace, sync, old = manifest_writer.os.replace, atomic.fsync_dir, (out / MANIFEST).read_bytes()

    def stopped_at_the_rename(source, target):
        if str(target).endswith(f"/{INDEX}"):
            raise KeyboardInterrupt
        return replace(source, target)

    def stopped_at_the_sync(directory):
        if (out / MANIFEST).read_bytes() != old:
            raise KeyboardInterrupt
        return sync(directory)

    if stop == "at the index's rename":
        monkeypatch.setattr(manifest_writer.os, "replace", stopped_at_the_rename)
    else:
        monkeypatch.setattr(atomic, "fsync_dir", stopped_at_the_sync)
    with pytest.raises(KeyboardInterrupt):
        run_synth(config(generator, out, score_reference=True, **SMALL))
    monkeypatch.undo()
    sha256 = json.loads((out / MANIFEST).read_text())["index"]["sha256"]
    pending = out / pending_index(sha256)
    assert file_sha256(out / INDEX) != sha256 and pending.is_file() and pending in SYNTH_RUN.owned(out)
    assert read_manifest(out).scores("agreement") is not None and verify(out) == []
    manifest = (out / MANIFEST).read_bytes()
    run_synth(config(generator, out, **SMALL))  # the plain command: the manifest describes these shards, and is kept
    assert (out / MANIFEST).read_bytes() == manifest and file_sha256(out / INDEX) == sha256 and not pending.exists()
    assert verify(out) == [] and temp_files(out) == []


def test_an_index_whose_manifest_was_never_written_is_reported_and_a_rerun_removes_it(generator, scored, tmp_path):
    """Killed after the new index was written under its pending name, before manifest.json was replaced: the old pair
    still reads, verify names the leftover index, and the next rerun removes it and keeps the old pair."""
    out = tmp_path / "shards"
    run_synth(config(generator, out, **SMALL))
    before = files(out)
    new_index = scored[1][INDEX]  # what a --score-reference rewrite of these shards writes first
    leftover = out / pending_index(hashlib.sha256(new_index).hexdigest())
    leftover.write_bytes(new_index)
    assert read_manifest(out).scores("agreement") is None  # the old manifest and its index
    assert verify(out) == [f"{leftover.name}: an index whose {MANIFEST} was never written (a manifest write was "
                           f"interrupted): rerun the synth job, which removes it, or delete it"]
    run_synth(config(generator, out, **SMALL))
    assert files(out) == before and verify(out) == []


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
    record["compute"].update(pillow="0.0", torch="0.0")  # as if begun with other software: other bytes
    (out / "run.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match=r"compute\.pillow: '0\.0' there, .*compute\.torch: '0\.0' there, .*\): its "
                                        r"shards' bytes depend on the device and software that run\.json records "
                                        r"under compute, which no option changes: continue it where they are the same "
                                        r"\(install the versions it names\), another --out, or --overwrite") as refused:
        run_synth(config(generator, out, **SMALL))
    assert str(refused.value).count("install the versions") == 1  # one fix named once, for both keys


def test_a_model_that_is_neither_a_folder_nor_a_hub_id_is_refused_up_front(tmp_path):
    with pytest.raises(UserError, match="does not exist"):  # ".." is never part of a hub id (synth.models.HUB_ID)
        SynthConfig(source="digits", model="owner../name", out=tmp_path / "o", device="cpu")


def test_a_class_conditional_generator_is_refused_before_anything_is_written(tmp_path):
    from diffusers import DDIMScheduler

    from clsp.synth.models import save_generator
    from clsp.synth.untrained_unets import tiny_unet

    folder, out = tmp_path / "conditional", tmp_path / "shards"
    save_generator(folder, tiny_unet(sample_size=8, block_out_channels=(8, 8), num_class_embeds=10),
                   DDIMScheduler(num_train_timesteps=1000), {"model_id": "tiny-conditional"})
    with pytest.raises(UserError, match=r"conditional is class-conditional \(class_embed_type None, num_class_embeds "
                                        r"10\); the sampler interpolates an unconditional generator's features"):
        run_synth(config(folder, out, **SMALL))
    assert not out.exists()


@pytest.mark.parametrize("channels, message", [
    (dict(in_channels=1), r"makes 1-channel images; the anchors are RGB"),
    (dict(out_channels=6), r"predicts a learned variance beside the noise \(out_channels 6"),  # was "6-channel images"
])
def test_a_generator_of_other_channels_is_refused_for_what_it_is(tmp_path, channels, message):
    from diffusers import DDIMScheduler

    from clsp.synth.models import save_generator
    from clsp.synth.untrained_unets import tiny_unet

    folder, out = tmp_path / "generator", tmp_path / "shards"
    save_generator(folder, tiny_unet(sample_size=8, block_out_channels=(8, 8), **channels),
                   DDIMScheduler(num_train_timesteps=1000), {"model_id": "tiny"})
    with pytest.raises(UserError, match=message):
        run_synth(config(folder, out, **SMALL))
    assert not out.exists()


def edited_generator(generator, folder, file: str, **changes):
    """A copy of `generator` whose config `file` (scheduler/scheduler_config.json, unet/config.json) has `changes`."""
    shutil.copytree(generator, folder)
    settings = json.loads((folder / file).read_text())
    (folder / file).write_text(json.dumps({**settings, **changes}))
    return folder


@pytest.mark.parametrize("file, changes, field", [
    ("scheduler/scheduler_config.json", dict(beta_schedule="scaled_linear"), "scheduler_sha256"),
    ("unet/config.json", dict(flip_sin_to_cos=False), "unet_config_sha256")])  # the tiny UNet's is True
def test_a_generator_whose_scheduler_or_unet_config_changed_is_refused_on_resume(generator, tmp_path, file, changes,
                                                                                  field):
    """Settings the weights do not show change the sampled bytes: same weights, other sampler, refused."""
    out = tmp_path / "shards"
    run_synth(config(generator, out, **SMALL))
    (out / "shard-000001.tar").unlink()
    before = files(out)
    other = edited_generator(generator, tmp_path / "other", file, **changes)
    with pytest.raises(UserError, match=rf"generator\.{field}: '[0-9a-f]{{64}}' there, '[0-9a-f]{{64}}' now"):
        run_synth(config(other, out, **SMALL))
    assert files(out) == before  # nothing sampled, nothing removed


def test_the_config_digests_leave_out_diffusers_bookkeeping_and_old_records_resume(generator, tmp_path):
    """A copy saved by another diffusers (`_diffusers_version`, `_class_name`, ...) continues the folder, and so does a
    record written before the config digests were recorded; the resumed run records them."""
    out = tmp_path / "shards"
    run_synth(config(generator, out, **SMALL))
    reference, generator_record = shard_hashes(out), read_manifest(out).run["generator"]
    assert set(generator_record) == {"model_id", "weights_sha256", "scheduler_sha256", "unet_config_sha256"}
    other = edited_generator(generator, tmp_path / "other", "scheduler/scheduler_config.json",
                             _diffusers_version="0.0.1", _class_name="DDPMScheduler")
    edited = json.loads((other / "unet/config.json").read_text())
    (other / "unet/config.json").write_text(json.dumps({**edited, "_diffusers_version": "0.0.1"}))
    record = json.loads((out / "run.json").read_text())
    for key in ("scheduler_sha256", "unet_config_sha256"):  # as an older clsp wrote it
        record["generator"].pop(key)
    (out / "run.json").write_text(json.dumps(record))
    (out / "shard-000001.tar").unlink()
    run_synth(config(other, out, **SMALL))
    assert shard_hashes(out) == reference and read_manifest(out).run["generator"] == generator_record
    assert json.loads((out / "run.json").read_text())["generator"] == generator_record


def test_a_hub_id_and_a_local_copy_of_the_same_generator_record_the_same_digests(generator, tmp_path, monkeypatch):
    import huggingface_hub

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    shutil.copytree(generator, cache / "models--someone--tiny-gen" / "snapshots" / ("0" * 40))
    (cache / "models--someone--tiny-gen" / "refs").mkdir()
    (cache / "models--someone--tiny-gen" / "refs" / "main").write_text("0" * 40)
    hub = load_job_generator(config(generator, tmp_path / "o", model="someone/tiny-gen"))[2]
    local = load_job_generator(config(generator, tmp_path / "o"))[2]
    keys = ("weights_sha256", "scheduler_sha256", "unet_config_sha256")
    assert {key: hub[key] for key in keys} == {key: local[key] for key in keys} and hub["model_id"] != local["model_id"]


def test_a_rerun_with_the_folder_spelt_otherwise_keeps_its_runs_and_one_on_changed_images_names_them(generator,
                                                                                                    tmp_path):
    """The same images spelt otherwise (`folder:DIR/.`, another working directory) rewrite the manifest's source spec
    and no shard byte: a training run on the shards must still resume, not be refused as made with another config
    (the fingerprint and the shards' digests pin the data). Changed images are refused naming them, not the options
    (the same ones were passed) with --overwrite, which would delete the shards, as the fix."""
    import numpy as np
    from PIL import Image

    from clsp.train.loop import make_config, train
    from conftest import snapshot

    data, shards, run = tmp_path / "data", tmp_path / "shards", tmp_path / "run"
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (data / label).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(data / label / f"{i}.png")
    run_synth(config(generator, shards, source=f"folder:{data}", limit=None))
    options = dict(shards=str(shards), out=str(run), width=4, epochs=1, batch_size=4, warmup_epochs=0.0,
                   proj_hidden=16, proj_dim=8, workers=0)
    assert train(make_config(**options)) == run
    before = snapshot(shards)
    run_synth(config(generator, shards, source=f"folder:{data}/.", limit=None))
    assert read_manifest(shards).run["source"]["spec"] == f"folder:{data}/."
    assert {k: v for k, v in snapshot(shards).items() if k.startswith("shard-")} == \
        {k: v for k, v in before.items() if k.startswith("shard-")}  # not one shard byte changed
    assert train(make_config(**options, resume=True)) == run  # found finished, not refused

    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(data / "a" / "5.png")  # an image changed
    kept = snapshot(shards)
    with pytest.raises(UserError, match=r"source.fingerprint: [^;]*\): if the options are the same, the source now "
                                        r"reads other images than the run began with .*put back the images") as refused:
        run_synth(config(generator, shards, source=f"folder:{data}", limit=None))
    assert "pass the same options" not in str(refused.value)  # they were the same
    with pytest.raises(UserError, match=r"\(k: 2 there, 3 now; .*source.fingerprint: .*\): pass the same options to "
                                        r"continue it; if the options are the same, the source"):  # both fixes
        run_synth(config(generator, shards, source=f"folder:{data}", limit=None, k=3))
    assert snapshot(shards) == kept


def test_a_rerun_with_another_limit_names_the_options_as_the_fix(generator, tmp_path):
    """--limit is recorded only as source.count: a rerun with another --limit is refused with "pass the same options"
    as a fix, not only with the changed-images hint."""
    out = tmp_path / "shards"
    run_synth(config(generator, out, limit=6))
    with pytest.raises(UserError) as refused:
        run_synth(config(generator, out, limit=3))
    print(refused.value)
    assert "source.count: 6 there, 3 now" in str(refused.value)
    assert "pass the same options to continue it" in str(refused.value)
