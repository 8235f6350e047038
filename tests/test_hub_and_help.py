"""Issue 12 (2, 3): hub ids offline, `clsp diffusion convert`, help that shows real defaults, fast --help/--version,
the paper-cifar10 training preset and a warm-up that scales with short runs. No test touches the network."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from diffusers import DDPMScheduler
from typer.testing import CliRunner

from clsp.cli import app
from clsp.errors import UserError
from clsp.hashing import weights_sha256
from clsp.presets import source_defaults
from clsp.synth.models import load_generator
from clsp.synth.untrained_unets import tiny_unet
from conftest import Planted

runner = CliRunner()


@pytest.fixture
def unet():
    return tiny_unet(sample_size=8, block_out_channels=(4, 8), attention=False)


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """A fresh, empty Hugging Face cache (the constant is read at import time, so it is patched as well)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return tmp_path / "hf" / "hub"


@pytest.mark.parametrize("offline_env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_an_uncached_hub_id_offline_fails_at_once_saying_offline_and_the_fix(tmp_path, monkeypatch, empty_cache,
                                                                            offline_env):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name, value in offline_env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    result = runner.invoke(app, ["synth", "run", "digits", "--model", "google/ddpm-cifar10-32", "--out", str(out),
                                 "--limit", "2"])
    assert result.exit_code == 2, result.output
    assert "error: generator 'google/ddpm-cifar10-32' is no local folder, and as a hub id it is not in the local " \
           "Hugging Face cache and this machine is offline" in result.output
    assert "--model DIR" in result.output and "HF_HOME" in result.output and "Traceback" not in result.output
    assert not out.exists()  # nothing written
    mistyped = runner.invoke(app, ["synth", "run", "digits", "--model", "generators/digits-16", "--out", str(out)])
    assert mistyped.exit_code == 2 and "'generators/digits-16' is no local folder" in mistyped.output
    assert "for a folder, check its name (`ls generators`)" in mistyped.output and not out.exists()


def test_a_cached_hub_id_loads_offline(unet, empty_cache, monkeypatch):
    """Cache first: a hub id whose files are in the local cache loads with no network at all."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    snapshot = empty_cache / "models--someone--tiny-ddpm" / "snapshots" / ("0" * 40)
    unet.save_pretrained(snapshot, safe_serialization=True)  # hub layout: config.json + safetensors at the root
    DDPMScheduler(num_train_timesteps=50).save_pretrained(snapshot)
    (empty_cache / "models--someone--tiny-ddpm" / "refs").mkdir()
    (empty_cache / "models--someone--tiny-ddpm" / "refs" / "main").write_text("0" * 40)
    _, scheduler, info = load_generator("someone/tiny-ddpm")
    assert info["model_id"] == "someone/tiny-ddpm" and info["weights_sha256"] == weights_sha256(unet)
    assert scheduler.config.num_train_timesteps == 50


def test_a_hub_id_cached_with_only_pickled_weights_says_so_offline(unet, empty_cache, tmp_path):
    snapshot = empty_cache / "models--someone--tiny-ddpm" / "snapshots" / ("0" * 40)
    _bin_only_dir(snapshot, unet, unet.state_dict())
    (empty_cache / "models--someone--tiny-ddpm" / "refs").mkdir()
    (empty_cache / "models--someone--tiny-ddpm" / "refs" / "main").write_text("0" * 40)
    result = runner.invoke(app, ["synth", "run", "digits", "--model", "someone/tiny-ddpm", "--out",
                                 str(tmp_path / "out"), "--limit", "2"])  # offline: conftest sets HF_HUB_OFFLINE
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "in the local Hugging Face cache with only the pickled diffusion_pytorch_model.bin" in result.output
    assert f"cp -rL {snapshot} DIR" in result.output and "clsp diffusion convert DIR" in result.output
    assert not (tmp_path / "out").exists()


def _bin_only_dir(directory: Path, unet, payload) -> Path:
    """A hub-layout generator dir whose weights are only diffusion_pytorch_model.bin (torch.save of `payload`)."""
    unet.save_config(directory)
    DDPMScheduler(num_train_timesteps=50).save_pretrained(directory)
    torch.save(payload, directory / "diffusion_pytorch_model.bin")
    return directory


def test_convert_turns_a_bin_only_generator_into_safetensors_that_load(tmp_path, unet):
    gen = _bin_only_dir(tmp_path / "gen", unet, unet.state_dict())
    with pytest.raises(UserError, match="only the pickled diffusion_pytorch_model.bin.*clsp diffusion convert"):
        load_generator(gen)
    result = runner.invoke(app, ["diffusion", "convert", str(gen)])
    assert result.exit_code == 0, result.output
    assert f"weights sha256 {weights_sha256(unet)}" in result.output
    loaded, _, info = load_generator(gen)
    assert info["weights_sha256"] == weights_sha256(unet)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 40])
    torch.testing.assert_close(loaded(x, t).sample, unet(x, t).sample)
    again = runner.invoke(app, ["diffusion", "convert", str(gen)])  # never overwrites
    assert again.exit_code == 2 and "already exists" in again.output


def test_convert_takes_an_fp16_bin_with_old_attention_names_and_prints_the_hash_synth_records(tmp_path):
    """diffusers before 0.14 named attention weights query/key/value/proj_attn (its loader still renames them), and an
    fp16 .bin loads widened to float32: convert refused the first, and printed the second's fp16 hash, which no
    manifest records."""
    unet = tiny_unet(sample_size=8, block_out_channels=(4, 8), attention=True)
    renamed = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}

    def old_name(name: str) -> str:
        for new, old in renamed.items():
            name = name.replace(new, old)
        return name

    state = {old_name(name): tensor.half() for name, tensor in unet.state_dict().items()}
    assert any(".query." in name for name in state)
    gen = _bin_only_dir(tmp_path / "gen", unet, state)
    result = runner.invoke(app, ["diffusion", "convert", str(gen)])
    assert result.exit_code == 0, result.output
    _, _, info = load_generator(gen)
    assert f"weights sha256 {info['weights_sha256']}" in result.output
    assert info["weights_sha256"] == weights_sha256(unet.half().float())  # the fp16 values, as float32


def test_convert_refuses_a_bin_holding_pickled_objects(tmp_path, unet):
    marker = tmp_path / "code-ran"
    gen = _bin_only_dir(tmp_path / "gen", unet, {"conv_in.weight": Planted(marker)})
    result = runner.invoke(app, ["diffusion", "convert", str(gen)])
    assert result.exit_code == 2, result.output
    assert "was not converted: it is not a plain state dict of tensors" in result.output
    assert "Traceback" not in result.output
    assert not marker.exists() and not (gen / "diffusion_pytorch_model.safetensors").exists()
    bad = _bin_only_dir(tmp_path / "other", unet, {"conv_in.weight": torch.zeros(1)})  # tensors, wrong shapes
    result = runner.invoke(app, ["diffusion", "convert", str(bad)])
    assert result.exit_code == 2 and "do not fit config.json" in result.output
    assert not (bad / "diffusion_pytorch_model.safetensors").exists()


def _help(*args: str) -> str:
    return " ".join(runner.invoke(app, [*args, "--help"]).output.split())  # wrapped lines joined


def test_help_shows_every_default_in_plain_text():
    train = _help("train", "run")
    for line in ("--epochs INT", "[default: 100; --preset embedded: 50; --preset paper-cifar10: 1000]",
                 "--batch-size INT", "[default: 256;", "--lr FLOAT", "[default: 0.5;", "--warmup-epochs FLOAT",
                 "[default: 10.0;", "--precision TEXT", "paper-cifar10"):
        assert line in train
    diffusion = _help("diffusion", "train")
    for line in ("train | test | all [default: train]", "constant | cosine, after warm-up [default: constant;",
                 "[default: 128,256,256,256; --preset embedded: 32,64,64]"):
        assert line in diffusion
    for stage in (train, diffusion, _help("synth", "run")):  # one vocabulary: the same words in every stage
        assert "--precision TEXT auto (bf16 autocast on a GPU, fp32 on the CPU) | bf16 (GPUs only) | fp32" in stage
    for stage in (_help("synth", "run"), _help("eval", "all"), _help("eval", "sweep"), _help("diffusion", "eval")):
        assert "--forward-batch INT images per forward pass per process" in stage and "--batch-size" not in stage
        assert "--device TEXT auto (a GPU when one is visible, else the CPU)" in stage
    synth = _help("synth", "run")
    assert "cuda:N" not in synth and "cuda (CUDA_VISIBLE_DEVICES picks the GPU)" in synth  # it refuses cuda:N
    assert "| cuda | cuda:N" in _help("eval", "all")
    for note in ("positives per anchor [default: 8; --preset embedded: 4]", "[default: 0.1; --preset embedded: 0.2]",
                 "DDIM steps [default: 100; --preset embedded: 32]",
                 "[default: counter; --preset embedded: cpu-generator]"):
        assert note in synth, note  # the sampler options a preset sets are shown too
    for text in (train, diffusion, synth, _help("eval", "all")):
        assert "<str>" not in text and "<bool>" not in text and "<int>" not in text


def test_help_and_version_import_neither_torch_nor_diffusers():
    script = """
import json, sys
from clsp.cli import app
for args in (["--version"], ["--help"], ["train", "run", "--help"], ["synth", "run", "--help"],
             ["diffusion", "train", "--help"], ["eval", "all", "--help"], ["shards", "--help"], ["data", "--help"]):
    try:
        app(args, prog_name="clsp")
    except SystemExit as exit:
        assert exit.code == 0, (args, exit.code)
print(json.dumps(sorted(m for m in ("torch", "diffusers", "webdataset") if m in sys.modules)))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_the_command_runs_in_a_folder_holding_a_users_own_train_and_eval_modules(tmp_path):
    """Issue 10 (5): the stages install beneath `clsp`, so a user's `train.py` or `eval/` package in the working
    directory (first on sys.path under `python -m`) shadows nothing of ours."""
    (tmp_path / "train.py").write_text("raise SystemExit('the user train.py was imported')\n")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "__init__.py").write_text("raise SystemExit('the user eval package was imported')\n")
    for args in (["--help"], ["train", "run", "--help"], ["eval", "all", "--help"]):
        done = subprocess.run([sys.executable, "-m", "clsp", *args], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "Usage: clsp" in done.stdout
    import clsp.train.loop
    assert Path(clsp.train.loop.__file__).parent.name == "train"  # the layout's folder, installed as clsp.train


@pytest.mark.parametrize("module, name", [("clsp.train.loop", "TrainConfig"), ("clsp.synth.job", "SynthConfig"),
                                          ("clsp.synth.sampler", "SamplerConfig"),
                                          ("clsp.synth.diffusion_train", "DiffusionTrainConfig")])
def test_defaults_read_from_source_match_the_dataclasses(module, name):
    cls = getattr(__import__(module, fromlist=[name]), name)
    real = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    assert source_defaults(module, name) == real


@pytest.mark.parametrize("module", ["clsp.train.loop", "clsp.synth.diffusion_train"])
def test_presets_read_from_source_match_the_modules(module):
    assert source_defaults(module, "PRESETS") == __import__(module, fromlist=["PRESETS"]).PRESETS


def test_a_short_run_gets_a_short_warm_up_and_the_paper_preset_has_the_paper_settings(tmp_path):
    from clsp.train.loop import make_config

    where = dict(shards=str(tmp_path / "s"), out=str(tmp_path / "o"))
    assert make_config(epochs=1, **where).warmup_epochs == pytest.approx(0.1)  # not the 10-epoch default
    assert make_config(**where).warmup_epochs == 10.0 and make_config("embedded", **where).warmup_epochs == 5.0
    assert make_config(epochs=20, warmup_epochs=5.0, **where).warmup_epochs == 5.0  # given: kept as it is
    with pytest.raises(UserError, match="leave it out"):
        make_config(epochs=1, warmup_epochs=5.0, **where)
    paper = make_config("paper-cifar10", **where)
    assert (paper.method, paper.backbone, paper.epochs, paper.batch_size, paper.lr, paper.warmup_epochs) == \
        ("simclr", "resnet18", 1000, 1024, 0.5, 10.0)
    method = paper.method_config()
    assert (method.temperature, method.lam, method.proj_hidden, method.proj_dim) == (0.2, 1.0, 4096, 256)
    with pytest.raises(UserError, match="paper's simclr setting .*for --method moco leave --preset out"):
        make_config("paper-cifar10", method="moco", **where)  # gave MoCo SimCLR's lam 1.0 (the paper: 0.5)
    assert make_config(method="moco", **where).method_config().lam == 0.5
    import numpy as np  # a Path and numpy's scalars are other spellings of an option's type: kept, as builtins

    spelt = make_config(shards=tmp_path / "s", out=str(tmp_path / "o"), lr=np.float64(0.1), epochs=np.int64(3))
    assert (spelt.shards, spelt.lr, spelt.epochs) == (str(tmp_path / "s"), 0.1, 3) and type(spelt.epochs) is int
    with pytest.raises(UserError, match="--epochs must be a whole number, got np.float64"):
        make_config(epochs=np.float64(2.5), **where)
