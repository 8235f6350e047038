"""The synth job on a tiny saved generator (8 px digits, K=2, 2 DDIM steps, 15 anchors in 5 shards): one process vs
two under torchrun, kill + resume, refusing other settings, and the CLI's errors."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clsp.cli import app
from clsp.shards.manifest import read_manifest
from clsp.shards.reader import iter_shard
from clsp.shards.verify import verify
from clsp.shards.writer import temp_files
from clsp.errors import UserError
from clsp.synth.job import CPU_BATCH_ROWS, SynthConfig, config_from_options, run_synth
from clsp.synth.noise import candidate_seed
from clsp.synth.sampler import SamplerConfig

SIZE, K, STEPS, LIMIT, PER_SHARD = 8, 2, 2, 15, 3  # SIZE: the `generator` fixture's (conftest)
ROOT = Path(__file__).resolve().parents[1]


def config(generator: Path, out: Path, **changes) -> SynthConfig:
    values = dict(source="digits", model=str(generator), out=out, image_size=SIZE, k=K, device="cpu",
                  sampler=SamplerConfig(steps=STEPS), anchors_per_shard=PER_SHARD, limit=LIMIT)
    return SynthConfig(**{**values, **changes})


def cli_options(generator: Path, out: Path) -> list[str]:
    return ["run", "digits", "--model", str(generator), "--out", str(out), "--image-size", str(SIZE), "--k", str(K),
            "--steps", str(STEPS), "--anchors-per-shard", str(PER_SHARD), "--limit", str(LIMIT),
            "--device", "cpu"]  # the in-process reference runs on the CPU too, also on a machine with a GPU


def shard_hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("shard-*.tar"))}


def subprocess_env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}


@pytest.fixture(scope="module")
def reference(generator, tmp_path_factory) -> Path:
    """One uninterrupted single-process run: the bytes every other way of running must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "shards"
    run_synth(config(generator, out))
    return out


def test_one_process_writes_complete_shards_with_keyed_seeds(reference):
    manifest = read_manifest(reference)
    assert [s["name"] for s in manifest.shards] == [f"shard-{i:06d}.tar" for i in range(5)]
    assert [s["count"] for s in manifest.shards] == [3, 3, 3, 3, 3]
    assert verify(reference) == []
    assert manifest.run["k"] == K and manifest.run["sampler"]["steps"] == STEPS
    assert manifest.run["generator"]["model_id"] == "tiny-test" and manifest.run["source"]["count"] == LIMIT
    samples = [s for p in sorted(reference.glob("shard-*.tar")) for s in iter_shard(str(p))]
    assert [s.key for s in samples] == manifest.index.column("anchor_id").to_pylist()
    first = samples[0]
    assert first.meta["seeds"] == [candidate_seed(0, first.key, j) for j in range(K)]
    positives = np.stack([first.positive(j) for j in range(K)])  # (K, H, W, 3)
    assert positives.shape == (K, SIZE, SIZE, 3) and positives.dtype == np.uint8
    assert not np.array_equal(positives[0], positives[1])  # different seeds, different candidates
    assert temp_files(reference) == []


def positives(directory: Path) -> np.ndarray:
    """Every positive of a shard directory, in anchor order: (anchors, K, H, W, 3) int16."""
    samples = [s for p in sorted(directory.glob("shard-*.tar")) for s in iter_shard(str(p))]
    return np.stack([[s.positive(j) for j in range(s.k)] for s in samples]).astype(np.int16)


def test_the_draws_do_not_depend_on_the_forward_batch_and_it_is_recorded(generator, reference, tmp_path):
    run_synth(config(generator, tmp_path / "b", batch_size=K))  # one anchor per forward instead of all of a shard
    # The same noise for every row: the positives agree up to the UNet's float sums, which depend on the rows per
    # forward pass (a pixel may move one level), so the forward batch is part of the record
    assert np.abs(positives(tmp_path / "b") - positives(reference)).max() <= 1
    assert read_manifest(tmp_path / "b").run["compute"]["forward_batch"] == K
    assert read_manifest(reference).run["compute"]["forward_batch"] == CPU_BATCH_ROWS  # the CPU's default


def test_a_rerun_continues_with_the_recorded_forward_batch_and_refuses_another(generator, tmp_path, capsys):
    out = tmp_path / "b"
    run_synth(config(generator, out, batch_size=K))
    made = shard_hashes(out)
    for name in ("shard-000003.tar", "shard-000004.tar", "manifest.json", "index.parquet"):
        (out / name).unlink()  # as if killed after shard 2
    run_synth(config(generator, out))  # --forward-batch left out: continues with K rows, says so
    assert f"was begun with --forward-batch {K}" in capsys.readouterr().err
    assert shard_hashes(out) == made
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError, match=rf"compute.forward_batch: {K} there, {2 * K} now"):
        run_synth(config(generator, out, batch_size=2 * K))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written or removed
    capsys.readouterr()
    with pytest.raises(UserError, match="seed"):  # refused for another reason: it says nothing of continuing
        run_synth(config(generator, out, seed=7))
    assert "continuing so" not in capsys.readouterr().err

    record = json.loads((out / "run.json").read_text())  # a folder begun before the forward batch was recorded
    del record["compute"]["forward_batch"]
    (out / "run.json").write_text(json.dumps(record))
    (out / "shard-000004.tar").unlink()
    run_synth(config(generator, out, batch_size=2 * K))  # which one made its shards is unknown: it resumes
    assert read_manifest(out).count == LIMIT


def test_shared_anchor_noise_is_keyed_on_the_anchor_too(generator, reference, tmp_path):
    shared = SamplerConfig(steps=STEPS, share_anchor_noise=True)
    run_synth(config(generator, tmp_path / "whole", sampler=shared))
    run_synth(config(generator, tmp_path / "one", sampler=shared, batch_size=K))
    assert np.abs(positives(tmp_path / "whole") - positives(tmp_path / "one")).max() <= 1  # see above
    assert shard_hashes(tmp_path / "whole") != shard_hashes(reference)
    assert read_manifest(tmp_path / "whole").run["sampler"]["share_anchor_noise"] is True


def test_two_processes_under_torchrun_write_the_same_bytes(generator, reference, tmp_path):
    out = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "clsp.synth.cli", *cli_options(generator, out)]
    # Two gloo processes on the CPU, with any GPU hidden: this test is about the CPU launch. The head of stderr holds
    # the error of the rank that failed first, the tail the launcher's summary.
    env = {**subprocess_env(), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[:3000] + "\n[...]\n" + result.stderr[-3000:]
    # the shards to make are dealt out in turn; only rank 0 says what it wrote (another's lines ran into its bar)
    assert "[rank 0] wrote shard-000002.tar" in result.stderr and "wrote shard-000001.tar" not in result.stderr
    # rank 0's bar counts its own 3 of the 5 shards (9 anchors x 2): it counted its images x 2 and ended at 36/30
    assert re.search(r"synth \(rank 0 of 2: 3 of 5 shards\): 100%\S* 18/18 ", result.stderr), result.stderr[-2000:]
    assert shard_hashes(out) == shard_hashes(reference)
    assert read_manifest(out).index.to_pylist() == read_manifest(reference).index.to_pylist()


def test_a_reruns_remaining_shards_are_dealt_out_evenly():
    from clsp.synth.job import my_shards

    todo = [1, 3, 5, 7, 8, 9]  # left by a crash: by shard number, 1, 3, 5, 7 and 9 would all go to process 1 of 2
    for world in (1, 2, 3, 4, 7):
        dealt = [my_shards(todo, rank, world) for rank in range(world)]
        assert sorted(sum(dealt, [])) == todo  # every shard once
        assert max(map(len, dealt)) - min(map(len, dealt)) <= 1


# The backend's default timeout for a collective (NCCL's is 10 minutes), scaled down to 0.5 s
SHORT_DEFAULT_TIMEOUT = """import sys
from datetime import timedelta
import torch.distributed.distributed_c10d as c10d
c10d.default_pg_timeout = timedelta(seconds=0.5)
from clsp.cli import app
app(sys.argv[1:], prog_name="clsp")
"""


def test_processes_that_finish_first_outwait_a_last_shard_longer_than_the_default_timeout(generator, tmp_path):
    """The processes meet when all shards are made (the manifest needs them), so one with a shard fewer waits for the
    busiest one's last shard; a shard that outlasted the backend's default timeout aborted the job, rerun or not."""
    wrapper = tmp_path / "short_default_timeout.py"
    wrapper.write_text(SHORT_DEFAULT_TIMEOUT)
    out = tmp_path / "shards"
    # 3 shards over 2 processes: process 0 makes shards 0 and 2, so process 1 waits while shard 2 is sampled (~1 s)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(wrapper),
               "synth", "run", "digits", "--model", str(generator), "--out", str(out), "--image-size", str(SIZE),
               "--k", "2", "--steps", "100", "--anchors-per-shard", "50", "--limit", "150", "--device", "cpu"]
    env = {**subprocess_env(), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "Timed out" not in result.stderr, result.stderr[-3000:]
    assert read_manifest(out).count == 150


def test_a_job_killed_part_way_resumes_to_the_same_shards(generator, reference, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "clsp.synth.cli", *cli_options(generator, out), "--forward-batch", str(K)]
    job = subprocess.Popen(command, env=subprocess_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        while not (out / "shard-000000.tar").exists():
            assert job.poll() is None, "the job ended before writing its first shard"
            time.sleep(0.005)
        job.send_signal(signal.SIGKILL)
    finally:
        job.kill()
        job.wait()
    assert not (out / "manifest.json").exists()  # it was stopped before the end
    assert len(shard_hashes(out)) < 5
    (out / ".tmp-shard-000004.tar.99999").write_bytes(b"half a tar")  # what a writer killed mid-shard leaves
    run_synth(config(generator, out))
    assert temp_files(out) == []
    assert shard_hashes(out) == shard_hashes(reference)
    assert read_manifest(out).index.to_pylist() == read_manifest(reference).index.to_pylist()


def test_other_settings_are_refused_unless_overwrite(generator, tmp_path):
    out = tmp_path / "dir"
    small = ["run", "digits", "--model", str(generator), "--out", str(out), "--image-size", str(SIZE), "--k", "1",
             "--steps", "1", "--limit", "2", "--anchors-per-shard", "2"]
    runner = CliRunner()
    assert runner.invoke(app, ["synth", *small]).exit_code == 0
    before = shard_hashes(out)
    again = runner.invoke(app, ["synth", *small])  # same settings: nothing to redo
    assert again.exit_code == 0 and shard_hashes(out) == before
    refused = runner.invoke(app, ["synth", *small, "--seed", "7"])
    assert refused.exit_code == 2
    assert "seed: 0 there, 7 now" in refused.output and "--overwrite" in refused.output
    assert shard_hashes(out) == before
    foreign = out / "shard-000009.tar"  # a user's tar under a shard's name: --overwrite must not take it for ours
    with tarfile.open(foreign, "w") as tar:
        tar.add(__file__, arcname="mk.py")
    kept, finished = foreign.read_bytes(), {p.name: p.read_bytes() for p in out.iterdir()}
    refused = runner.invoke(app, ["synth", *small, "--seed", "7", "--overwrite"])
    assert refused.exit_code == 2 and foreign.read_bytes() == kept
    assert "shard-000009.tar under shard names, but not shards clsp wrote: move them out" in refused.output
    assert "nothing was sampled" in refused.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == finished  # refused before --overwrite deleted anything
    foreign.unlink()
    accepted = runner.invoke(app, ["synth", *small, "--seed", "7", "--overwrite"])
    assert accepted.exit_code == 0, accepted.output
    assert read_manifest(out).run["seed"] == 7
    assert shard_hashes(out).keys() == before.keys() and shard_hashes(out) != before


def test_a_run_begun_before_the_counter_noise_resumes_only_with_its_own_noise(generator, tmp_path):
    """Records and manifests written before the sampler named its generator of noise read as "cpu-generator"."""
    out = tmp_path / "dir"
    small = ["run", "digits", "--model", str(generator), "--out", str(out), "--image-size", str(SIZE), "--k", "1",
             "--steps", "1", "--limit", "2", "--anchors-per-shard", "2"]
    runner = CliRunner()
    assert runner.invoke(app, ["synth", *small, "--noise", "cpu-generator"]).exit_code == 0
    for name in ("run.json", "manifest.json"):  # as an older clsp wrote them: no sampler.noise
        document = json.loads((out / name).read_text())
        (document.get("run", document))["sampler"].pop("noise")
        (out / name).write_text(json.dumps(document))
    assert read_manifest(out).run["sampler"]["noise"] == "cpu-generator"
    before = shard_hashes(out)
    refused = runner.invoke(app, ["synth", *small])  # today's default, the counter noise
    assert refused.exit_code == 2
    assert "sampler.noise: 'cpu-generator' there, 'counter' now" in refused.output and shard_hashes(out) == before
    resumed = runner.invoke(app, ["synth", *small, "--noise", "cpu-generator"])
    assert resumed.exit_code == 0, resumed.output
    assert shard_hashes(out) == before


def test_the_generators_of_noise_give_different_bytes_and_the_manifest_names_each(generator, tmp_path):
    hashes = {}
    for noise in ("counter", "cpu-generator"):
        out = tmp_path / noise
        run_synth(config_from_options(source="digits", model=str(generator), out=str(out), image_size=SIZE, k=2,
                                      steps=2, limit=2, anchors_per_shard=2, noise=noise, device="cpu"))
        assert read_manifest(out).run["sampler"]["noise"] == noise
        hashes[noise] = shard_hashes(out)
    assert hashes["counter"].keys() == hashes["cpu-generator"].keys() and hashes["counter"] != hashes["cpu-generator"]


@pytest.mark.parametrize("options, message", [
    (["--w", "1.5"], "w must be a number in [0, 1]"),
    (["--eta", "-0.1"], "eta must be a number in [0, 1]"),
    (["--k", "0"], "need at least 1 positive"),
    (["--steps", "0"], "steps must be an integer >= 1"),
    (["--steps", "1001"], "exceeds the generator's num_train_timesteps = 1000"),
    (["--image-size", "16"], "pass --resize"),
    (["--model", "MISSING"], "does not exist"),
    (["--codec", "jpeg"], "--codec jpeg: use png or raw"),
    (["--compile", "--device", "cpu"], "--compile is for GPU runs and this one runs on the CPU"),
])
def test_bad_values_exit_with_a_clear_message(generator, tmp_path, options, message):
    args = ["synth", "run", "digits", "--model", str(generator), "--out", str(tmp_path / "o"), "--limit", "1",
            "--image-size", str(SIZE)]
    args = [str(tmp_path / "missing") if a == "MISSING" else a for a in args + options]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_resize_makes_the_anchors_the_generators_size(generator, tmp_path):
    out = tmp_path / "resized"
    result = CliRunner().invoke(app, ["synth", "run", "digits", "--model", str(generator), "--out", str(out),
                                      "--resize", "--k", "1", "--steps", "1", "--limit", "2"])
    assert result.exit_code == 0, result.output
    assert read_manifest(out).run["image_size"] == SIZE  # digits are 16 px natively


def test_preset_then_explicit_options(generator, tmp_path):
    cfg = config_from_options("embedded", model=str(generator), out=tmp_path, steps=3, k=None)
    assert (cfg.source, cfg.k, cfg.sampler.steps, cfg.sampler.w) == ("digits", 4, 3, 0.2)  # the preset's w, given steps


def test_a_damaged_image_is_found_before_the_folder_is_claimed(generator, tmp_path):
    """Found mid-run, a damaged image would stop the job after the shards before it, and mending it changes the
    source's fingerprint: those shards could only be deleted. The job decodes the anchors first, with threads."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(4):
            image = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
            image.save(tmp_path / "data" / name / f"{i}.png")
    last = tmp_path / "data" / "b" / "3.png"  # the last anchor in id order: an interrupted copy
    last.write_bytes(last.read_bytes()[:60])
    out = tmp_path / "shards"
    with pytest.raises(UserError, match=r"3\.png cannot be read as an image"):
        run_synth(config(generator, out, source=f"folder:{tmp_path / 'data'}", anchors_per_shard=2, limit=None))
    assert not out.exists()  # no shard, no run record: mending the file and rerunning starts cleanly
