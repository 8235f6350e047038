"""Numbers you can trust (issue 11): splits mean the same for every source kind, eval scores the data the run trained on
(never a silent default), reports never average across sources or over a seed twice, and bad input writes nothing."""
from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from clsp.cli import app
from clsp.errors import UserError
from clsp.sources import open_source
from conftest import png_bytes, write_hf_parquet
from test_eval import TINY_TRAIN, tiny_world  # noqa: F401  (a module fixture: shards + folder:DIR with train/ test/)


def _cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def _images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(n)]


def _parquet(path, n: int, seed: int) -> None:
    """n labelled 8 px images (3 classes) in the Hugging Face image layout, without class names."""
    write_hf_parquet(path, _images(n, seed), [i % 3 for i in range(n)])


def _folder(root, counts: dict[str, int], seed: int = 0) -> None:
    """root/CLASS/i.png for each class name -> image count."""
    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            (root / name / f"{i}.png").write_bytes(png_bytes(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)))


# --- splits -----------------------------------------------------------------------------------------------------------

def test_a_parquet_file_that_names_no_split_is_one_split_and_refuses_test(tmp_path):
    _parquet(tmp_path / "one.parquet", 6, seed=0)
    info = _cli("data", "info", f"parquet:{tmp_path / 'one.parquet'}")
    assert info.exit_code == 0, info.output
    assert json.loads(info.stdout)["count"] == 6 and "one split" in json.loads(info.stdout)["splits"]
    refused = _cli("data", "info", f"parquet:{tmp_path / 'one.parquet'}", "--split", "test")
    assert refused.exit_code == 2 and "error:" in refused.output and "names no split" in refused.output
    assert "--test-source" in refused.output and "Traceback" not in refused.output

    _parquet(tmp_path / "hub" / "train-00000-of-00001.parquet", 5, seed=1)  # a file named for a split is that split
    named = _cli("data", "info", f"parquet:{tmp_path / 'hub' / 'train-00000-of-00001.parquet'}", "--split", "test")
    assert named.exit_code == 2 and "holds no test split (only train)" in named.output
    _parquet(tmp_path / "hub" / "validation-00000-of-00001.parquet", 3, seed=2)  # validation is the test split
    assert len(open_source(f"parquet:{tmp_path / 'hub'}", "test")) == 3
    assert len(open_source(f"parquet:{tmp_path / 'hub' / '*.parquet'}", "train")) == 5  # a glob: the same rule
    assert len(open_source(f"parquet:{tmp_path / 'hub'}", "all")) == 8


def test_an_imagenet_style_folder_reads_val_as_test_with_the_train_classes(tmp_path):
    _folder(tmp_path / "imagenet" / "train", {"cat": 3, "dog": 2, "eel": 2})
    _folder(tmp_path / "imagenet" / "val", {"cat": 1, "eel": 2}, seed=1)  # no dog in val: eel must stay label 2
    test = open_source(f"folder:{tmp_path / 'imagenet'}", "test")
    assert test.classes == ["cat", "dog", "eel"] and len(test) == 3
    assert [r.label for r in test] == [0, 2, 2]
    everything = open_source(f"folder:{tmp_path / 'imagenet'}", "all")
    assert everything.classes == ["cat", "dog", "eel"] and len({r.anchor_id for r in everything}) == 10
    assert len(open_source(f"folder:{tmp_path / 'imagenet' / 'val'}", "test")) == 3  # the folder named val is test
    with pytest.raises(UserError, match="holds no train split"):
        open_source(f"folder:{tmp_path / 'imagenet' / 'val'}", "train")
    _folder(tmp_path / "flat", {"cat": 2, "dog": 2})  # DIR/CLASS: one split
    refused = _cli("data", "info", f"folder:{tmp_path / 'flat'}", "--split", "test")
    assert refused.exit_code == 2 and "names no split" in refused.output


# --- eval scores the data the run trained on -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tiny_world):  # noqa: F811
    """A tiny run trained on shards that record folder:DIR's train split as their source."""
    from clsp.train.loop import make_config, train

    root, shards, source = tiny_world
    run = root / "trust-run"
    train(make_config(None, shards=str(shards), out=str(run), method="simclr", positives="none", **dict(TINY_TRAIN)))
    return root, shards, source, run


def _copy_run(run, to):
    """The run's weights, config and summary only (no eval/ and no feature cache)."""
    to.mkdir()
    for name in ("config.json", "backbone.safetensors", "summary.json"):
        shutil.copy(run / name, to / name)
    return to


def test_eval_defaults_to_the_recorded_source_and_refuses_another(trained, tmp_path):
    root, _, source, run = trained
    run = _copy_run(run, tmp_path / "run")
    default = _cli("eval", "knn", run)
    assert default.exit_code == 0, default.output
    result = json.loads((run / "eval" / "knn.json").read_text())
    assert result["source"] == source and result["source_check"] == "same"
    assert result["trained_on"]["fingerprint"] == open_source(source, "train", 8).fingerprint()

    made = sorted(p.name for p in run.rglob("*"))
    other = _cli("eval", "knn", run, "--source", "digits")
    assert other.exit_code == 2 and "error:" in other.output and "Traceback" not in other.output
    assert "fingerprint" in other.output and f"--source {source}" in other.output and "--transfer" in other.output
    assert sorted(p.name for p in run.rglob("*")) == made  # nothing written
    transfer = _cli("eval", "knn", run, "--source", "digits", "--transfer")
    assert transfer.exit_code == 0, transfer.output
    assert json.loads((run / "eval" / "knn-2.json").read_text())["source_check"] == "transfer"


def test_a_recorded_source_that_cannot_be_opened_from_here_says_where_it_came_from(trained, tmp_path):
    """A run recorded folder:data (a relative path): evaluated from another directory, the error named a folder that
    does not exist and not that it came from the run's record, nor the fix."""
    _, _, _, run = trained
    run = _copy_run(run, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["data"]["source"]["spec"] = "folder:no-such-data"
    (run / "config.json").write_text(json.dumps(config))
    refused = _cli("eval", "knn", run)
    assert refused.exit_code == 2 and "Traceback" not in refused.output, refused.output
    assert f"the source folder:no-such-data is the one {run}/config.json records" in refused.output
    assert "pass --source with its path from here" in refused.output


def test_a_test_source_without_class_names_is_matched_to_the_banks_names_only_where_that_can_hold(trained, tmp_path):
    """Bare labels beside a bank that names its classes: refused when the names are numbers read in name order (label
    2 is class '10'), said in a warning when they are words (CIFAR's names in name order are its numbering), silent
    when the test set names the same classes."""
    root, _, source, run = trained
    run = _copy_run(run, tmp_path / "run")
    _folder(tmp_path / "numbered" / "train", {str(c): 2 for c in range(11)})  # 0, 1, 10, 2, ...
    _parquet(tmp_path / "bare.parquet", 6, seed=3)
    bare = f"parquet:{tmp_path / 'bare.parquet'}"
    refused = _cli("eval", "knn", run, "--source", f"folder:{tmp_path / 'numbered'}", "--transfer",
                   "--test-source", bare)
    assert refused.exit_code == 2 and "names its classes by numbers, in name order (0, 1, 10, 2" in refused.output
    assert "its label 2 is class 10" in refused.output and not (run / "eval").exists()
    _folder(tmp_path / "padded" / "train", {f"{c:02d}": 2 for c in range(11)})  # 00, 01, ..., 10: numeric order
    padded = _cli("eval", "knn", run, "--source", f"folder:{tmp_path / 'padded'}", "--transfer", "--test-source", bare)
    assert padded.exit_code == 0 and "0 = 00, 1 = 01, 2 = 02" in padded.output, padded.output
    warned = _cli("eval", "knn", run, "--test-source", bare)  # the run's own bank: classes c0, c1, c2
    assert warned.exit_code == 0, warned.output
    assert "warning: " in warned.output and "its label i is read as" in warned.output and "0 = c0" in warned.output
    write_hf_parquet(tmp_path / "named.parquet", _images(6, seed=3), [i % 3 for i in range(6)], ["c0", "c1", "c2"])
    named = _cli("eval", "knn", run, "--test-source", f"parquet:{tmp_path / 'named.parquet'}")
    assert named.exit_code == 0 and "warning" not in named.output, named.output


def test_a_source_changed_since_training_is_named_as_changed(trained, tmp_path):
    """The recorded source, whose images were edited after the shards were made: the error says the data changed
    (not "evaluate on --source X", the very source the user passed)."""
    import shutil

    from PIL import Image

    root, _, source, run = trained
    images = tmp_path / "images"
    shutil.copytree(source.split(":", 1)[1], images)
    run = _copy_run(run, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["data"]["source"].update(spec=f"folder:{images}",
                                    fingerprint=open_source(f"folder:{images}", "train", 8).fingerprint())
    (run / "config.json").write_text(json.dumps(config))
    first = sorted((images / "train" / "c0").iterdir())[0]
    Image.new("RGB", (8, 8), (255, 0, 0)).save(first)  # one training image edited since
    refused = _cli("eval", "knn", run)
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert f"folder:{images}[train] has changed since" in refused.output and "--transfer" in refused.output
    assert "--source" not in refused.output, refused.output


def test_a_run_without_a_source_record_needs_source(trained, tmp_path):
    _, _, source, run = trained
    run = _copy_run(run, tmp_path / "old-run")
    config = json.loads((run / "config.json").read_text())
    del config["data"]["source"]  # as runs made before the record
    (run / "config.json").write_text(json.dumps(config))
    refused = _cli("eval", "knn", run)
    assert refused.exit_code == 2 and "does not record the data the run trained on" in refused.output
    assert "pass --source" in refused.output and not (run / "eval").exists()
    warned = _cli("eval", "knn", run, "--source", source)
    assert warned.exit_code == 0 and "warning:" in warned.output and "cannot be checked" in warned.output


def test_a_train_file_is_never_scored_as_its_own_test_split(trained, tmp_path):
    _, _, _, run = trained
    run = _copy_run(run, tmp_path / "run")
    train_file = tmp_path / "data" / "train-00000-of-00001.parquet"
    _parquet(train_file, 12, seed=3)
    refused = _cli("eval", "knn", run, "--source", f"parquet:{train_file}", "--transfer")
    assert refused.exit_code == 2 and "holds no test split" in refused.output and "--test-source" in refused.output
    named_train = _cli("eval", "knn", run, "--source", f"parquet:{train_file}", "--test-source",
                       f"parquet:{train_file}", "--transfer")
    assert named_train.exit_code == 2 and "holds no test split" in named_train.output
    _parquet(tmp_path / "pool.parquet", 12, seed=3)  # the train images again, under a name that says no split
    same = _cli("eval", "knn", run, "--source", f"parquet:{train_file}", "--test-source",
                f"parquet:{tmp_path / 'pool.parquet'}", "--transfer")
    assert same.exit_code == 2 and "12 of the 12 test images" in same.output
    _parquet(tmp_path / "held-out.parquet", 6, seed=4)  # names no split: read whole when named as the test source
    scored = _cli("eval", "knn", run, "--source", f"parquet:{train_file}", "--test-source",
                  f"parquet:{tmp_path / 'held-out.parquet'}", "--transfer")
    assert scored.exit_code == 0, scored.output
    result = json.loads((run / "eval" / "knn.json").read_text())
    assert result["test_source"] == f"parquet:{tmp_path / 'held-out.parquet'}" and result["test_images_in_train"] == 0

    # a few training images among held-out ones: scored, but never silently (they were before)
    mixed = tmp_path / "mixed.parquet"
    write_hf_parquet(mixed, _images(12, seed=3)[:4] + _images(6, seed=5), [i % 3 for i in range(10)])
    partly = _cli("eval", "knn", run, "--source", f"parquet:{train_file}", "--test-source", f"parquet:{mixed}",
                  "--transfer")
    assert partly.exit_code == 0 and "warning: 4 of the 10 test images" in partly.output
    assert json.loads((run / "eval" / "knn-2.json").read_text())["test_images_in_train"] == 4  # other test data


def test_device_cuda_without_cuda_is_refused_even_when_features_are_cached(trained, tmp_path, monkeypatch):
    _, _, _, run = trained
    run = _copy_run(run, tmp_path / "run")
    assert _cli("eval", "knn", run).exit_code == 0  # fills the feature cache
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    refused = _cli("eval", "knn", run, "--device", "cuda")
    assert refused.exit_code == 2 and "no CUDA device is visible" in refused.output and "--device cpu" in refused.output
    assert not (run / "eval" / "knn-2.json").exists()


def test_eval_all_with_missing_shards_writes_nothing(trained, tmp_path):
    _, _, _, run = trained
    run = _copy_run(run, tmp_path / "run")
    result = _cli("eval", "all", run, "--shards", tmp_path / "missing", "--out", tmp_path / "report",
                  "--probe-epochs", "2")
    assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in run.iterdir()) == ["backbone.safetensors", "config.json", "summary.json"]
    assert not (tmp_path / "report").exists()


def test_eval_all_refuses_shards_of_the_same_source_that_the_run_did_not_train_on(trained, tmp_path):
    _, shards, _, run = trained
    run = _copy_run(run, tmp_path / "run")
    record = json.loads((run / "config.json").read_text())
    record["data"]["shards_sha256"] = "0" * 64  # as if trained on other shards of the same source (another K, w ...)
    (run / "config.json").write_text(json.dumps(record))
    result = _cli("eval", "all", run, "--shards", shards, "--out", tmp_path / "report", "--probe-epochs", "2")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert (f"{shards} are not the shards {run} trained on" in result.output
            and "--shards the directory" in result.output)
    assert sorted(p.name for p in run.iterdir()) == ["backbone.safetensors", "config.json", "summary.json"]
    assert not (tmp_path / "report").exists()


def test_a_run_that_has_not_finished_training_is_not_scored(trained, tmp_path):
    _, shards, _, run = trained
    run = _copy_run(run, tmp_path / "run")
    (run / "summary.json").unlink()  # as a kill -9 between two checkpoints leaves it
    for command in (["eval", "knn", run], ["eval", "all", run, "--shards", shards, "--out", tmp_path / "report"]):
        result = _cli(*command)
        assert result.exit_code == 2 and "has not finished training" in result.output, result.output
        assert "--resume" in result.output and not (run / "eval").exists() and not (tmp_path / "report").exists()
    (run / "backbone.safetensors").unlink()  # still running, or stopped before its first checkpoint: no weights yet
    result = _cli("eval", "knn", run)
    assert result.exit_code == 2 and f"{run} has no backbone.safetensors yet: its training is still running, or " \
                                      f"stopped before its first checkpoint" in result.output, result.output
    assert "--resume" in result.output and "train a model there first" not in result.output
    result = _cli("eval", "knn", shards)  # the shards given for the run
    assert result.exit_code == 2 and f"{shards} holds shards (manifest.json), not a training run" in result.output, \
        result.output


def test_eval_all_refuses_an_out_inside_the_source_folder(trained, tmp_path):
    _, shards, source, run = trained
    run = _copy_run(run, tmp_path / "run")
    folder = source.partition(":")[2]
    result = _cli("eval", "all", run, "--shards", shards, "--out", f"{folder}/report", "--probe-epochs", "2")
    assert result.exit_code == 2 and "lies inside" in result.output, result.output
    assert not Path(folder, "report").exists() and not (run / "eval").exists()


def _run_on_a_copy_of_its_source(trained, tmp_path):
    """A copy of the run whose config.json names a copy of its folder source (the same images, so the same
    fingerprint): a test that writes into the source spoils only its own copy. -> (run, spec, folder)."""
    _, _, source, run = trained
    folder = tmp_path / "images"
    shutil.copytree(source.partition(":")[2], folder)
    run = _copy_run(run, tmp_path / "run")
    record = json.loads((run / "config.json").read_text())
    record["data"]["source"]["spec"] = f"folder:{folder}"
    (run / "config.json").write_text(json.dumps(record))
    return run, f"folder:{folder}", folder


@pytest.mark.parametrize("command", ["audit", "plots", "report", "study", "sweep", "all"])
def test_every_eval_command_refuses_an_out_inside_a_folder_source_before_any_work(trained, generator, tmp_path,
                                                                                   command):
    """What an eval command writes under an --out inside a folder source becomes part of that source: here a folder
    beside train/ and test/ makes it unreadable, inside train/ it would be a new class, and the run's own evaluation
    would then be refused as on changed data. Each command refuses it, naming the fix, with nothing written. (The
    sweep refused it already: its synth config checks the --out; `all` did for the data it scores, here digits.)"""
    from conftest import snapshot

    _, shards, _, _ = trained
    run, spec, folder = _run_on_a_copy_of_its_source(trained, tmp_path)
    if command in ("plots", "report"):  # a result for them to show, scored on the run's (copied) source
        for part in (["knn"], ["linear", "--probe-epochs", "2"]):
            assert _cli("eval", *part, run).exit_code == 0
    out = folder / "written"
    spelt = lambda value: "False" if value is False else json.dumps(value)  # noqa: E731
    args = {"audit": ["audit", shards, "--source", spec, "--anchors", "4", "--components", "4"],
            "plots": ["plots", run], "report": ["report", run],
            "study": ["study", shards, "--source", spec, "--positives", "none", "--seeds", "0", "--folds", "2",
                      "--probe-epochs", "1",
                      *[arg for key, value in TINY_TRAIN for arg in ("--train-option", f"{key}={spelt(value)}")]],
            "sweep": ["sweep", generator, "--source", spec, "--w", "1", "--steps", "2", "--anchors", "2", "--k", "2",
                      "--components", "4"],
            "all": ["all", run, "--shards", shards, "--source", "digits", "--transfer", "--probe-epochs", "2"]}[command]
    before = snapshot(folder)
    result = _cli("eval", *args, "--out", out)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"--out {out} lies inside {folder}" in result.output and "choose an --out outside" in result.output
    assert snapshot(folder) == before and not out.exists()
    assert open_source(spec, "train", 8).classes == ["c0", "c1", "c2"]  # the source reads as before


def test_eval_all_with_too_few_test_images_for_a_t_sne_reports_without_one(trained, tmp_path):
    _, shards, _, run = trained
    run = _copy_run(run, tmp_path / "run")
    _folder(tmp_path / "few" / "test", {"c0": 2, "c1": 1, "c2": 1}, seed=5)  # 4 held-out images: a t-SNE needs 5
    result = _cli("eval", "all", run, "--shards", shards, "--test-source", f"folder:{tmp_path / 'few'}", "--out",
                  tmp_path / "report", "--probe-epochs", "2")
    assert result.exit_code == 0, result.output
    assert f"no t-SNE of {run.name}: 4 test images, it needs 5" in result.output
    assert (tmp_path / "report" / "report.md").is_file() and not list((tmp_path / "report").glob("*tsne*"))


# --- reports ------------------------------------------------------------------------------------------------------

def _result(root, name: str, source: str, seed: int, linear: float, positives: str = "synthetic",
            probe_epochs: int = 30, file: str = "results.json", metrics=("linear_top1", "knn_best", "knn_k20"),
            trained: dict | None = None):
    """A run folder holding a hand-made result (no weights: nothing to check it against); `trained`: a training
    record's sections (config, data) to add to its config.json."""
    run = root / name
    (run / "eval").mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps({"method": "simclr", "positives": positives, "lam": 1.0,
                                                 "seed": seed, **(trained or {})}))
    fingerprint = source.encode().hex().ljust(64, "0")
    settings = {"ks": [5, 20], "temperature": 0.07, "probe": {"epochs": probe_epochs, "lr": 1.0, "batch_size": 256}}
    (run / "eval" / file).write_text(json.dumps(
        {"run": name, "source": source, "test_source": source, "train_fingerprint": fingerprint,
         "test_fingerprint": fingerprint, "knn_best_k": 20, "eval_config": settings,
         **{metric: linear for metric in metrics}}))
    return run


def test_a_source_recorded_by_a_relative_path_does_not_refuse_an_out_elsewhere(tmp_path, monkeypatch):
    """A recorded spec holds the path as typed where that stage ran: `folder:.` then is not the folder a report runs
    in now, so an --out here is not refused for it; an absolute recorded path still is (the test above)."""
    run = _result(tmp_path / "runs", "run", "folder:.", 0, 70.0)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = _cli("eval", "report", run, "--out", "report")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "elsewhere" / "report" / "report.md").is_file()


def test_report_groups_by_source_and_refuses_a_seed_twice(tmp_path):
    from clsp.eval.report import report

    runs = [_result(tmp_path, f"r-{source}", source, 0, linear)
            for source, linear in (("digits", 90.0), ("cifar10:c", 60.0), ("folder:f", 75.0))]
    out = report(runs, tmp_path / "report")
    assert sorted((g["source"].split(" ")[0], g["seeds"]) for g in out["groups"]) == [
        ("cifar10:c", [0]), ("digits", [0]), ("folder:f", [0])]

    again = [_result(tmp_path, "d-0", "digits", 0, 80.0), _result(tmp_path, "d-0-rerun", "digits", 0, 82.0)]
    with pytest.raises(UserError, match="both seed 0 of simclr/synthetic"):
        report(again, tmp_path / "report-2")
    assert not (tmp_path / "report-2").exists()


def test_report_refuses_runs_scored_with_other_settings_and_parts_of_other_inputs(tmp_path):
    from clsp.eval.report import report

    runs = [_result(tmp_path, f"r-{p}", "digits", 0, 80.0, positives=p, probe_epochs=e)
            for p, e in (("none", 30), ("synthetic", 100))]
    with pytest.raises(UserError, match=r"r-none and .*r-synthetic were scored with other settings "
                                        r"\(probe.epochs 30 vs 100\).*--probe-epochs"):
        report(runs, tmp_path / "report")  # a 30-epoch probe against a 100-epoch one: no paired difference
    assert not (tmp_path / "report").exists()
    knn_only = _result(tmp_path, "knn-only", "digits", 1, 70.0, probe_epochs=100, metrics=("knn_best", "knn_k20"))
    summary = report([runs[0], knn_only], tmp_path / "report")  # its unused probe setting does not matter
    assert "Linear probe: 30 epochs" in Path(summary["report"]).read_text()

    _result(tmp_path, "parts", "digits", 0, 75.0, file="knn.json", metrics=("knn_best", "knn_k20"))
    _result(tmp_path, "parts", "cifar10:c", 0, 60.0, file="linear.json", metrics=("linear_top1",))
    with pytest.raises(UserError, match="knn.json and linear.json were computed from other source, "):
        report([tmp_path / "parts"], tmp_path / "report-2")  # kNN on one dataset, the probe on another: not one row
    _result(tmp_path, "parts", "digits", 0, 77.0, file="linear.json", metrics=("linear_top1",))
    [row] = report([tmp_path / "parts"], tmp_path / "report-2")["groups"]
    assert (row["knn_best"][0], row["linear_top1"][0]) == (75.0, 77.0)


def test_report_refuses_to_average_or_pair_runs_that_were_trained_otherwise(tmp_path):
    """Runs were grouped by (source, method, positives, lam) only: a 50-epoch and a 1-epoch run became two seeds of
    one row, and a 50-epoch CLSP run was paired against a 1-epoch baseline, with a verdict."""
    from clsp.eval.report import report

    def trained(seed, positives="synthetic", epochs=50, shards="a" * 64, workers=2):
        config = {"method": "simclr", "positives": positives, "seed": seed, "epochs": epochs, "workers": workers,
                  "out": f"/runs/{positives}-{seed}-{epochs}-{workers}"}
        return {"config": config, "data": {"shards_sha256": shards, "count": 12, "source": {"fingerprint": "f"}}}

    def run(name, seed, **options):
        return _result(tmp_path, name, "digits", seed, 80.0 + seed, positives=options.get("positives", "synthetic"),
                       trained=trained(seed, **options))

    clsp = [run(f"clsp-{s}", s) for s in (0, 1)]
    short = run("clsp-short", 2, epochs=1)
    with pytest.raises(UserError, match=r"clsp-0 and .*clsp-short are both simclr runs on digits .*trained otherwise "
                                        r"\(options.epochs: 50 there, 1 now\).*report them apart"):
        report([*clsp, short], tmp_path / "r")  # pooled as a third seed before
    baseline_short = run("none-short", 0, positives="none", epochs=1)
    with pytest.raises(UserError, match=r"options.epochs: 50 there, 1 now"):
        report([*clsp, baseline_short], tmp_path / "r")  # paired against a shorter baseline before
    other_shards = run("clsp-b", 3, shards="b" * 64)
    with pytest.raises(UserError, match=r"positives.shards_sha256"):
        report([*clsp, other_shards], tmp_path / "r")  # positives of another generator pooled as a seed before
    assert not (tmp_path / "r").exists()
    # trained alike: another folder, loader count or (for the baseline, which uses no positives) other shards
    alike = [*clsp, run("clsp-w", 2, workers=4), run("none-0", 0, positives="none", shards="b" * 64)]
    groups = report(alike, tmp_path / "r")["groups"]
    assert [(g["positives"], g["seeds"]) for g in groups] == [("none", [0]), ("synthetic", [0, 1, 2])]


def test_a_run_without_its_weights_reports_those_evaluated_last_also_in_a_copy(tmp_path, capsys):
    """Without backbone.safetensors a run's current weights are unknown, and its eval/ may hold results of weights it
    had before it was trained again. They were told apart by file time, which a copy writes anew: a git checkout
    (or rsync -r) writes results-2.json before results.json, and the report then showed the earlier weights' score.
    The highest number holds the weights evaluated last (new weights never replace a file), in any copy."""
    from clsp.eval.report import report

    run = _result(tmp_path, "run", "digits", 0, 60.0)
    first = json.loads((run / "eval" / "results.json").read_text())
    (run / "eval" / "results.json").write_text(json.dumps({**first, "weights_sha256": "1" * 64}))
    later = {**first, "weights_sha256": "2" * 64, "linear_top1": 80.0, "knn_best": 80.0, "knn_k20": 80.0}
    (run / "eval" / "results-2.json").write_text(json.dumps(later))
    now = (run / "eval" / "results-2.json").stat().st_mtime_ns
    os.utime(run / "eval" / "results.json", ns=(now + 10**9, now + 10**9))  # as a copy in name order leaves them
    [group] = report([run], tmp_path / "report")["groups"]
    assert group["linear_top1"][0] == 80.0 and group["knn_best"][0] == 80.0
    assert "results of 2 weights: using those of results-2.json (weights 222222222222)" in capsys.readouterr().err


def test_which_of_several_results_of_the_same_weights_is_used_is_said(tmp_path, capsys):
    """Results of one weights from other inputs (here two probe settings), each labelled with them: the last written
    is used, by file time, which a copy does not keep, so the choice is named with the way to make another."""
    from clsp.eval.results import current_result

    run = _result(tmp_path, "run", "digits", 0, 70.0, probe_epochs=30)
    _result(tmp_path, "run", "digits", 0, 75.0, probe_epochs=100, file="results-2.json")
    result, _ = current_result(run, "results.json", None)
    assert result["results_file"] == "results-2.json" and result["eval_config"]["probe"]["epochs"] == 100
    note = capsys.readouterr().err
    assert "holds 2 results of these weights from other inputs (results.json, results-2.json): using " \
           "results-2.json, the last written" in note and "move the others out of eval/" in note


def test_the_result_written_last_is_used_also_in_a_copy_that_rewrote_the_file_times(tmp_path, capsys):
    """A, B, A again (one weights, two probe settings): A's file was written last, and file times said so only on
    the machine that wrote them; a copy writes them anew, in its own order. The order is recorded in each result
    (`written`), and a rerun of the result written last keeps its bytes."""
    from clsp.eval import write_result
    from clsp.eval.results import current_result

    run = _result(tmp_path, "run", "digits", 0, 0.0, file="unused.json")
    settings = lambda epochs: {"weights_sha256": "a" * 64, "eval_config": {"probe": {"epochs": epochs}}}  # noqa: E731
    target = run / "eval" / "results.json"
    assert write_result(target, {**settings(30), "linear_top1": 70.0}, {"linear_top1"}) == target
    assert write_result(target, {**settings(100), "linear_top1": 75.0}, {"linear_top1"}).name == "results-2.json"
    assert write_result(target, {**settings(30), "linear_top1": 70.0}, {"linear_top1"}) == target  # A again
    later = (run / "eval" / "results-2.json").stat().st_mtime_ns + 10**9
    os.utime(run / "eval" / "results-2.json", ns=(later, later))  # as a copy in another order leaves them
    result, _ = current_result(run, "results.json", None)
    assert result["results_file"] == "results.json" and result["eval_config"]["probe"]["epochs"] == 30
    assert "using results.json, the last written (as its `written` records)" in capsys.readouterr().err
    before = target.read_bytes()
    write_result(target, {**settings(30), "linear_top1": 70.0}, {"linear_top1"})  # A once more: already the last
    assert target.read_bytes() == before
    tied = json.loads((run / "eval" / "results-2.json").read_text())  # two writers at once read the same last
    (run / "eval" / "results-2.json").write_text(json.dumps({**tied, "written": 3}))
    write_result(target, {**settings(30), "linear_top1": 70.0}, {"linear_top1"})  # a rerun breaks the tie
    assert json.loads(target.read_text())["written"] == 4


def test_without_its_backbone_a_run_uses_the_weights_evaluated_last_also_when_they_came_back(tmp_path, capsys):
    """W1, W2, then W1 again (retrained to the same bytes): W1's result is rewritten in place under the lower file
    number, so the highest number is not the weights evaluated last; `written` is."""
    from clsp.eval import write_result
    from clsp.eval.results import current_result

    run = _result(tmp_path, "run", "digits", 0, 0.0, file="unused.json")
    target = run / "eval" / "results.json"
    for weights, score in (("1", 90.0), ("2", 50.0), ("1", 91.0)):
        write_result(target, {"weights_sha256": weights * 64, "source": "digits", "knn_best": score}, {"knn_best"})
    assert not (run / "backbone.safetensors").exists() and (run / "eval" / "results-2.json").is_file()
    result, _ = current_result(run, "results.json", None)
    assert result["results_file"] == "results.json" and result["knn_best"] == 91.0
    assert "using those of results.json (weights 111111111111), the last evaluated" in capsys.readouterr().err


def test_a_retrained_run_never_shows_the_scores_or_pictures_of_its_earlier_weights(trained, tmp_path):
    from clsp.eval.plots import plot_run
    from clsp.hashing import weights_sha256
    from clsp.train.checkpoint import load_backbone
    from clsp.train.loop import make_config, train

    _, shards, _, run = trained
    run = _copy_run(run, tmp_path / "run")
    for part in (["knn"], ["linear", "--probe-epochs", "2"]):
        assert _cli("eval", *part, run).exit_code == 0
    train(make_config(None, shards=str(shards), out=str(run), method="simclr", positives="none", seed=1,
                      overwrite=True, **dict(TINY_TRAIN)))  # as `clsp train run --overwrite`: eval/ is not its own
    assert {"knn.json", "linear.json", "test_features.npy"} <= {p.name for p in (run / "eval").iterdir()}
    refused = _cli("eval", "report", run, "--out", tmp_path / "report")
    assert refused.exit_code == 2 and "error:" in refused.output and "Traceback" not in refused.output
    assert "not computed from" in refused.output and f"clsp eval all {run}" in refused.output
    assert not (tmp_path / "report").exists()
    assert [p.name for p in plot_run(run, tmp_path / "pictures")] == ["run-training.png"]  # no t-SNE of old weights

    for part in (["knn"], ["linear", "--probe-epochs", "2"]):
        assert _cli("eval", *part, run).exit_code == 0
    again = _cli("eval", "report", run, "--out", tmp_path / "report")
    assert again.exit_code == 0, again.output
    [row] = list(csv.DictReader(open(tmp_path / "report" / "results.csv")))
    assert row["seed"] == "1" and row["weights_sha256"] == weights_sha256(load_backbone(run)[0])
    assert (tmp_path / "report" / "pictures" / "run-tsne.png").is_file()


def test_a_rerun_with_another_device_batch_or_spelling_of_the_source_replaces_its_result(trained, tmp_path):
    _, _, source, run = trained
    run = _copy_run(run, tmp_path / "run")
    assert _cli("eval", "knn", run).exit_code == 0
    same = _cli("eval", "knn", run, "--source", source, "--forward-batch", "5", "--device", "cpu")
    assert same.exit_code == 0, same.output
    assert sorted(p.name for p in (run / "eval").glob("knn*.json")) == ["knn.json"]
    result = json.loads((run / "eval" / "knn.json").read_text())
    assert result["eval_config"]["source"] == source and result["computed_with"] == {"device": "cpu",
                                                                                   "forward_batch": 5}


def test_the_tsne_legend_names_the_classes_of_the_evaluation_it_shows(trained, tmp_path, monkeypatch):
    from clsp.eval import plots

    _, _, _, run = trained
    run = _copy_run(run, tmp_path / "run")
    train_file, held_out = tmp_path / "data" / "train-00000-of-00001.parquet", tmp_path / "held-out.parquet"
    _parquet(train_file, 12, seed=3)  # no class names in its schema
    _parquet(held_out, 6, seed=4)
    shown, real = [], plots.plot_tsne

    def recording(features, labels, out_png, title="", **options):  # the points and legend names of each t-SNE
        shown.append((len(labels), options["class_names"]))
        return real(features, labels, out_png, title, **options)

    monkeypatch.setattr(plots, "plot_tsne", recording)
    for source in ([], ["--source", f"parquet:{train_file}", "--test-source", f"parquet:{held_out}", "--transfer"], []):
        assert _cli("eval", "knn", run, *source).exit_code == 0  # folder:DIR (classes c0..c2), Parquet, folder again
        plots.plot_run(run, tmp_path / "pictures")
    assert shown == [(12, ["c0", "c1", "c2"]), (6, None), (12, ["c0", "c1", "c2"])]  # numbers where it has no names
    assert sorted(p.name for p in (run / "eval").glob("knn*.json")) == ["knn-2.json", "knn.json"]  # A, B, A again
    assert sorted(p.name for p in (run / "eval").glob("test_*.npy")) == [  # A's pair serves A again: no third copy
        "test_features-2.npy", "test_features.npy", "test_labels-2.npy", "test_labels.npy"]


def test_a_run_on_shards_of_the_all_split_is_told_a_fix_that_works(trained, tmp_path):
    _, _, source, run = trained
    run = _copy_run(run, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["data"]["source"].update(split="all", fingerprint=open_source(source, "all", 8).fingerprint())
    (run / "config.json").write_text(json.dumps(config))  # as shards made with `clsp synth run --split all`
    refused = _cli("eval", "knn", run)
    assert refused.exit_code == 2 and "made from the all split" in refused.output
    assert "--transfer" in refused.output and f"--source {source}" not in refused.output
    assert _cli("eval", "knn", run, "--transfer").exit_code == 0  # the fix it names works


def test_a_test_folder_without_one_of_the_bank_classes_is_named_in_the_error(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"n{i:02d}" for i in range(8)]
    for split, present in (("train", names), ("val", [n for n in names if n != "n06"])):  # val lacks n06
        for name in present:
            (tmp_path / split / name).mkdir(parents=True)
            (tmp_path / split / name / "0.png").write_bytes(png_bytes(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)))
    from clsp.eval.evaluate import _check_classes

    with pytest.raises(UserError) as refused:
        _check_classes(open_source(f"folder:{tmp_path / 'train'}", "train", 8),
                       open_source(f"folder:{tmp_path / 'val'}", "test", 8))
    assert "n06" in str(refused.value)  # the class that differs, not two identical first-five lists
    assert f"folder:{tmp_path}" in str(refused.value)  # the fix: the folder that holds both splits
