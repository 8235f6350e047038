"""Generator quality (issue 9): the metrics on hand-made features, then `clsp diffusion eval` on a tiny generator
(8 px digits, 2 DDIM steps), its card, its bad-input errors and the optional real-FID path."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from diffusers import DDIMScheduler
from PIL import Image
from typer.testing import CliRunner

from clsp.cli import app
from clsp.eval.feature_metrics import frechet_distance, precision_recall
from clsp.eval.fid import inception_fid
from clsp.eval.quality import QualityConfig, evaluate_generator, run_quality
from clsp.sources import load_arrays, open_source
from clsp.synth.diffusion_train import DiffusionTrainConfig, train_diffusion
from clsp.synth.models import save_generator
from clsp.synth.untrained_unets import tiny_unet
from conftest import Planted, dead_pid

SIZE = 8
FAST = ["--steps", "2", "--components", "8"]
runner = CliRunner()


def make_generator(directory: Path, card_source: bool = True) -> Path:
    card = {"model_id": "tiny-quality"}
    if card_source:
        card["source"] = {"spec": "digits", "split": "train"}
    save_generator(directory, tiny_unet(sample_size=SIZE, block_out_channels=(8, 8)),
                   DDIMScheduler(num_train_timesteps=1000, clip_sample=True), card)
    return directory


@pytest.fixture
def generator(tmp_path: Path) -> Path:
    return make_generator(tmp_path / "generator")


def test_frechet_distance_is_zero_for_one_set_and_the_squared_shift_for_a_moved_copy():
    a = np.random.default_rng(0).normal(size=(400, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + np.array([3.0, 0.0, 0.0, 0.0])) == pytest.approx(9.0, abs=1e-6)
    wider = frechet_distance(a, a * 2.0)  # same mean, each variance x4: Tr(S + 4S - 2 * 2S) = Tr(S) ~ 4
    assert 3.0 < wider < 5.0


def test_precision_recall_tell_mode_collapse_from_junk():
    rng = np.random.default_rng(1)
    one, other = rng.normal(size=(100, 2)), rng.normal(size=(100, 2)) + 20.0  # two modes, far apart
    real = np.concatenate([one, other])
    assert precision_recall(real, real.copy()) == (100.0, 100.0)
    precision, recall = precision_recall(real, rng.normal(size=(100, 2)))  # only the first mode: real, not diverse
    assert precision > 90.0 and 40.0 < recall < 60.0
    assert precision_recall(real, rng.normal(size=(100, 2)) + 500.0) == (0.0, 0.0)  # nowhere near the data


def test_evaluate_generator_scores_plain_samples_beside_held_out_real_images(generator):
    config = QualityConfig(str(generator), samples=24, steps=2, pca_components=8)
    result = evaluate_generator(config)
    generated, held = result["generated"], result["heldout_real"]
    assert generated["count"] == 24 and result["real_sample"] == 24 and held["count"] == 24
    assert result["feature_space"].startswith("PCA(8) of raw pixels") and "not FID" in str(result["metric_names"])
    assert result["sampler"]["w"] == 1.0 and result["source"]["spec"] == "digits"  # the card's source
    for metrics in (generated, held):
        assert 0.0 <= metrics["confident_pct"] <= 100.0 and 0.0 <= metrics["recall_pct"] <= 100.0
        assert sum(metrics["class_pct"].values()) == pytest.approx(100.0)
    assert held["frechet_distance"] < generated["frechet_distance"]  # an untrained UNet is far from real digits
    assert held["recall_pct"] > generated["recall_pct"]
    assert result["fid"] is None
    assert evaluate_generator(config)["generated"] == generated  # every sample's noise is keyed on its index


def test_every_row_is_scored_at_one_count_when_the_held_out_split_is_smaller(generator, capsys):
    """The Frechet distance and precision / recall shift with the count: 500 generated images against 360 held-out
    ones (the digits' test split) made the held-out scale look worse than it is. Every row takes the smaller count."""
    result = evaluate_generator(QualityConfig(str(generator), samples=500, steps=2, pca_components=8))
    assert result["generated"]["count"] == result["real_sample"] == result["heldout_real"]["count"] == 360
    assert "every row is scored on 360 images, not 500" in capsys.readouterr().err


def test_the_class_shares_name_numbered_class_folders_by_their_names(generator, tmp_path):
    """Numbered class folders read in name order (0, 1, 10, 2, ...): label 2 is folder 10, and quality.md says so."""
    from clsp.eval.quality import quality_markdown
    from conftest import png_bytes

    rng = np.random.default_rng(0)
    for name in map(str, range(11)):
        (tmp_path / "numbered" / name).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "numbered" / name / f"{i}.png").write_bytes(png_bytes(rng.integers(0, 256, (8, 8, 3),
                                                                                           dtype=np.uint8)))
    result = evaluate_generator(QualityConfig(str(generator), source=f"folder:{tmp_path / 'numbered'}", samples=12,
                                              steps=2, pca_components=4))
    assert result["source"]["classes"][:4] == ["0", "1", "10", "2"]
    shares = result["generated"]["class_pct"]
    shares.update({key: 0.0 for key in shares}, **{"2": 60.0, "5": 40.0})  # label 2 is folder 10, label 5 folder 4
    text = quality_markdown(result)
    assert "from 0.0% (class 0) to 60.0% (class 10)" in text
    digits = evaluate_generator(QualityConfig(str(generator), samples=12, steps=2, pca_components=4))
    assert "classes" not in digits["source"]  # names that are the labels themselves: the record stays as it was


def test_cli_writes_quality_files_and_records_them_in_the_card(generator):
    left = [generator / f".{name}.tmp-{dead_pid()}" for name in ("card.json", "README.md")]  # a killed write's
    for temp in left:
        temp.write_text("{")
    result = runner.invoke(app, ["diffusion", "eval", str(generator), "--samples", "16", *FAST])
    assert result.exit_code == 0, result.output
    assert "NOT FID" in result.output and "| precision, % (k-NN manifold, k = 3) |" in result.output
    saved = json.loads((generator / "quality.json").read_text())
    assert saved["generated"]["count"] == 16
    card = json.loads((generator / "card.json").read_text())
    assert card["quality"]["generated"]["frechet_distance"] == saved["generated"]["frechet_distance"]
    assert card["quality"]["file"] == "quality.json" and card["model_id"] == "tiny-quality"
    assert "## Quality" in (generator / "README.md").read_text()
    assert not any(temp.exists() for temp in left)
    again = runner.invoke(app, ["diffusion", "eval", str(generator), "--samples", "20", *FAST])
    assert again.exit_code == 0, again.output
    assert json.loads((generator / "quality.json").read_text()) == saved  # the earlier result is kept
    assert json.loads((generator / "quality-2.json").read_text())["generated"]["count"] == 20
    assert json.loads((generator / "card.json").read_text())["quality"]["file"] == "quality-2.json"


@pytest.mark.parametrize("options, message", [
    (["--samples", "1"], "--samples 1: use at least 4"),
    (["--steps", "0"], "sampler steps must be an integer >= 1"),
    (["--eta", "2"], "sampler eta must be a number in [0, 1]"),
    (["--device", "tpu"], "--device 'tpu' is not supported"),
    (["--inception-weights", "missing.pth"], "is not a file"),
])
def test_bad_options_exit_2_with_one_line_and_write_nothing(generator, options, message):
    result = runner.invoke(app, ["diffusion", "eval", str(generator), "--samples", "8", "--components", "8", *options])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and message in result.output and "Traceback" not in result.output
    assert not (generator / "quality.json").exists()


def test_a_generator_without_a_recorded_source_asks_for_one(tmp_path):
    generator = make_generator(tmp_path / "bare", card_source=False)
    result = runner.invoke(app, ["diffusion", "eval", str(generator), "--samples", "8", *FAST])
    assert result.exit_code == 2 and "pass --source" in result.output
    assert not (generator / "quality.json").exists()
    ok = runner.invoke(app, ["diffusion", "eval", str(generator), "--source", "digits", "--samples", "8", *FAST,
                             "--out", str(tmp_path / "elsewhere")])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "elsewhere" / "quality.md").is_file()
    assert "quality" not in json.loads((generator / "card.json").read_text())  # results elsewhere: card untouched


def test_real_fid_without_the_extra_fails_before_sampling(generator, tmp_path, monkeypatch):
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"not used")
    monkeypatch.setitem(sys.modules, "torchmetrics", None)  # as if `pip install 'clsp-positives[fid]'` had not been run
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    result = runner.invoke(app, ["diffusion", "eval", str(generator), "--samples", "8", *FAST,
                                 "--inception-weights", str(weights)])
    assert result.exit_code == 2 and "pip install 'clsp-positives[fid]'" in result.output
    assert not (generator / "quality.json").exists()


def test_real_fid_never_unpickles_code_in_the_inception_weights(tmp_path):
    pytest.importorskip("torchmetrics", reason="the optional `fid` extra (torchmetrics) is not installed")
    pytest.importorskip("torch_fidelity", reason="the optional `fid` extra (torch-fidelity) is not installed")
    import torch

    marker, weights = tmp_path / "ran", tmp_path / "evil.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": Planted(marker)}, weights)
    images = np.zeros((4, SIZE, SIZE, 3), np.uint8)
    with pytest.raises(ValueError, match="not a plain state dict"):
        inception_fid(images, images, str(weights), torch.device("cpu"), 4)
    assert not marker.exists()


TINY_TRAINING = dict(source="digits", split="test", image_size=8, channels=(8, 8), layers_per_block=1,
                     attention_levels=(), norm_groups=4, dropout=0.0, batch_size=4, lr=1e-3, warmup_steps=1, steps=1,
                     ema_decay=0.9, checkpoint_every=1, sample_steps=2, grid_size=1)
MINE = "My notes on this generator: do not lose them\n"


@pytest.fixture
def trained(tmp_path):
    out = tmp_path / "gen"
    train_diffusion(DiffusionTrainConfig(out=out, **TINY_TRAINING))
    (out / "README.md").write_text(MINE)
    return out


def test_eval_keeps_a_readme_the_user_wrote(trained):
    """README.md in a generator folder that is not ours (--overwrite keeps it) was replaced by `clsp diffusion eval`,
    and by the run that --overwrite starts."""
    run_quality(QualityConfig(str(trained), samples=8, steps=2, pca_components=4))
    assert (trained / "README.md").read_text() == MINE


def test_overwrite_keeps_a_readme_the_user_wrote(trained):
    train_diffusion(DiffusionTrainConfig(out=trained, overwrite=True, **{**TINY_TRAINING, "seed": 1}))
    assert json.loads((trained / "card.json").read_text())["seed"] == 1  # replaced by the new run...
    assert (trained / "README.md").read_text() == MINE  # ...but for the user's README.md


def _folder(root: Path, rows) -> None:
    images, labels, _ = load_arrays(open_source("digits", "all", image_size=8))
    for i in rows:
        folder = root / "data" / str(int(labels[i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / f"{i}.png")


def test_eval_refuses_a_card_source_that_no_longer_holds_the_training_images(tmp_path, monkeypatch):
    """The card's source spec names other images here (a relative folder read from elsewhere): they were scored,
    and the numbers recorded in the card as the generator's."""
    _folder(tmp_path / "a", range(0, 120))
    _folder(tmp_path / "b", range(600, 720))
    monkeypatch.chdir(tmp_path / "a")
    options = {**TINY_TRAINING, "source": "folder:data", "split": "train"}
    gen = train_diffusion(DiffusionTrainConfig(out=tmp_path / "gen", **options))
    card_before = (gen / "card.json").read_text()
    monkeypatch.chdir(tmp_path / "b")  # the same spec, folder:data, names other images here
    with pytest.raises(ValueError, match="does not hold the images .* was trained on .*pass --source"):
        run_quality(QualityConfig(str(gen), samples=8, steps=2, pca_components=4))
    assert (gen / "card.json").read_text() == card_before


def test_a_generator_trained_on_split_all_gets_no_held_out_scale(tmp_path, capsys):
    """The card's split "all" holds the test split: the "held-out" scale was scored on test images that were also in
    the real set the reference classifier and PCA are fitted on."""
    gen = tmp_path / "gen"
    save_generator(gen, tiny_unet(sample_size=8, block_out_channels=(8, 8)),
                   DDIMScheduler(num_train_timesteps=1000, clip_sample=True),
                   {"model_id": "tiny", "source": {"spec": "digits", "split": "all"}})
    result = evaluate_generator(QualityConfig(str(gen), samples=8, steps=2, pca_components=8))
    assert result["source"]["split"] == "all"
    assert result["heldout_real"] is None and result["reference_heldout_accuracy_pct"] is None
    assert "no held-out scale is scored (pass --split train for one)" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["quality", "sweep"])
def test_a_mistyped_generator_is_named_as_no_folder_rather_than_asked_for_a_source(tmp_path, command):
    """`clsp diffusion eval generators/digits-16` (a typo) said it "records no source: pass --source"."""
    from clsp.eval.sweep import SweepConfig, sweep

    def run(generator: Path):
        if command == "quality":
            return evaluate_generator(QualityConfig(str(generator), samples=8, steps=2, out=str(tmp_path / "q")))
        return sweep(SweepConfig(str(generator), str(tmp_path / "s"), ws=(0.1,), steps=(2,), anchors=4))

    with pytest.raises(ValueError, match=r"gen-typo is no local folder \(check its name: `ls .*`\); for a hub "
                                         r"generator, pass --source"):
        run(tmp_path / "gen-typo")
    (tmp_path / "gen").mkdir()
    with pytest.raises(ValueError, match=r"gen records no source \(no card.json with a source\): pass --source"):
        run(tmp_path / "gen")
