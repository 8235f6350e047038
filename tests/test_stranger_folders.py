"""Folders a stranger wrote, read or reused by clsp: run folders holding links to other folders, FIFOs and links to
devices where results and records are read, a config.json whose backbone width sizes the allocation, and image files
of a source that are PostScript in disguise."""
from __future__ import annotations

import json
import os
import resource
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin

from clsp.errors import UserError
from conftest import png_bytes, snapshot

HERE = Path(__file__).parent


def _train_run():
    from clsp.train.loop import TRAIN_RUN
    return TRAIN_RUN, "checkpoint", {"position.json": b'{"global_step": 3}\n', "optimizer.pt": b"PK\x03\x04 mine",
                                     "model.safetensors": b"\x02\x00\x00\x00\x00\x00\x00\x00{}" + b" " * 16}


def _generator_run():
    from clsp.synth.diffusion_run_dir import GENERATOR_RUN
    weights = b"\x02\x00\x00\x00\x00\x00\x00\x00{}" + b" " * 16
    return GENERATOR_RUN, "unet", {"config.json": b'{"_class_name": "UNet2DModel"}',
                                   "diffusion_pytorch_model.safetensors": weights}


@pytest.mark.parametrize("kind", [_train_run, _generator_run], ids=["train", "generator"])
def test_overwrite_never_deletes_or_writes_through_a_link_to_another_folder(kind, tmp_path):
    """A run folder of ours whose checkpoint/ (unet/) is a link to the user's own run: --overwrite deleted the files
    of that other run, found through the link."""
    from clsp.run_dir import prepare_run_dir

    run_kind, folder, files = kind()
    mine = tmp_path / "mine" / folder
    mine.mkdir(parents=True)
    for name, data in files.items():
        (mine / name).write_bytes(data)
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / run_kind.record_file).write_text(json.dumps({"clsp_run": run_kind.name}))
    (stranger / folder).symlink_to(mine, target_is_directory=True)
    before = snapshot(tmp_path / "mine")
    with pytest.raises(UserError, match="link"):
        with prepare_run_dir(stranger, {"new": 1}, run_kind, resume=False, overwrite=True):
            pass
    assert snapshot(tmp_path / "mine") == before


def _limited():  # a subprocess's preexec_fn: a read that never ends fails here within seconds instead of the machine
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


READ_RUN = ("import sys\nfrom clsp.eval.results import load_results\ntry:\n    load_results(sys.argv[1])\n"
            "except Exception as error:\n    print(type(error).__name__, error)\n")


@pytest.mark.parametrize("planted", ["fifo", "dev-zero"])
@pytest.mark.parametrize("name", ["eval/results.json", "config.json"])
def test_report_reads_no_fifo_or_device_a_stranger_planted_in_a_run(tmp_path, name, planted):
    """`clsp eval report RUN` read eval/results.json and config.json whole: a FIFO there waited forever, a link to
    /dev/zero was read until memory ran out."""
    from safetensors.torch import save_model
    from clsp.train.backbones import build_backbone

    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    save_model(build_backbone("resnet18", width=4)[0], str(run / "backbone.safetensors"))
    (run / "config.json").write_text(json.dumps({"clsp_run": "train", "backbone": {"name": "resnet18", "width": 4,
                                                                                    "small_stem": True}}))
    target = run / name
    target.unlink(missing_ok=True)
    os.mkfifo(target) if planted == "fifo" else target.symlink_to("/dev/zero")
    try:
        done = subprocess.run([sys.executable, "-c", READ_RUN, str(run)], capture_output=True, text=True, timeout=15,
                              preexec_fn=_limited, cwd=HERE.parent)
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading a run whose {name} is a FIFO never ended")
    assert done.stdout.startswith("UserError"), done.stdout + done.stderr[-2000:]


def test_a_backbone_width_in_config_json_is_checked_against_the_weights_before_anything_is_allocated(tmp_path):
    """load_backbone built the backbone config.json describes before it looked at the weights: a 0.2 MB weights file
    and "width": 256 took a gigabyte (memory grows with the width squared)."""
    from safetensors.torch import save_model
    from clsp.train.backbones import build_backbone

    run = tmp_path / "run"
    run.mkdir()
    save_model(build_backbone("resnet18", width=4)[0], str(run / "backbone.safetensors"))
    (run / "config.json").write_text(json.dumps({"clsp_run": "train", "backbone": {"name": "resnet18", "width": 256,
                                                                                    "small_stem": True}}))
    code = ("import resource, sys\nfrom clsp.train.checkpoint import load_backbone\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n    load_backbone(sys.argv[1])\nexcept Exception as error:\n    print(type(error).__name__, error)\n"
            "print('grew', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)\n")
    done = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, timeout=120,
                          cwd=HERE.parent)
    assert done.stdout.startswith("UserError") and "width" in done.stdout.splitlines()[0], done.stdout + done.stderr
    grew_kib = int(done.stdout.split("grew ")[-1])
    assert grew_kib < 200_000, f"loading grew the process by {grew_kib / 1e6:.2f} GB before refusing"


@pytest.mark.parametrize("layout", ["folder", "parquet"])
def test_a_source_image_that_is_postscript_is_refused_and_never_handed_to_ghostscript(tmp_path, monkeypatch, layout):
    """PIL opens EPS as well as the formats of IMAGE_EXTENSIONS, and loading one runs Ghostscript (gs) on the file:
    a source's cat/0.png that holds PostScript ran gs from PATH."""
    from clsp.sources import open_source

    marker = tmp_path / "gs-ran"
    fake = tmp_path / "bin" / "gs"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {marker}\n[ \"$1\" = --version ] && echo 10.02.1 && exit 0\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # found again, on this PATH
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    good = png_bytes(np.zeros((8, 8, 3), np.uint8))
    if layout == "folder":
        for name in ("cat", "dog"):
            (tmp_path / "data" / name).mkdir(parents=True)
            (tmp_path / "data" / name / "0.png").write_bytes(eps if name == "cat" else good)
        spec = f"folder:{tmp_path / 'data'}"
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        path = tmp_path / "train-0.parquet"
        pq.write_table(pa.table({"img": [{"bytes": eps, "path": None}, {"bytes": good, "path": None}],
                                 "label": [0, 1]}), path)
        spec = f"parquet:{path}"
    source = open_source(spec, "train", 8)
    with pytest.raises(UserError):
        next(source.records(0, 1))
    assert not marker.exists(), marker.read_text()


def test_a_folder_not_ours_that_holds_a_link_is_refused_as_not_ours_not_told_to_drop_its_link(tmp_path):
    """A stranger's folder (here a home directory with a link to a data disk) is refused whatever it holds: the
    refusal must not send the user to delete their link, after which it is refused anyway."""
    from clsp.run_dir import prepare_run_dir
    from clsp.train.loop import TRAIN_RUN

    home = tmp_path / "home"
    (tmp_path / "disk").mkdir()
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    (home / "data").symlink_to(tmp_path / "disk", target_is_directory=True)
    with pytest.raises(UserError, match="not made by") as refused:
        with prepare_run_dir(home, {"new": 1}, TRAIN_RUN, resume=False, overwrite=False):
            pass
    assert "remove the link" not in str(refused.value)
    assert (home / "data").is_symlink()


def test_a_generator_json_larger_than_any_of_ours_is_refused_unread(tmp_path):
    """A generator dir's card.json was read whole, whatever its size (here 65 MiB, a sparse file: nothing written)."""
    from diffusers import DDIMScheduler

    from clsp.synth.models import CARD_NAME, load_generator, save_generator
    from clsp.synth.untrained_unets import tiny_unet

    out = tmp_path / "generator"
    save_generator(out, tiny_unet(sample_size=8, block_out_channels=(8, 8)), DDIMScheduler(num_train_timesteps=10),
                   {"model_id": "tiny"})
    with open(out / CARD_NAME, "r+b") as handle:
        handle.truncate(65 << 20)
    with pytest.raises(UserError, match=f"{CARD_NAME} is larger than .* it was not read. Fix: delete {CARD_NAME}"):
        load_generator(str(out))



def test_a_run_of_a_backbone_this_clsp_lacks_says_so(tmp_path):
    """A run trained with a backbone added to another install's code was "not written by clsp or damaged"."""
    from safetensors.torch import save_model

    from clsp.errors import UserError
    from clsp.train.backbones import build_backbone
    from clsp.train.checkpoint import load_backbone

    run = tmp_path / "run"
    run.mkdir()
    save_model(build_backbone("resnet18", width=4)[0], str(run / "backbone.safetensors"))
    (run / "config.json").write_text(json.dumps({"clsp_run": "train", "backbone": {"name": "resnet10", "width": 4,
                                                                                    "small_stem": True}}))
    with pytest.raises(UserError, match=r"run was trained with backbone 'resnet10', which this clsp does not have "
                                        r"\(resnet18, resnet50\): evaluate it where the code that trained it"):
        load_backbone(run)
