"""Faults through the real stages: folders clsp did not make, two runs on one folder, no room left on the disk, SIGTERM
during generator training, checkpoint files that are not ours, bad command lines (one `error:` line, exit 2, nothing
written), and the determinism record of the shards (threads, device, software)."""
from __future__ import annotations

import errno
import importlib.util
import json
import pickle
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook
from typer.testing import CliRunner

from clsp.cli import app, user_message
from clsp.errors import UserError
from conftest import Planted, build_shard_dir, png_bytes, snapshot
from clsp.shards.manifest import read_manifest
from clsp.shards.writer import temp_files
from clsp.synth.diffusion_train import DiffusionTrainConfig, train_diffusion
from clsp.synth.job import run_synth
from test_synth_job import ROOT, cli_options, config, reference, shard_hashes, subprocess_env  # noqa: F401
from clsp.train.checkpoint import load_backbone
from clsp.train.loop import make_config, train

runner = CliRunner()
TRAIN = ["--width", "4", "--epochs", "2", "--batch-size", "4", "--warmup-epochs", "0", "--proj-hidden", "16",
         "--proj-dim", "8", "--workers", "0"]
TINY_DDPM_OPTIONS = ["--split", "test", "--image-size", "8", "--channels", "8,8", "--layers-per-block", "1",
                     "--attention-levels", "none", "--norm-groups", "4", "--batch-size", "8", "--warmup-steps", "1",
                     "--steps", "4", "--checkpoint-every", "2", "--sample-steps", "2", "--grid-size", "4"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_shard_dir(tmp_path_factory.mktemp("faults") / "shards", counts=(10, 7, 9), k=2)


def assert_one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert "Traceback" not in output and lines[-1].startswith("error: "), output[-3000:]
    return lines[-1]


def test_synth_and_train_never_touch_a_folder_they_did_not_make(generator, shards, tmp_path):
    users = tmp_path / "users"
    users.mkdir()
    for name, data in (("manifest.json", b'{"mine": 1}'), ("index.parquet", b"PAR1 mine"), (".tmp-draft", b"x"),
                       ("log.csv", b"step,loss\n1,2\n"), ("optimizer.pt", b"not ours")):
        (users / name).write_bytes(data)
    before, generator_before = snapshot(users), snapshot(generator)
    for command in (["synth", *cli_options(generator, users)], ["synth", *cli_options(generator, users), "--overwrite"],
                    ["synth", *cli_options(generator, generator)],  # --out is the generator's own folder
                    ["train", "run", str(shards), "--out", str(users), *TRAIN],
                    ["train", "run", str(shards), "--out", str(users), *TRAIN, "--resume"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, result.output
        assert "not made by" in assert_one_error_line(result.output)
    assert snapshot(users) == before and snapshot(generator) == generator_before


@pytest.mark.parametrize("bad", [["--shuffle-buffer", "0"], ["--backbone", "vgg"], ["--seed", "-1"],
                                 ["--momentum", "2"]])
def test_a_refused_train_command_writes_nothing_and_the_corrected_one_runs(shards, tmp_path, bad):
    out = tmp_path / "run"
    refused = runner.invoke(app, ["train", "run", str(shards), "--out", str(out), *TRAIN, *bad])
    assert refused.exit_code == 2
    assert bad[0] in assert_one_error_line(refused.output) and not out.exists()
    corrected = runner.invoke(app, ["train", "run", str(shards), "--out", str(out), *TRAIN, "--epochs", "1"])
    assert corrected.exit_code == 0, corrected.output
    assert (out / "summary.json").exists()


def test_a_second_synth_on_the_same_folder_is_refused_naming_the_first(generator, reference, tmp_path):
    out, log = tmp_path / "shared", tmp_path / "first.log"
    with open(log, "w") as stderr:
        first = subprocess.Popen([sys.executable, "-m", "clsp.synth.cli", *cli_options(generator, out),
                                  "--forward-batch", "2"],
                                 env=subprocess_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        while not (out / "run.json").exists():  # the folder is claimed before its record is written
            assert first.poll() is None, log.read_text()
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)  # hold it there, lock taken, while the second one starts
        second = runner.invoke(app, ["synth", *cli_options(generator, out)])
        first.send_signal(signal.SIGCONT)
        assert second.exit_code == 2
        assert f"in use by another run (pid {first.pid} on " in assert_one_error_line(second.output)
        assert first.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        first.kill()
    assert shard_hashes(out) == shard_hashes(reference) and temp_files(out) == []


def file_size_limit(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def test_no_room_ends_as_a_named_error_with_nothing_half_written_and_a_rerun_completes(generator, reference, shards,
                                                                                       tmp_path):
    # a file-size limit (EFBIG) stands in for a full disk (ENOSPC): both are "no room" to the stages
    out = tmp_path / "synth"
    full = subprocess.run([sys.executable, "-m", "clsp", "synth", *cli_options(generator, out)], env=subprocess_env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=file_size_limit(8192))
    assert full.returncode == 2
    assert "file-size limit" in assert_one_error_line(full.stderr) and "while writing shard-" in full.stderr
    assert not out.exists() or (temp_files(out) == [] and not (out / "manifest.json").exists())
    run_synth(config(generator, out))
    assert shard_hashes(out) == shard_hashes(reference)

    # config.json and log.csv fit both limits; 8 KiB stops the checkpoint's first file, rng-rank0.pt (torch.save, ~17
    # KB, whose own writer words no room without an errno), 64 KiB its model.safetensors
    for limit in (8 << 10, 64 << 10):
        run = tmp_path / f"train-{limit}"
        full = subprocess.run([sys.executable, "-m", "clsp", "train", "run", str(shards), "--out", str(run), *TRAIN],
                              env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=300,
                              preexec_fn=file_size_limit(limit))
        assert full.returncode == 2, full.stderr[-3000:]
        line = assert_one_error_line(full.stderr)
        assert "file-size limit" in line and "while writing a checkpoint" in line and "--resume" in line
        assert sorted(p.name for p in run.iterdir()) == [".clsp-lock", "config.json", "log.csv"]  # no .checkpoint.tmp
        resumed = runner.invoke(app, ["train", "run", str(shards), "--out", str(run), *TRAIN, "--resume"])
        assert resumed.exit_code == 0, resumed.output
        assert json.loads((run / "summary.json").read_text())["finished"] is True

    generator_out = tmp_path / "generator"  # 120 KiB: the UNet's safetensors (~82 KB) fit, state.pt (~228 KB) not
    ddpm = ["diffusion", "train", "digits", "--out", str(generator_out), *TINY_DDPM_OPTIONS]
    full = subprocess.run([sys.executable, "-m", "clsp", *ddpm], env=subprocess_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=300, preexec_fn=file_size_limit(120 << 10))
    assert full.returncode == 2, full.stderr[-3000:]
    assert "file-size limit" in assert_one_error_line(full.stderr)
    assert list((generator_out / "checkpoints").iterdir()) == []  # the half-written step folder was removed
    resumed = runner.invoke(app, [*ddpm, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert (generator_out / "model_index.json").is_file()


TINY_DDPM = dict(source="digits", split="test", image_size=8, channels=(8, 8), layers_per_block=1,
                 attention_levels=(1,), norm_groups=4, dropout=0.0, batch_size=8, lr=1e-3, warmup_steps=1, steps=4,
                 ema_decay=0.9, checkpoint_every=2, sample_steps=2, grid_size=4)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch.load notes the planted pickle's protocol
def test_sigterm_stops_diffusion_training_with_a_checkpoint_and_the_resume_matches(tmp_path):
    straight = train_diffusion(DiffusionTrainConfig(out=tmp_path / "straight", **TINY_DDPM))
    out = tmp_path / "stopped"

    def unhandled(signum, frame):  # what the default action would do, without killing the test process
        raise RuntimeError("SIGTERM reached the default handler")

    def terminate_after_step_3(optimizer, args, kwargs):
        terminate_after_step_3.steps += 1
        if terminate_after_step_3.steps == 3:
            signal.raise_signal(signal.SIGTERM)
    terminate_after_step_3.steps = 0

    previous = signal.signal(signal.SIGTERM, unhandled)
    hook = register_optimizer_step_post_hook(terminate_after_step_3)
    try:
        with pytest.raises(UserError, match=r"stopped by SIGTERM after step 3; a checkpoint was saved.*--resume"):
            train_diffusion(DiffusionTrainConfig(out=out, **TINY_DDPM))
    finally:
        hook.remove()
        signal.signal(signal.SIGTERM, previous)
    assert (out / "checkpoints" / "step-000003").is_dir() and not (out / "model_index.json").exists()
    state, marker = out / "checkpoints" / "step-000003" / "state.pt", tmp_path / "ran"
    saved = state.read_bytes()
    state.write_bytes(pickle.dumps(Planted(marker)))  # the optimizer and RNG states: loaded weights_only
    with pytest.raises(UserError, match=r"state\.pt cannot be loaded .*not written by clsp"):
        train_diffusion(DiffusionTrainConfig(out=out, resume=True, **TINY_DDPM))
    assert not marker.exists()
    state.write_bytes(saved)
    train_diffusion(DiffusionTrainConfig(out=out, resume=True, **TINY_DDPM))
    for name in ("unet.safetensors", "ema_unet.safetensors"):
        resumed, expected = (load_file(run / "checkpoints" / "step-000004" / name) for run in (out, straight))
        assert all(torch.equal(resumed[k], expected[k]) for k in expected), name


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch.load notes the planted pickle's protocol
def test_checkpoint_files_that_are_not_ours_are_refused_and_nothing_runs(shards, tmp_path):
    out = tmp_path / "run"
    options = dict(shards=str(shards), out=str(out), width=4, epochs=2, batch_size=4, warmup_epochs=0.0,
                   proj_hidden=16, proj_dim=8, workers=0)
    train(make_config(**options))
    (out / "summary.json").unlink()  # unfinished: --resume loads the checkpoint
    marker = tmp_path / "ran"
    for name in ("optimizer.pt", "scheduler.pt", "rng-rank0.pt"):  # every torch.load of a checkpoint (weights_only)
        file = out / "checkpoint" / name
        saved = file.read_bytes()
        file.write_bytes(pickle.dumps(Planted(marker)))
        with pytest.raises(UserError, match=rf"{name.replace('.', '[.]')} cannot be loaded .*not written by clsp"):
            train(make_config(**options, resume=True))
        assert not marker.exists(), name
        file.write_bytes(saved)
    (out / "backbone.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{junk")
    with pytest.raises(UserError, match=r"backbone\.safetensors cannot be loaded"):
        load_backbone(out)


def bad_command_lines(tmp_path: Path, generator: Path, shards: Path) -> list[list[str]]:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    broken = tmp_path / "images" / "cat"
    broken.mkdir(parents=True)
    (broken / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n but the rest is gone")
    (tmp_path / "train-0.parquet").write_text("not parquet")
    out = str(tmp_path / "out")
    synth = ["synth", "run", "digits", "--model", str(generator), "--limit", "1", "--image-size", "8"]
    lines = [synth + ["--out", str(a_file)], ["train", "run", str(shards), "--out", str(a_file / "run"), *TRAIN],
             ["data", "info", f"folder:{tmp_path / 'images'}"], ["data", "info", f"parquet:{tmp_path}/train-0.parquet"],
             synth + ["--out", out, "--device", "tpu"], synth + ["--out", out, "--device", "cuda:99"],
             # an --out that is a file: refused before any work (eval all computed features and the probe first)
             ["eval", "audit", str(shards), "--source", "digits", "--out", str(a_file)],
             ["eval", "sweep", str(generator), "--source", "digits", "--out", str(a_file)],
             ["diffusion", "eval", str(generator), "--source", "digits", "--out", str(a_file)],
             ["eval", "all", str(tmp_path / "run"), "--shards", str(shards), "--out", str(a_file)]]
    if importlib.util.find_spec("s3fs") is None:  # the message names the package to install
        lines.append(["train", "run", "s3://bucket/shards", "--out", out, *TRAIN])
    return lines


def test_bad_command_lines_end_as_one_error_line_with_exit_2_and_nothing_written(generator, shards, tmp_path):
    for command in bad_command_lines(tmp_path, generator, shards):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, (command, result.output, result.exception)
        assert_one_error_line(result.output)
        assert not (tmp_path / "out").exists() and (tmp_path / "a-file").read_text() == "x", command


def test_a_bad_forward_batch_is_named_by_the_option_the_command_has(generator, tmp_path):
    out = ["--out", str(tmp_path / "out")]
    for command in (["eval", "sweep", str(generator), "--source", "digits", *out],
                    ["diffusion", "eval", str(generator), "--source", "digits", *out],
                    ["eval", "knn", str(tmp_path / "run")]):  # refused before the run is looked at
        result = runner.invoke(app, [*command, "--forward-batch", "0"])
        assert result.exit_code == 2 and "--forward-batch" in assert_one_error_line(result.output), result.output
        assert "--batch-size" not in result.output and "temperature" not in result.output, result.output


def test_an_out_inside_the_source_folder_is_refused_before_anything_is_written(generator, tmp_path):
    source = tmp_path / "images"
    for label in ("a", "b"):
        (source / label).mkdir(parents=True)
        for i in range(2):
            (source / label / f"{i}.png").write_bytes(png_bytes(np.full((8, 8, 3), 60 * i, np.uint8)))
    before = snapshot(source)
    for command in (["diffusion", "train", f"folder:{source}", "--out", str(source / "generator"), "--steps", "1"],
                    ["synth", "run", f"folder:{source}", "--model", str(generator), "--out", str(source / "shards")],
                    ["synth", "run", f"parquet:{tmp_path}", "--model", str(generator), "--out", str(tmp_path / "s")],
                    # a glob that the index synth writes would match
                    ["synth", "run", f"parquet:{tmp_path}/*/*.parquet", "--model", str(generator), "--out",
                     str(tmp_path / "s")]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, (command, result.output)
        assert "lies inside" in assert_one_error_line(result.output) and "choose an --out outside" in result.output
    assert snapshot(source) == before and not (tmp_path / "s").exists()


def test_os_failures_a_user_can_fix_are_worded_and_bugs_keep_their_traceback():
    for code, words in ((errno.ENOSPC, "disk is full"), (errno.EROFS, "read-only"), (errno.EACCES, "permission denied"),
                        (errno.EFBIG, "file-size limit"), (errno.ENOTDIR, "not a directory")):
        message = user_message(OSError(code, "strerror", "/data/out"))
        assert words in message and "(/data/out)" in message and ": " in message, message
    assert user_message(FileNotFoundError(errno.ENOENT, "gone", "/tmp/.tmp-shard")) is None  # a race: a bug
    assert user_message(KeyError("k")) is None


def test_shards_record_threads_device_and_software_and_a_resume_keeps_the_thread_count(generator, reference, tmp_path):
    compute = read_manifest(reference).run["compute"]
    assert compute["device"] == "cpu" and compute["threads"] == torch.get_num_threads() == 1  # conftest: 1 thread
    assert {"torch", "diffusers", "precision", "machine"} <= set(compute)
    info = runner.invoke(app, ["shards", "info", str(reference)])
    assert "made with" in info.output and "threads=1" in info.output
    assert "threads=1" in runner.invoke(app, ["shards", "verify", str(reference)]).output

    out = tmp_path / "resumed"
    run_synth(config(generator, out, limit=6))  # begun with 1 thread, then "killed" after shard 0 ...
    for name in ("shard-000001.tar", "manifest.json", "index.parquet"):
        (out / name).unlink()
    torch.set_num_threads(2)  # ... and resumed with 2, as a launch without `torchrun` would have
    try:
        run_synth(config(generator, out, limit=6))
        assert torch.get_num_threads() == 2  # the caller's setting is given back
    finally:
        torch.set_num_threads(1)
    assert read_manifest(out).run["compute"]["threads"] == 1
    assert shard_hashes(out) == {k: v for k, v in shard_hashes(reference).items() if k in shard_hashes(out)}

    record = json.loads((out / "run.json").read_text())
    record["compute"]["torch"] = "0.0"  # as if begun with other software: its shards would differ
    (out / "run.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match=r"compute\.torch: '0\.0' there"):
        run_synth(config(generator, out, limit=6))


@pytest.mark.parametrize("url, extra, package", [("https://example.invalid/shards", "http", "aiohttp"),
                                                 ("s3://bucket/shards", "s3", "s3fs")])
def test_a_url_whose_fsspec_backend_is_missing_names_the_extra_to_install(tmp_path, url, extra, package):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here, so the {extra} extra's message cannot appear")
    result = runner.invoke(app, ["train", "run", url, "--out", str(tmp_path / "out"), *TRAIN])
    assert result.exit_code == 2 and f"pip install 'clsp-positives[{extra}]'" in result.output, result.output
    assert not (tmp_path / "out").exists()
