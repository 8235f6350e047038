"""`clsp diffusion train`: tiny real runs (8 px digits, 8-channel UNet, a few steps) through the real code paths."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from clsp.errors import UserError
from conftest import dead_pid
from clsp.sources import load_arrays, open_source
from clsp.synth.ddpm import build_scheduler, build_unet, diffusion_loss
from clsp.synth.diffusion_cli import app, config_from_options
from clsp.synth.diffusion_run_dir import checkpoint_dirs
from clsp.synth.diffusion_train import PRESETS, DiffusionTrainConfig, train_diffusion
from clsp.synth.models import load_generator

TINY = dict(source="digits", split="test", image_size=8, channels=(8, 8), layers_per_block=1, attention_levels=(1,),
            norm_groups=4, dropout=0.0, batch_size=8, lr=1e-3, warmup_steps=1, steps=4, ema_decay=0.9,
            hflip=True, checkpoint_every=2, sample_steps=3, grid_size=4)


def tiny(out: Path, **changes) -> DiffusionTrainConfig:
    return DiffusionTrainConfig(out=out, **{**TINY, **changes})


def test_tiny_run_writes_a_loadable_generator_checkpoints_and_grids(tmp_path):
    out = train_diffusion(tiny(tmp_path / "run"), command="clsp diffusion train digits --test")
    assert (out / "model_index.json").is_file()
    assert [step for step, _ in checkpoint_dirs(out)] == [2, 4]
    unet, scheduler, info = load_generator(out)
    assert unet.config.sample_size == 8 and scheduler.config.num_train_timesteps == 1000
    # the generator is the EMA model of the last checkpoint, not the raw weights
    ema = load_file(checkpoint_dirs(out)[-1][1] / "ema_unet.safetensors")
    raw = load_file(checkpoint_dirs(out)[-1][1] / "unet.safetensors")
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in ema.items())
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)
    with torch.no_grad():
        assert unet(torch.zeros(2, 3, 8, 8), 10).sample.shape == (2, 3, 8, 8)
    for step in (2, 4):  # 2x2 grid of 8 px samples, enlarged 8x, a 2 px gap after each
        with Image.open(out / "samples" / f"step-{step:06d}.png") as grid:
            assert grid.size == (2 * (64 + 2),) * 2
            assert len(grid.getcolors(2 ** 16)) > 2  # samples drawn, not a blank sheet
    card = json.loads((out / "card.json").read_text())
    assert card["steps"] == 4 and card["seed"] == 0 and math.isfinite(card["final_loss"])
    assert card["command"] == "clsp diffusion train digits --test" and card["config"]["channels"] == [8, 8]
    assert card["source"]["fingerprint"] == open_source("digits", "test", 8).fingerprint()
    assert {"torch", "diffusers", "accelerate"} <= set(card["package_versions"])
    from clsp import __version__
    assert card["package_versions"]["clsp"] == __version__ != "0.0.0+unknown"  # found under the distribution's name
    assert info["weights_sha256"] == card["weights_sha256"]


def test_loss_decreases_on_a_fixed_batch():
    cfg = tiny(Path("unused"))
    torch.manual_seed(0)
    unet, scheduler = build_unet(cfg, 8), build_scheduler(cfg)
    images, _, _ = load_arrays(open_source("digits", "test", 8), limit=16)
    x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (16, 3, 8, 8)
    noise, timesteps = torch.randn_like(x0), torch.randint(0, 1000, (16,))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = diffusion_loss(unet, scheduler, x0, noise, timesteps)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_resume_repeats_the_uninterrupted_run_exactly(tmp_path):
    out = tmp_path / "run"
    train_diffusion(tiny(out))
    straight = {name: load_file(out / "checkpoints" / "step-000004" / name)
                for name in ("unet.safetensors", "ema_unet.safetensors")}
    halfway = load_file(out / "checkpoints" / "step-000002" / "unet.safetensors")
    shutil.rmtree(out / "checkpoints" / "step-000004")  # as if killed right after the step-2 checkpoint

    with pytest.raises(UserError, match="unfinished run .*step 2.*--resume"):
        train_diffusion(tiny(out))
    train_diffusion(tiny(out, resume=True))
    assert (out / "model_index.json").is_file()
    for name, expected in straight.items():
        resumed = load_file(out / "checkpoints" / "step-000004" / name)
        assert all(torch.equal(resumed[k], expected[k]) for k in expected), name
    assert any(not torch.equal(halfway[k], straight["unet.safetensors"][k]) for k in halfway)
    steps = [int(line.split(",")[0]) for line in (out / "log.csv").read_text().splitlines()[1:]]
    assert steps == [2, 4]  # one row per step, none repeated by the resume


def test_a_kill_while_an_old_checkpoint_is_deleted_lists_no_partial_one_and_the_resume_tidies(tmp_path):
    """A kill while the oldest checkpoint was pruned left it half-deleted and still listed, and a resume at the last
    step (which saves none) kept it, a checkpoint more than --keep-checkpoints, for good."""
    out = tmp_path / "run"
    train_diffusion(tiny(out, steps=6))  # checkpoints at steps 2, 4, 6; keeps 4 and 6
    assert [step for step, _ in checkpoint_dirs(out)] == [4, 6]
    (out / "model_index.json").unlink()  # killed before the generator was saved
    shutil.copytree(out / "checkpoints" / "step-000004", out / "checkpoints" / "step-000002")
    (out / "checkpoints" / "step-000002" / "unet.safetensors").unlink()  # a prune cut short, as it was
    shutil.copytree(out / "checkpoints" / "step-000004", out / "checkpoints" / ".tmp-step-000002")  # as it is now
    train_diffusion(tiny(out, steps=6, resume=True))
    assert [step for step, _ in checkpoint_dirs(out)] == [4, 6] and (out / "model_index.json").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004", "step-000006"]


def test_a_kill_right_after_a_checkpoint_keeps_its_grid_and_rows_and_resume_clears_cut_writes(tmp_path, monkeypatch):
    """kill -9 right after a checkpoint's rename: its sample grid and log rows are there (they were written after it,
    so lost); the temp files of writes a kill cut short are removed by --resume (they stayed), a stranger's are not,
    nor one whose writer still runs."""
    import clsp.synth.diffusion_steps as diffusion_steps

    real = diffusion_steps.save_checkpoint

    def killed_after_the_first(out, step, *args, **kwargs):
        real(out, step, *args, **kwargs)
        raise SystemExit("kill -9")  # nothing after the rename happens

    monkeypatch.setattr(diffusion_steps, "save_checkpoint", killed_after_the_first)
    out = tmp_path / "run"
    with pytest.raises(SystemExit):
        train_diffusion(tiny(out))
    monkeypatch.undo()
    assert [step for step, _ in checkpoint_dirs(out)] == [2]
    assert (out / "samples" / "step-000002.png").is_file()
    assert [int(line.split(",")[0]) for line in (out / "log.csv").read_text().splitlines()[1:]] == [2]
    (out / "samples").mkdir(exist_ok=True)
    dead = dead_pid()
    cut = [out / f".log.csv.tmp-{dead}", out / f".card.json.tmp-{dead}",
           out / "samples" / f".step-000004.png.tmp-{dead}"]
    for path in cut:
        path.write_bytes(b"half")
    (out / f".notes.txt.tmp-{dead}").write_text("the user's")
    writing = subprocess.Popen(["sleep", "60"])  # as `clsp diffusion eval` writing the card beside a resume
    try:
        (out / f".README.md.tmp-{writing.pid}").write_text("# Generator (being written)")
        train_diffusion(tiny(out, resume=True))
        assert (out / f".README.md.tmp-{writing.pid}").is_file()
    finally:
        writing.kill()
    assert not any(path.exists() for path in cut)
    assert (out / f".notes.txt.tmp-{dead}").read_text() == "the user's"
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000002.png", "step-000004.png"]


def test_refuses_another_config_over_an_existing_run(tmp_path):
    out = tmp_path / "run"
    train_diffusion(tiny(out, steps=2))
    with pytest.raises(UserError, match=r"another config \(lr: 0\.001 there, 0\.002 now; steps: 2 there, 4 now\).*"
                                        r"--overwrite"):
        train_diffusion(tiny(out, lr=2e-3, steps=4, resume=True))
    with pytest.raises(UserError, match="finished generator"):
        train_diffusion(tiny(out, steps=2))
    assert train_diffusion(tiny(out, steps=2, resume=True)) == out  # finished: nothing to do

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not made by `clsp diffusion train`"):
        train_diffusion(tiny(foreign, overwrite=True))
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_config_validation_and_preset_overrides(tmp_path):
    with pytest.raises(UserError, match="not all divisible by norm_groups=8"):
        DiffusionTrainConfig(out=tmp_path, channels=(12, 24), norm_groups=8)
    with pytest.raises(UserError, match="attention_levels"):
        DiffusionTrainConfig(out=tmp_path, channels=(8, 8), norm_groups=4, attention_levels=(2,))
    with pytest.raises(UserError, match=r"seed = -1: use a seed >= 0"):  # as synth and train refuse it
        DiffusionTrainConfig(out=tmp_path, seed=-1)
    with pytest.raises(UserError, match="unknown preset"):
        config_from_options("nope", out=tmp_path)
    cfg = config_from_options("embedded", out=tmp_path, steps=7, hflip=None)
    assert cfg.steps == 7 and cfg.channels == PRESETS["embedded"]["channels"] and cfg.hflip is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 8


def test_cli_overwrite_replaces_a_run_with_other_settings(tmp_path):
    out = tmp_path / "run"
    base = ["train", "digits", "--out", str(out), "--split", "test", "--image-size", "8", "--channels", "8,8",
            "--norm-groups", "4", "--attention-levels", "none", "--batch-size", "4", "--steps", "1",
            "--checkpoint-every", "1", "--sample-steps", "2", "--grid-size", "1"]
    runner = CliRunner()
    first = runner.invoke(app, base)
    assert first.exit_code == 0, first.output
    assert f"{out}: finished 1 steps, final loss " in first.stderr and "wrote the generator" in first.stderr
    refused = runner.invoke(app, base + ["--seed", "3"])
    assert isinstance(refused.exception, UserError) and "seed: 0 there, 3 now" in str(refused.exception)
    replaced = runner.invoke(app, base + ["--seed", "3", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((out / "card.json").read_text())["seed"] == 3


def test_resume_with_dropout_repeats_the_uninterrupted_run_bit_for_bit(tmp_path, capsys):
    out = tmp_path / "run"
    train_diffusion(tiny(out, dropout=0.5))  # dropout draws from torch's global RNG, not the step generator
    last = out / "checkpoints" / "step-000004"
    straight = {name: load_file(last / name) for name in ("unet.safetensors", "ema_unet.safetensors")}
    torch.rand(100)  # a second fresh run of the same config, after other work moved the global RNG on: the same run
    train_diffusion(tiny(tmp_path / "again", dropout=0.5))
    for name, expected in straight.items():
        again = load_file(tmp_path / "again" / "checkpoints" / "step-000004" / name)
        assert all(torch.equal(again[k], expected[k]) for k in expected), name
    shutil.rmtree(last)
    torch.rand(100)  # whatever ran in between moved the global RNG on: the checkpoint's state must replace it
    train_diffusion(tiny(out, dropout=0.5, resume=True))
    for name, expected in straight.items():
        resumed = load_file(last / name)
        assert all(torch.equal(resumed[k], expected[k]) for k in expected), name

    # a checkpoint written before checkpoints held RNG states still resumes, with a note that dropout will differ
    halfway = out / "checkpoints" / "step-000002" / "state.pt"
    state = torch.load(halfway, weights_only=True)
    assert state["rng"]["cpu"].dtype == torch.uint8 and len(state["rng"]["cpu"]) == 1  # one row per process
    torch.save({k: v for k, v in state.items() if k != "rng"}, halfway)
    shutil.rmtree(last)
    capsys.readouterr()
    train_diffusion(tiny(out, dropout=0.5, resume=True))
    assert "holds no RNG state" in capsys.readouterr().err and (out / "model_index.json").is_file()


def _image_folder(root: Path, shade: int = 0) -> str:
    for label in ("a", "b"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (40 * i + shade, 100 if label == "a" else 200, 0)).save(root / label / f"{i}.png")
    return f"folder:{root}"


def test_resume_is_refused_on_changed_data_or_another_precision_but_old_records_resume(tmp_path):
    spec, out = _image_folder(tmp_path / "data"), tmp_path / "run"
    cfg = tiny(out, source=spec, split="train", steps=2, checkpoint_every=1)
    train_diffusion(cfg)
    record_file = out / "train_config.json"
    record = json.loads(record_file.read_text())
    assert record["source_fingerprint"] == open_source(spec, "train", 8).fingerprint()
    assert record["mixed_precision"] == "auto"
    assert record["resolved_mixed_precision"] == ("bf16" if torch.cuda.is_available() else "no")  # auto: fp32 on a CPU
    shutil.rmtree(out / "checkpoints" / "step-000002")
    train_diffusion(dataclasses.replace(cfg, source=f"{spec}/.", resume=True))  # the same images spelt otherwise
    shutil.rmtree(out / "checkpoints" / "step-000002")

    _image_folder(tmp_path / "data", shade=1)  # same spec, other pixels
    with pytest.raises(UserError, match=r"another config \(source_fingerprint: '[0-9a-f]{64}' there, '[0-9a-f]{64}' "
                                        r"now\): if the options are the same, the source now reads other images "
                                        r"than the run began with .*put back the images it began with"):
        train_diffusion(dataclasses.replace(cfg, resume=True))
    # a record from before fingerprints were recorded says nothing about its data: it resumes as it used to, and the
    # record written back holds what this resume ran with
    legacy = {k: v for k, v in record.items() if k not in ("source_fingerprint", "resolved_mixed_precision")}
    record_file.write_text(json.dumps(legacy))
    train_diffusion(dataclasses.replace(cfg, resume=True))
    now = json.loads(record_file.read_text())
    assert now["source_fingerprint"] == open_source(spec, "train", 8).fingerprint() != record["source_fingerprint"]

    # as if the run had been made on the other kind of device: "auto" resolved to another precision there
    other = {"no": "bf16", "bf16": "no"}[now["resolved_mixed_precision"]]
    record_file.write_text(json.dumps({**now, "resolved_mixed_precision": other}))
    with pytest.raises(UserError, match=f"resolved_mixed_precision: '{other}' there"):
        train_diffusion(dataclasses.replace(cfg, resume=True))


STOPPABLE = {**TINY, "attention_levels": (1,), "hflip": False, "sample_steps": 2}  # 4 steps, checkpoints after 2 and 4


@contextmanager
def sigterm_after_step(n: int):
    """Within the block, the process sends itself SIGTERM right after the optimiser's n-th step."""
    import signal

    from torch.optim.optimizer import register_optimizer_step_post_hook

    count = [0]

    def terminate(optimizer, args, kwargs):
        count[0] += 1
        if count[0] == n:
            signal.raise_signal(signal.SIGTERM)

    hook = register_optimizer_step_post_hook(terminate)
    try:
        yield
    finally:
        hook.remove()


def test_a_stopped_and_resumed_run_has_the_uninterrupted_runs_card_and_log(tmp_path):
    """A stop after a step that is no checkpoint step wrote a log row over the steps since the last one, and the
    resume began a new, shorter window: card.json's final_loss and log.csv differed from an uninterrupted run's."""
    straight = train_diffusion(DiffusionTrainConfig(out=tmp_path / "straight", **STOPPABLE))
    out = tmp_path / "stopped"
    with sigterm_after_step(3), pytest.raises(UserError, match="after step 3"):
        train_diffusion(DiffusionTrainConfig(out=out, **STOPPABLE))
    train_diffusion(DiffusionTrainConfig(out=out, resume=True, **STOPPABLE))
    cards = [json.loads((run / "card.json").read_text()) for run in (out, straight)]
    assert cards[0]["weights_sha256"] == cards[1]["weights_sha256"]  # the weights matched already
    assert cards[0]["final_loss"] == cards[1]["final_loss"]
    logs = [[line.split(",")[:2] for line in (run / "log.csv").read_text().splitlines()] for run in (out, straight)]
    assert logs[0] == logs[1]


def test_a_stop_on_the_last_step_or_while_the_generator_is_saved_lets_the_run_finish(tmp_path, monkeypatch):
    """SIGTERM after the run's last step raised "stopped ... rerun with --resume" for a run with nothing left to do,
    and one while the generator was saved killed the process with no word (the save ran outside the signal block)."""
    import signal

    import clsp.synth.models as models

    straight = train_diffusion(DiffusionTrainConfig(out=tmp_path / "straight", **STOPPABLE))
    with sigterm_after_step(4):
        on_last_step = train_diffusion(DiffusionTrainConfig(out=tmp_path / "last-step", **STOPPABLE))

    real_save = models.save_generator

    def terminated_while_saving(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(models, "save_generator", terminated_while_saving)
    while_saving = train_diffusion(DiffusionTrainConfig(out=tmp_path / "saving", **STOPPABLE))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is given back after the save
    cards = [json.loads((run / "card.json").read_text()) for run in (straight, on_last_step, while_saving)]
    assert len({card["weights_sha256"] for card in cards}) == 1
    assert all((run / "model_index.json").is_file() for run in (on_last_step, while_saving))



def test_two_processes_saving_one_generator_write_the_same_card(tmp_path):
    """The card listed diffusers' set of the UNet's defaulted settings in the order of Python's string hashes, so two
    identical training runs (two processes) wrote different cards."""
    import os
    import sys

    save = ("import sys, torch; from clsp.synth.ddpm import build_scheduler, build_unet; "
            "from clsp.synth.diffusion_train import DiffusionTrainConfig; from clsp.synth.models import save_generator; "
            f"cfg = DiffusionTrainConfig(out=sys.argv[1], **{TINY!r}); torch.manual_seed(0); "
            "save_generator(sys.argv[1], build_unet(cfg, 8), build_scheduler(cfg), {'model_id': 'tiny'})")
    for seed in ("1", "2"):
        done = subprocess.run([sys.executable, "-c", save, str(tmp_path / seed)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONHASHSEED": seed})
        assert done.returncode == 0, done.stderr
    cards = [(tmp_path / seed / "card.json").read_bytes() for seed in ("1", "2")]
    assert json.loads(cards[0])["unet_config"]["_use_default_values"]  # the list the order was lost in
    assert cards[0] == cards[1]
