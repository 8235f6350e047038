"""The w / steps sweep (issue 9) on a tiny generator (8 px digits, 2-3 DDIM steps, a few anchors): files, the point at
the shards' own setting equal to the audit of those shards, and the errors."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from diffusers import DDIMScheduler
from typer.testing import CliRunner

from clsp.cli import app
from clsp.eval.audit import AuditConfig, audit_shards
from clsp.eval.sweep import SweepConfig, run_sweep, sweep
from clsp.synth.job import SynthConfig, run_synth
from clsp.synth.models import save_generator
from clsp.synth.sampler import SamplerConfig
from clsp.synth.untrained_unets import tiny_unet

SIZE = 8
runner = CliRunner()


@pytest.fixture(scope="module")
def generator(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "generator"
    save_generator(out, tiny_unet(sample_size=SIZE, block_out_channels=(8, 8)),
                   DDIMScheduler(num_train_timesteps=1000, clip_sample=True),
                   {"model_id": "tiny-sweep", "source": {"spec": "digits", "split": "train"}})
    return out


def test_sweep_writes_one_point_per_setting_and_the_nearest_real_reference(generator, tmp_path):
    config = SweepConfig(str(generator), str(tmp_path / "sweep"), ws=(0.0, 0.5, 1.0), steps=(2, 3), anchors=6, k=2,
                         pca_components=8)
    written = run_sweep(config)
    result = written["result"]
    assert [(p["w"], p["steps"]) for p in result["settings"]] == [(0.0, 2), (0.5, 2), (1.0, 2), (0.0, 3), (0.5, 3),
                                                                  (1.0, 3)]
    assert result["anchors"] == 6 and result["k"] == 2 and result["eta"] == 0.1 and result["shards"] is None
    for point in result["settings"]:
        assert 0.0 <= point["agreement_pct"] <= 100.0 and point["hardness"] > 0 and point["diversity"] > 0
    assert result["nearest_real"]["agreement_pct"] > 50.0  # real neighbours of real digits mostly share the class
    assert len({p["hardness"] for p in result["settings"]}) > 1  # w and steps change the positives
    rows = list(csv.DictReader(written["csv"].open()))
    assert len(rows) == 7 and rows[-1]["kind"] == "nearest_real" and rows[0]["w"] == "0.0"
    assert json.loads(written["json"].read_text())["settings"] == result["settings"]
    assert written["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| nearest real (NNCLR) |" in written["md"].read_text()
    assert run_sweep(config)["json"] == written["json"]  # same anchors, same noise: the same result, not a new file


def test_the_point_at_the_shards_setting_is_the_audit_of_those_shards(generator, tmp_path):
    shards = tmp_path / "shards"
    run_synth(SynthConfig(source="digits", model=str(generator), out=shards, image_size=SIZE, k=2, device="cpu",
                          sampler=SamplerConfig(w=0.1, steps=2, noise="cpu-generator"), anchors_per_shard=4, limit=8))
    result = sweep(SweepConfig(str(shards), str(tmp_path / "sweep"), model=str(generator), ws=(1.0,), steps=(3,),
                               anchors=5, pca_components=8))
    assert [(p["w"], p["steps"], p["shards_setting"]) for p in result["settings"]] == [(0.1, 2, True),
                                                                                        (1.0, 3, False)]
    assert result["k"] == 2 and result["shards"] == str(shards)  # K, eta, seed and noise come from the shards
    assert result["noise"] == "cpu-generator"  # not the sampler's default (counter): the shards' own draws
    audit = audit_shards(str(shards), "digits", AuditConfig(max_anchors=5, pca_components=8))
    at_shards = result["settings"][0]
    assert at_shards["agreement_pct"] == pytest.approx(audit["agreement_pct"]["synthetic"])
    assert at_shards["hardness"] == pytest.approx(audit["hardness"]["synthetic"])
    assert at_shards["diversity"] == pytest.approx(audit["diversity"]["synthetic"])
    assert result["nearest_real"]["hardness"] == pytest.approx(audit["hardness"]["nearest_real"])


def test_cli_sweep_prints_the_table_and_writes_the_picture(generator, tmp_path):
    out = tmp_path / "sweep"
    result = runner.invoke(app, ["eval", "sweep", str(generator), "--out", str(out), "--w", "0,1", "--steps", "2",
                                 "--anchors", "4", "--k", "2", "--components", "8"])
    assert result.exit_code == 0, result.output
    assert "| nearest real (NNCLR) |" in result.output and "sweep.png" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["sweep.csv", "sweep.json", "sweep.md", "sweep.png"]


@pytest.mark.parametrize("options, message", [
    (["--w", "0,2"], "sampler w must be a number in [0, 1]"),
    (["--w", "0,a"], "--w '0,a': give comma-separated numbers"),
    (["--steps", "0"], "sampler steps must be an integer >= 1"),
    (["--steps", "2000"], "exceeds the generator's num_train_timesteps = 1000"),
    (["--anchors", "0"], "must be >= 1"),
    (["--model", "other"], "is a generator, not a shard dir"),
])
def test_bad_options_exit_2_with_one_line_and_write_nothing(generator, tmp_path, options, message):
    out = tmp_path / "sweep"
    result = runner.invoke(app, ["eval", "sweep", str(generator), "--out", str(out), "--components", "8", *options])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and message in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_shards_need_the_generator_that_made_them(shard_dir, generator, tmp_path):
    out = tmp_path / "sweep"
    missing = runner.invoke(app, ["eval", "sweep", str(shard_dir), "--out", str(out)])
    assert missing.exit_code == 2 and "pass --model, the generator that made it" in missing.output
    other = runner.invoke(app, ["eval", "sweep", str(shard_dir), "--model", str(generator), "--out", str(out)])
    assert other.exit_code == 2 and "did not make" in other.output
    assert not out.exists()
