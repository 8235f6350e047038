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
from clsp.eval.sweep import SweepConfig, _plan, run_sweep, sweep
from clsp.shards.manifest import read_manifest
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
    # ... and their precision: shards made in fp32 (on the CPU here) are swept in fp32 on a GPU too, a generator alone
    # as `synth run` samples by default (bf16 autocast on a GPU)
    assert result["precision"] == "fp32" and read_manifest(shards).run["compute"]["precision"] == "fp32"
    assert not _plan(SweepConfig(str(shards), str(tmp_path / "sweep"), model=str(generator))).bf16
    assert _plan(SweepConfig(str(generator), str(tmp_path / "sweep"))).bf16
    audit = audit_shards(str(shards), "digits", AuditConfig(max_anchors=5, pca_components=8))
    at_shards = result["settings"][0]
    for key in ("agreement_pct", "hardness", "diversity"):  # the shards' own positives: the audit's numbers exactly
        assert at_shards[key] == audit[key]["synthetic"], key
    assert result["nearest_real"]["hardness"] == pytest.approx(audit["hardness"]["nearest_real"])
    # other positives at the shards' (w, steps) are not marked as theirs: another eta or seed, or more than their K
    for options, marked in ((dict(eta=0.5), False), (dict(seed=3), False), (dict(k=3), False), (dict(k=1), True)):
        result = sweep(SweepConfig(str(shards), str(tmp_path / "other"), model=str(generator), ws=(0.1,), steps=(2,),
                                   anchors=5, pca_components=8, **options))
        assert [(p["w"], p["steps"], p["shards_setting"]) for p in result["settings"]] == [(0.1, 2, marked)], options


def test_the_point_at_the_shards_setting_reads_their_positives_made_at_another_forward_batch(tmp_path):
    """The sweep samples with its own --forward-batch (256 rows); shards made at 4 rows a forward differ from those in
    a few pixels on this CPU (README: --forward-batch), so only reading the shards' positives repeats their audit."""
    shipped = Path(__file__).resolve().parent.parent / "generators" / "digits-16px"
    shards = tmp_path / "shards"
    run_synth(SynthConfig(source="digits", model=str(shipped), out=shards, k=4, device="cpu", limit=64,
                          anchors_per_shard=64, batch_size=4, sampler=SamplerConfig(w=0.2, steps=4)))
    audit = audit_shards(str(shards), "digits", AuditConfig(max_anchors=64))
    result = sweep(SweepConfig(str(shards), str(tmp_path / "sweep"), model=str(shipped), ws=(0.2,), steps=(4,),
                               anchors=64))
    (marked,) = result["settings"]
    assert marked["shards_setting"]
    for key in ("agreement_pct", "hardness", "diversity"):
        assert marked[key] == audit[key]["synthetic"], key


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


def _shards_of(generator: Path, source: str, out: Path) -> Path:
    run_synth(SynthConfig(source=source, model=str(generator), out=out, image_size=SIZE, k=2, device="cpu",
                          sampler=SamplerConfig(w=0.1, steps=2), anchors_per_shard=8, limit=8))
    return out


def _sweep_cli(target: Path, out: Path, *options: str):
    return runner.invoke(app, ["eval", "sweep", str(target), "--out", str(out), "--w", "1", "--steps", "2",
                               "--anchors", "4", "--components", "4", *options])


@pytest.mark.parametrize("file, changes, part", [
    ("scheduler/scheduler_config.json", dict(beta_schedule="scaled_linear"), "scheduler config"),
    ("unet/config.json", dict(flip_sin_to_cos=False), "UNet config")])  # the tiny UNet's is True
def test_shards_are_swept_only_with_the_scheduler_and_unet_config_that_made_them(generator, tmp_path, file, changes,
                                                                                  part):
    """The same weights with another scheduler or UNet config sample other positives, so the point marked as the
    shards' would not be theirs: refused, naming what differs. A manifest written before the config digests were
    recorded reads them as the given generator's (as a synth resume does)."""
    import shutil

    from clsp.shards.manifest import read_manifest
    from clsp.shards.manifest_writer import write_manifest

    shards = _shards_of(generator, "digits", tmp_path / "shards")
    other = tmp_path / "other"
    shutil.copytree(generator, other)
    settings = json.loads((other / file).read_text())
    (other / file).write_text(json.dumps({**settings, **changes}))
    out = tmp_path / "sweep"
    refused = _sweep_cli(shards, out, "--model", str(other))
    assert refused.exit_code == 2 and "Traceback" not in refused.output, refused.output
    assert f"--model {other} did not make {shards} ({part} " in refused.output
    assert "pass the generator that made the shards" in refused.output and not out.exists()

    made = read_manifest(shards).run
    older = {key: made["generator"][key] for key in ("model_id", "weights_sha256")}
    write_manifest(shards, {**made, "generator": older})  # as clsp wrote it before recording the configs
    assert _sweep_cli(shards, out, "--model", str(generator)).exit_code == 0


def test_shards_are_swept_only_against_the_data_they_were_made_from(generator, tmp_path):
    """Numbered class folders are read in name order (1, 10, 2, ...), a Parquet copy of them numbers its classes as
    its label column does: swept against the copy, the shards' anchor labels and the reference classifier's would
    name other classes, and class agreement came out wrong without a word. Another source, or the shards' own that
    has changed since, is refused; the shards' own source is swept."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clsp.sources import load_arrays, open_source
    from conftest import png_bytes

    images, digits, _ = load_arrays(open_source("digits", "train", SIZE), limit=60)
    folder, copy = tmp_path / "numbered", tmp_path / "copy.parquet"
    for i, (image, digit) in enumerate(zip(images, digits)):
        (folder / str(digit + 1)).mkdir(parents=True, exist_ok=True)  # classes 1..10
        (folder / str(digit + 1) / f"{i:03d}.png").write_bytes(png_bytes(image))
    pq.write_table(pa.table({"img": [{"bytes": png_bytes(image), "path": None} for image in images],
                             "label": [int(d) for d in digits]}), copy)  # class "1" is 0, ..., "10" is 9
    assert open_source(f"folder:{folder}", "train").classes[:3] == ["1", "10", "2"]  # the folders' label 1 is "10"
    shards = _shards_of(generator, f"folder:{folder}", tmp_path / "shards")
    out = tmp_path / "sweep"
    other = _sweep_cli(shards, out, "--model", str(generator), "--source", f"parquet:{copy}")
    assert other.exit_code == 2 and "Traceback" not in other.output, other.output
    assert f"were made from folder:{folder}[train]" in other.output and f"not from parquet:{copy}" in other.output
    assert "leave --source out" in other.output and not out.exists()

    assert _sweep_cli(shards, out, "--model", str(generator)).exit_code == 0  # their own source
    (folder / "3" / "extra.png").write_bytes(png_bytes(images[0]))  # the folder holds other images now
    changed = _sweep_cli(shards, tmp_path / "sweep-2", "--model", str(generator))
    assert changed.exit_code == 2 and f"folder:{folder} has changed since {shards} were made" in changed.output
    assert not (tmp_path / "sweep-2").exists()


def test_sweep_finds_split_all_anchors_in_the_train_split_as_the_audit_does(tmp_path, monkeypatch):
    """Shards made with --split all from a folder source: their ids (train-CLASS-NAME) are not the train split's
    (CLASS-NAME), so the sweep found none and judged them by a classifier fitted on them; the audit finds them by
    their pixels (eval.audit.anchor_rows), and the sweep now does too."""
    import numpy as np
    from PIL import Image

    import clsp.eval.audit as audit_module
    from clsp.eval.audit import anchor_rows, load_shard_sample
    from clsp.sources import load_arrays, open_source

    images, labels, _ = load_arrays(open_source("digits", "all", image_size=8))
    data = tmp_path / "data"
    for split, rows in (("train", range(0, 150)), ("test", range(150, 200))):
        for i in rows:
            folder = data / split / str(int(labels[i]))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(folder / f"{i}.png")
    gen = tmp_path / "gen"
    save_generator(gen, tiny_unet(sample_size=8, block_out_channels=(8, 8)),
                   DDIMScheduler(num_train_timesteps=1000, clip_sample=True), {"model_id": "tiny"})
    shards = tmp_path / "shards"
    run_synth(SynthConfig(source=f"folder:{data}", split="all", model=str(gen), out=shards, image_size=8, k=2,
                          device="cpu", sampler=SamplerConfig(w=0.1, steps=2), anchors_per_shard=100, limit=200))
    anchors, _, _, ids, _ = load_shard_sample(str(shards), 30, 0)
    real, _, real_ids = load_arrays(open_source(f"folder:{data}", "train", image_size=8))
    expected = int((anchor_rows(ids, anchors, real_ids, real) >= 0).sum())
    assert expected > 0  # some anchors are train images

    seen = []
    real_audit_arrays = audit_module.audit_arrays

    def spy(anchors, positives, labels, real_images, real_labels, index=None, *args, **kwargs):
        seen.append(np.asarray(index))
        return real_audit_arrays(anchors, positives, labels, real_images, real_labels, index, *args, **kwargs)

    monkeypatch.setattr(audit_module, "audit_arrays", spy)
    result = sweep(SweepConfig(str(shards), str(tmp_path / "sweep"), model=str(gen), ws=(0.1,), steps=(2,),
                               anchors=30, pca_components=8))
    assert int((seen[0] >= 0).sum()) == expected, "sweep judged train-split anchors as unseen images"
    monkeypatch.undo()
    audit = audit_shards(str(shards), f"folder:{data}", AuditConfig(max_anchors=30, pca_components=8))
    assert result["settings"][0]["shards_setting"]
    assert result["settings"][0]["agreement_pct"] == pytest.approx(audit["agreement_pct"]["synthetic"])
