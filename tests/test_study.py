"""The study: k-fold scores over every labelled image, paired differences with 95 % intervals, the verdict that reads
them, and a tiny end-to-end study that trains, scores, reports and resumes."""

import json
import math
import os
import re
import signal
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pytest
from torch.optim.optimizer import register_optimizer_step_post_hook

from clsp.eval.kfold import assign_folds, kfold_accuracy
from clsp.file_io import read_json
from clsp.eval.linear import ProbeConfig
from clsp.eval.paired import interval_verdict, paired_bootstrap, paired_interval
from clsp.run_dir import lock_folder
from conftest import as_a_terminals_job, lock_held
from test_eval import FAST_PROBE, TINY_TRAIN, tiny_world  # noqa: F401  (tiny_world: shards made from an image folder)


@contextmanager
def sigterm_after_step(step: int):
    """SIGTERM to this process right after the `step`-th optimiser step from now (any run's); yields the step count."""
    steps = [0]

    def hook(optimizer, args, kwargs) -> None:
        steps[0] += 1
        if steps[0] == step:
            os.kill(os.getpid(), signal.SIGTERM)

    handle = register_optimizer_step_post_hook(hook)
    try:
        yield steps
    finally:
        handle.remove()


def test_folds_are_balanced_stable_and_independent_of_order():
    ids = [f"digits-{i:04d}" for i in range(103)]
    folds = assign_folds(ids, 5)
    assert sorted(np.bincount(folds).tolist()) == [20, 20, 21, 21, 21]  # sizes differ by at most one
    assert np.array_equal(assign_folds(ids, 5), folds)  # the same in every call
    order = np.random.default_rng(0).permutation(len(ids))
    shuffled = assign_folds([ids[i] for i in order], 5)
    assert np.array_equal(shuffled, folds[order])  # an id keeps its fold whatever order the ids come in
    assert not np.array_equal(folds, np.arange(len(ids)) % 5)  # keyed on the id, not on the position
    with pytest.raises(ValueError, match="unique"):
        assign_folds(["a", "b", "a"], 2)


def test_kfold_accuracy_scores_every_image_and_ignores_input_order():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 30)  # (120,)
    features = (rng.normal(size=(4, 16)) * 3.0)[labels] + 0.5 * rng.normal(size=(120, 16))  # separable clusters
    ids = [f"img-{i}" for i in range(120)]
    scores = kfold_accuracy(features, labels, ids, folds=5, probe=FAST_PROBE)
    assert scores["knn_best"] > 97.0 and scores["linear_top1"] > 97.0
    assert scores["fold_sizes"] == [24] * 5 and scores["correct"]["linear_top1"].shape == (120,)
    assert set(scores["knn"]) == {5, 10, 20, 50, 96}  # k capped at the smallest bank (96 images), the same every fold
    order = rng.permutation(120)
    again = kfold_accuracy(features[order], labels[order], [ids[i] for i in order], folds=5, probe=FAST_PROBE)
    assert again["knn"] == scores["knn"]  # the same folds: the same banks, the same predictions
    assert np.array_equal(again["correct"]["knn_best"], scores["correct"]["knn_best"][order])
    for ks in ((5, 10), (5, 50)):  # knn_k20 would be k = 10's score, or a KeyError
        with pytest.raises(ValueError, match="must include 20"):
            kfold_accuracy(features, labels, ids, folds=5, probe=FAST_PROBE, ks=ks)
    few = kfold_accuracy(features[:15], labels[:15] % 2, ids[:15], folds=5, probe=FAST_PROBE)  # banks of <= 12
    assert max(few["knn"]) < 20 and few["knn_k20"] is None  # not the score of the largest k there is
    assert "knn_k20" not in few["correct"]  # nor its images' correctness, for the paired bootstrap


def test_paired_interval_matches_a_hand_computed_student_t():
    mean, low, high = paired_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, n 3: t(0.975, 2) = 4.302653
    assert mean == pytest.approx(2.0)
    assert (low, high) == pytest.approx((2.0 - 4.302653 / math.sqrt(3), 2.0 + 4.302653 / math.sqrt(3)), abs=1e-5)
    assert paired_interval([0.5, 0.5, 0.5, 0.5])[1:] == pytest.approx((0.5, 0.5))  # no spread: no width
    one = paired_interval([4.0])
    assert one[0] == 4.0 and math.isnan(one[1]) and math.isnan(one[2])


def test_paired_bootstrap_is_seeded_and_covers_the_mean():
    diffs = np.zeros((3, 50))
    diffs[:, :5] = 100.0  # every seed: 5 of 50 images better by one image (100 points per image) = +10 points
    low, high = paired_bootstrap(diffs)
    assert low < 10.0 < high and (low, high) == paired_bootstrap(diffs)
    assert paired_bootstrap(np.full((4, 20), -100.0)) == pytest.approx((-100.0, -100.0))
    # drawn in chunks of resamples (memory: CIFAR's 60,000 images), the interval is the one of all the draws at once
    rng, scores = np.random.default_rng(0), np.random.default_rng(1).choice([-100.0, 0.0, 100.0], size=(3, 50))
    seed_counts = rng.multinomial(3, np.full(3, 1 / 3), size=150)  # 150: not a whole number of chunks
    means = ((seed_counts @ scores) * rng.multinomial(50, np.full(50, 1 / 50), size=150)).sum(axis=1) / 150
    assert paired_bootstrap(scores, resamples=150) == tuple(np.quantile(means, [(1 - 0.95) / 2, (1 + 0.95) / 2]))


def test_verdict_reads_the_interval():
    assert interval_verdict(0.2, 1.4) == "better (interval [+0.20, +1.40])"
    assert interval_verdict(-2.0, -0.1) == "worse (interval [-2.00, -0.10])"
    assert interval_verdict(-0.5, 1.5) == "within noise (interval [-0.50, +1.50])"
    assert interval_verdict(0.0, 1.0).startswith("within noise")  # touching 0 is not above it
    assert interval_verdict(math.nan, math.nan).startswith("no verdict")


# --- a tiny study end to end (tiny_world: 12 anchors in shards, 36 labelled 8 px images in train/ + test/) --------

def test_tiny_study_trains_scores_all_images_reports_paired_differences_and_resumes(tiny_world, capsys):
    from clsp.study import StudyConfig, study
    from clsp.eval.evaluate import EvalConfig

    root, shards, source = tiny_world
    config = StudyConfig(str(shards), source, str(root / "study"), methods=("simclr",), positives=("none", "synthetic"),
                         seeds=(0, 1), folds=3, train_preset=None, train_options=TINY_TRAIN,
                         eval=EvalConfig(probe=ProbeConfig(epochs=3, milestones=(2,))))
    summary = study(config)
    runs = root / "study" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == [
        "simclr-none-seed0", "simclr-none-seed1", "simclr-synthetic-seed0", "simclr-synthetic-seed1"]
    scored = json.loads((runs / "simclr-none-seed0" / "eval" / "kfold.json").read_text())
    assert len(scored["ids"]) == 36 and len(scored["correct"]["linear_top1"]) == 36  # train 24 + test 12: all scored
    assert scored["scoring"]["folds"] == 3 and scored["fold_sizes"] == [12, 12, 12]

    [comparison] = summary["comparisons"]  # synthetic vs none: the only pair present
    linear = comparison["linear_top1"]
    rows = {(g["positives"], s): r for g in summary["groups"] for s, r in g["by_seed"].items()}
    assert linear["diffs"] == pytest.approx([rows["synthetic", s]["linear_top1"] - rows["none", s]["linear_top1"]
                                             for s in (0, 1)])  # paired seed by seed
    assert math.isfinite(linear["bootstrap"][0])  # per-image scores were there: bootstrap over images x seeds
    assert summary["verdicts"][0].startswith("- **simclr** (lam 1.0), CLSP vs its baseline (none), 2 paired seeds: "
                                             "linear ")
    text = (root / "study" / "report.md").read_text()
    assert "3-fold evaluation over all 36 labelled images" in text
    assert "| synthetic − none | linear_top1 | 0, 1 |" in text
    assert len((root / "study" / "results.csv").read_text().splitlines()) == 5  # header + one row per run
    assert (root / "study" / "summary.png").stat().st_size > 1000
    from clsp.errors import UserError
    from clsp.eval.results import load_results  # `clsp eval report` of the study's runs: pointed to the study's report

    with pytest.raises(UserError, match=r"holds k-fold scores of `clsp eval study` \(eval/kfold.json\), which a report "
                                        r"of test-split scores does not mix in: read the study's own report"):
        load_results(runs / "simclr-none-seed0")

    capsys.readouterr()
    again = study(config)  # everything exists: nothing is trained or scored again
    assert capsys.readouterr().out.count("trained and scored already, skipped") == 4
    assert again["verdicts"] == summary["verdicts"]
    written = lambda: {p.name: p.read_bytes() for p in (root / "study").glob("[!.]*") if p.is_file()}  # noqa: E731
    files = written()  # the report's files (the lock file records its time)
    reordered = study(replace(config, positives=("synthetic", "none"), seeds=(1, 0)))  # the same runs, listed otherwise
    assert written() == files
    assert reordered["report"] == summary["report"]  # no report-2.md beside it
    capsys.readouterr()

    run = runs / "simclr-synthetic-seed1"
    scores, weights = (run / "eval" / "kfold.json").read_bytes(), (run / "backbone.safetensors").read_bytes()
    (run / "eval" / "kfold.json").unlink()  # as if the study stopped between training and scoring this run
    study(config)
    shown = capsys.readouterr()  # trained already: scored, and not said to have "nothing to do" as it is scored
    assert shown.out.count("skipped") == 3 and "simclr-synthetic-seed1: kNN best" in shown.out
    assert "nothing to do" not in shown.out + shown.err
    assert (run / "backbone.safetensors").read_bytes() == weights  # not retrained
    assert (run / "eval" / "kfold.json").read_bytes() == scores  # scored again, to the same bytes

    longer = replace(config, train_options=(*TINY_TRAIN, ("epochs", 2)))  # the same --out, other training options
    with pytest.raises(UserError, match=r"simclr-none-seed0 was trained otherwise .*config.epochs: 1 there, 2 now"
                                        r".*another --out"):
        study(longer)  # refused before anything trains: the old runs are not runs of these options
    assert (run / "backbone.safetensors").read_bytes() == weights
    assert (run / "eval" / "kfold.json").read_bytes() == scores


def test_study_command_passes_options_and_refuses_bad_ones_before_training(tiny_world):
    from typer.testing import CliRunner

    from clsp.cli import app

    root, shards, source = tiny_world
    spelt = lambda value: "False" if value is False else json.dumps(value)  # noqa: E731  (before: 'False', true)
    options = [arg for key, value in TINY_TRAIN for arg in ("--train-option", f"{key}={spelt(value)}")]
    result = CliRunner().invoke(app, ["eval", "study", str(shards), "--source", source, "--out", str(root / "cli"),
                                      "--positives", "none", "--seeds", "0", "--folds", "2", "--preset", "paper",
                                      "--probe-epochs", "2", *options])
    assert result.exit_code == 0, result.output
    config = json.loads((root / "cli" / "runs" / "simclr-none-seed0" / "config.json").read_text())
    assert config["config"]["width"] == 2 and config["config"]["epochs"] == 1 and config["config"]["bf16"] is False
    assert "nothing to compare" in result.output and (root / "cli" / "report.md").is_file()

    for bad, words in ((["--train-option", "epochs"], "must look like KEY=VALUE"),
                       (["--train-option", "epoks=3"], "--train-option takes `clsp train run` options"),
                       (["--train-option", "seed=3"], "--train-option seed: the study sets these itself"),
                       (["--train-option", "epochs=2.5"], "--epochs must be a whole number, got 2.5"),
                       (["--train-option", "cache=maybe"], "--cache must be true/false or unset, got 'maybe'"),
                       (["--methods", "simclr,nope"], "unknown method 'nope'"),
                       (["--seeds", "0,x"], "must be comma-separated integers"),
                       (["--seeds", "0,0"], "give each once"),
                       (["--folds", "1"], "--folds must be >= 2"),
                       (["--folds", "100"], "got 100 folds of 36 images")):
        refused = CliRunner().invoke(app, ["eval", "study", str(shards), "--out", str(root / "x"), *bad])
        assert refused.exit_code == 2 and words in refused.output, (bad, refused.output)
        assert not (root / "x").exists()  # refused before anything was written


def test_folders_a_study_cannot_use_are_refused_before_any_run_trains(tiny_world, tmp_path):
    """A folder under runs/ that train did not make was refused only when the study reached it, after the runs before
    it had trained; --out the shard folder or a training run put the study's files among theirs; a shard the
    manifest lists but the folder lacks was reported as corrupt, with an option the study does not have, once --out
    was claimed."""
    import shutil

    from typer.testing import CliRunner

    from clsp.cli import app
    from clsp.train.loop import make_config, train

    root, shards, source = tiny_world
    options = [arg for key, value in TINY_TRAIN for arg in ("--train-option", f"{key}={json.dumps(value)}")]

    def refused(out, words, shard_dir=shards):
        result = CliRunner().invoke(app, ["eval", "study", str(shard_dir), "--source", source, "--out", str(out),
                                          "--positives", "none,synthetic", "--seeds", "0", "--folds", "2",
                                          "--preset", "paper", *options])
        assert result.exit_code == 2 and words in " ".join(result.output.split()), result.output
        return result.output

    stranger = tmp_path / "study" / "runs" / "simclr-synthetic-seed0"  # the second run of two
    stranger.mkdir(parents=True)
    (stranger / "notes.txt").write_text("mine")
    refused(tmp_path / "study", f"--out {stranger} is not empty and was not made by `clsp train run`")
    assert sorted(p.name for p in (tmp_path / "study" / "runs").iterdir()) == [stranger.name]  # nothing trained
    assert (stranger / "notes.txt").read_text() == "mine"

    before = sorted(p.name for p in shards.iterdir())
    refused(shards, f"--out {shards} holds shards (manifest.json), and this command writes its results into a folder")
    assert sorted(p.name for p in shards.iterdir()) == before
    run = tmp_path / "a-run"
    train(make_config(None, shards=str(shards), out=str(run), method="simclr", positives="none", **dict(TINY_TRAIN)))
    refused(run, f"--out {run} holds a clsp train run (config.json)")
    assert not (run / "runs").exists()

    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    (copy / "shard-000001.tar").unlink()
    output = refused(tmp_path / "new", f"{copy} lists 1 shard(s) that are not there (shard-000001.tar): copy them",
                     shard_dir=copy)
    assert "corrupt" not in output and "--skip-corrupt" not in output and not (tmp_path / "new").exists()
    alone = CliRunner().invoke(app, ["train", "run", str(copy), "--out", str(tmp_path / "new")])  # train itself too
    assert alone.exit_code == 2 and "lists 1 shard(s) that are not there" in alone.output, alone.output
    assert not (tmp_path / "new").exists()


def test_a_stop_while_the_study_scores_is_one_error_line(tiny_world, tmp_path, monkeypatch):
    """SIGTERM while the study scored a run killed it with status 143 and no word (Ctrl-C: a traceback); the rerun
    scores that run again."""
    import clsp.eval.kfold
    from clsp.errors import UserError
    from clsp.study import StudyConfig, study

    root, shards, source = tiny_world
    config = StudyConfig(str(shards), source, str(tmp_path / "study"), positives=("none",), seeds=(0,), folds=2,
                         train_preset=None, train_options=TINY_TRAIN)
    scoring = clsp.eval.kfold.evaluate_run_kfold

    def stopped_while_scoring(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return scoring(*args, **kwargs)

    monkeypatch.setattr(clsp.eval.kfold, "evaluate_run_kfold", stopped_while_scoring)
    with pytest.raises(UserError, match=r"^the study was stopped by SIGTERM: run the same `clsp eval study` command "
                                        r"again to go on$"):
        study(config)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the study's handler is gone with it
    monkeypatch.setattr(clsp.eval.kfold, "evaluate_run_kfold", scoring)
    assert study(config)["report"].endswith("report.md")  # trained already: scored now


def test_a_streamed_run_with_other_loader_processes_is_refused_before_training(tiny_world):
    """A streamed run's order depends on its loader processes (train refuses to resume it with another count): the
    study refuses such a run folder before anything trains, not when it reaches that run."""
    from clsp.errors import UserError
    from clsp.shards.manifest import read_manifest
    from clsp.study import StudyConfig, check_trained_as_planned, plan
    from clsp.train.loop import train

    root, shards, source = tiny_world
    streamed = (*TINY_TRAIN, ("cache", False))  # workers 0: read in the training process, as one loader would
    config = StudyConfig(str(shards), source, str(root / "streamed"), positives=("none",), seeds=(0,), folds=2,
                         train_preset=None, train_options=streamed)
    (run,) = plan(config)
    train(run)
    check_trained_as_planned(plan(config), read_manifest(shards))  # the same plan: accepted
    two = replace(config, train_options=(*streamed, ("workers", 2)))
    with pytest.raises(UserError, match=r"simclr-none-seed0 was trained otherwise .*data.stream_workers: 1 there, "
                                        r"2 now"):
        check_trained_as_planned(plan(two), read_manifest(shards))
    cached = replace(config, train_options=(*TINY_TRAIN, ("workers", 2)))  # from memory: no loader processes
    with pytest.raises(UserError, match=r"config.cache: False there, True now"):
        check_trained_as_planned(plan(cached), read_manifest(shards))
    record_file = os.path.join(run.out, "config.json")
    record = read_json(record_file)
    del record["augment_draws"]  # as clsp <= 0.3.0 wrote it: views augmented by kornia's modules
    with open(record_file, "w") as f:
        json.dump(record, f)
    with pytest.raises(UserError, match=r"simclr-none-seed0 was trained otherwise .*augment_draws: None there, 2 now\)"
                                        r".*augmented by kornia's modules as clsp <= 0.3.0 did, .*, "
                                        r"or pass another --out"):
        check_trained_as_planned(plan(config), read_manifest(shards))
    with open(record_file, "w") as f:  # views of another recipe (BYOL's and NNCLR's were SimCLR's once)
        json.dump({**record, "augment_draws": 2, "augment": "moco"}, f)
    with pytest.raises(UserError, match=r"simclr-none-seed0 was trained otherwise .*\(augment: 'moco' there, 'simclr' "
                                        r"now\)"):
        check_trained_as_planned(plan(config), read_manifest(shards))


def test_parallel_jobs_train_the_same_runs_as_training_them_one_by_one(tiny_world, capsys):
    import os

    import torch
    from safetensors.torch import load_file

    from clsp.study import StudyConfig, plan, study
    from clsp.eval.evaluate import EvalConfig
    from clsp.train.loop import train

    root, shards, source = tiny_world
    config = StudyConfig(str(shards), source, str(root / "parallel"), methods=("simclr",),
                         positives=("none", "synthetic"), seeds=(3,), folds=2, train_preset=None,
                         train_options=TINY_TRAIN, eval=EvalConfig(probe=ProbeConfig(epochs=2, milestones=(1,))),
                         jobs=2)
    study(config)
    out = capsys.readouterr().out
    assert "2 at a time" in out and out.count(": trained (") == 2
    logs = sorted(p.name for p in (root / "parallel" / "train-logs").iterdir())
    assert logs == ["simclr-none-seed3.log", "simclr-synthetic-seed3.log"]

    each = max(1, (os.cpu_count() or 1) // 2)  # the thread count each pool process ran on, as the study records it
    assert json.loads((root / "parallel" / "train-threads.json").read_text()) == {
        "simclr-none-seed3": each, "simclr-synthetic-seed3": each}
    threads = torch.get_num_threads()
    torch.set_num_threads(each)
    try:
        for run in plan(StudyConfig(**{**config.__dict__, "out": str(root / "serial"), "jobs": 1})):
            train(run)
    finally:
        torch.set_num_threads(threads)
    for name in ("simclr-none-seed3", "simclr-synthetic-seed3"):
        parallel = load_file(str(root / "parallel" / "runs" / name / "backbone.safetensors"))
        serial = load_file(str(root / "serial" / "runs" / name / "backbone.safetensors"))
        assert parallel.keys() == serial.keys()
        assert all(torch.equal(parallel[key], serial[key]) for key in parallel), name


def _wait_for(condition, what: str, limit_s: float = 120.0) -> None:
    """Poll until `condition()` holds; a guard against hanging (not a speed limit): fails after limit_s."""
    import time

    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"still waiting after {limit_s:.0f} s for {what}"
        time.sleep(0.2)


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGKILL", "Ctrl-C"])
def test_stopping_a_parallel_study_stops_its_training_processes(tiny_world, tmp_path, stop):
    """SIGTERM (a scheduler's stop) or Ctrl-C (SIGINT to the whole process group) ends the study and the runs it is
    training, and no run the pool had handed over in advance starts; kill -9 of the study ends them too (they watch
    their parent). Either way no orphan goes on training and holding its run folder's lock, which made a rerun answer
    "in use by another run"."""
    import os
    import signal
    import subprocess
    import sys

    root, shards, source = tiny_world
    long = {**dict(TINY_TRAIN), "epochs": 100000}  # trains until stopped
    options = [arg for key, value in long.items() for arg in ("--train-option", f"{key}={json.dumps(value)}")]
    out = tmp_path / "study"
    study = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "clsp", "eval", "study", str(shards),
                              "--source", source,
                              "--out", str(out), "--positives", "none,synthetic", "--seeds", "0,1", "--folds", "2",
                              "--preset", "paper", "--jobs", "2", *options],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=as_a_terminals_job)
    first = [out / "runs" / name for name in ("simclr-none-seed0", "simclr-none-seed1")]  # the first two of four
    try:
        training = lambda run: lock_held(run) and (run / "checkpoint" / "position.json").is_file()  # noqa: E731
        _wait_for(lambda: all(training(run) for run in first) or study.poll() is not None, "both runs to train")
        assert study.poll() is None, study.communicate()
        if stop == "Ctrl-C":
            os.killpg(study.pid, signal.SIGINT)  # what the terminal sends: the study and its pool processes alike
        else:
            study.send_signal(getattr(signal, stop))
        try:
            _, stderr = study.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # a hang: every thread's stack (faulthandler on SIGABRT), then fail
            os.killpg(study.pid, signal.SIGABRT)
            _, stderr = study.communicate(timeout=60)
            logs = "".join(f"\n--- {log.name}\n{log.read_text()[-4000:]}" for log in (out / "train-logs").glob("*"))
            pytest.fail(f"the study did not end within 120 s of {stop}:\n{stderr[-8000:]}{logs}")
    finally:
        if study.poll() is None:
            study.kill()
    assert study.returncode != 0
    if stop != "SIGKILL":  # as with --jobs 1: one error line, exit status 2 (Ctrl-C ended it silently with 130)
        assert study.returncode == 2 and "Traceback" not in stderr, stderr
        assert f"error: the study was stopped by {stop}, and the runs it was training with it (each goes on from its " \
               "last checkpoint): run the same `clsp eval study` command again" in stderr, stderr
    _wait_for(lambda: not any(lock_held(run) for run in first), "the training processes to end")
    assert sorted(p.name for p in (out / "runs").iterdir()) == [run.name for run in first]  # no third run began


@pytest.mark.parametrize("stop", ["SIGTERM", "Ctrl-C"])
def test_a_stop_while_a_parallel_study_waits_for_its_runs_after_one_failed_ends_them_and_names_the_failure(
        tiny_world, tmp_path, stop):
    """One run fails at once (another process holds its folder), the other trains on: the study says so and waits for
    it. A stop
    then was taken inside that wait and never reached the run, whose pool process then waited forever on the queue
    lock of the idle one the stop had killed, and the study on it."""
    import os
    import signal
    import subprocess
    import sys

    root, shards, source = tiny_world
    long = {**dict(TINY_TRAIN), "epochs": 100000}  # trains until stopped
    options = [arg for key, value in long.items() for arg in ("--train-option", f"{key}={json.dumps(value)}")]
    out = tmp_path / "study"
    busy = out / "runs" / "simclr-synthetic-seed0"
    busy.mkdir(parents=True)
    held = lock_folder(busy, "train")  # in use: a failure only the claim finds, when the run's turn comes
    study = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "clsp", "eval", "study", str(shards),
                              "--source", source, "--out", str(out), "--positives", "none,synthetic", "--seeds", "0",
                              "--folds", "2", "--preset", "paper", "--jobs", "2", *options],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=as_a_terminals_job)
    training = out / "runs" / "simclr-none-seed0"
    try:
        _wait_for(lambda: (lock_held(training) and (training / "checkpoint" / "position.json").is_file())
                  or study.poll() is not None, "the other run to train")
        assert study.poll() is None, study.communicate()
        if stop == "Ctrl-C":
            os.killpg(study.pid, signal.SIGINT)
        else:
            study.send_signal(signal.SIGTERM)
        try:
            _, stderr = study.communicate(timeout=120)  # a guard against the hang, not a speed limit
        except subprocess.TimeoutExpired:
            os.killpg(study.pid, signal.SIGABRT)  # every thread's stack, then fail
            _, stderr = study.communicate(timeout=60)
            pytest.fail(f"the study did not end within 120 s of {stop}:\n{stderr[-8000:]}")
    finally:
        if study.poll() is None:
            os.killpg(study.pid, signal.SIGKILL)
        held.close()
    assert study.returncode == 2 and "Traceback" not in stderr, stderr
    assert "study: a run failed (--out " in stderr and "the runs in training finish first" in stderr, stderr
    # the study's own last line; Python's resource tracker, a process of its own, may add its warnings after the study
    # ended (a pool process killed in the Ctrl-C leaves a semaphore of the pool's queues for it to clean up)
    ours = [line for line in stderr.strip().splitlines() if "resource_tracker" not in line]
    assert ours[-1].startswith(f"error: --out {busy} is in use by another run"), stderr
    _wait_for(lambda: not lock_held(training), "the training process to end")


def test_a_second_study_on_the_same_out_is_refused_and_a_sigterm_names_the_study_command(tiny_world, tmp_path):
    """Two studies on one --out would each take runs the other had not begun (both then fail "in use"): the second is
    refused before it trains. A SIGTERM while the study trains a run in its own process says to rerun the study,
    not `--resume`, which `clsp eval study` does not have."""
    from clsp.errors import UserError
    from clsp.study import StudyConfig, study

    root, shards, source = tiny_world
    config = StudyConfig(str(shards), source, str(tmp_path / "study"), positives=("none",), seeds=(0,), folds=2,
                         train_preset=None, train_options=(*TINY_TRAIN[:1], ("epochs", 3), *TINY_TRAIN[2:]))
    (tmp_path / "study").mkdir()
    held = lock_folder(tmp_path / "study", "study")  # another study at work there
    try:
        with pytest.raises(UserError, match="is in use by another run"):
            study(config)
    finally:
        held.close()
    assert not (tmp_path / "study" / "runs").exists()

    with sigterm_after_step(2), pytest.raises(UserError, match=r"stopped by SIGTERM while training simclr-none-seed0, "
                                                               r"whose checkpoint is saved: run the same `clsp eval "
                                                               r"study` command again") as stopped:
        study(config)
    assert "--resume" not in str(stopped.value)
    assert (tmp_path / "study" / "runs" / "simclr-none-seed0" / "checkpoint" / "position.json").is_file()
    study(config)  # the same study again: goes on from the checkpoint and finishes
    assert (tmp_path / "study" / "report.md").is_file()


@pytest.mark.parametrize("after_step", [2, 3], ids=["seen-by-the-last-step", "during-the-last-step"])
def test_a_stop_on_a_runs_last_step_stops_the_study_after_that_run_is_saved(tiny_world, tmp_path, capsys,
                                                                            after_step):
    """SIGTERM that training takes in a run's last step (seen by that step's check, or come after it) finishes the run
    rather than stopping it: the study stops there too, as it does for a stop mid-run, and trains no next run. The
    finished run is scored when the study goes on, without training it again."""
    from clsp.errors import UserError
    from clsp.study import StudyConfig, study

    root, shards, source = tiny_world
    config = StudyConfig(str(shards), source, str(tmp_path / "study"), positives=("none",), seeds=(0, 1), folds=2,
                         train_preset=None, train_options=TINY_TRAIN)  # 12 anchors, batch 4, 1 epoch: 3 steps a run
    with sigterm_after_step(after_step) as steps, pytest.raises(
            UserError, match=r"stopped by SIGTERM while training simclr-none-seed0, whose last step finished it .*run "
                             r"the same `clsp eval study` command again"):
        study(config)
    assert steps[0] == 3  # the first run's steps, and no other run's
    runs = tmp_path / "study" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["simclr-none-seed0"]  # the next run did not begin
    first = runs / "simclr-none-seed0"
    assert (first / "summary.json").is_file() and not (first / "eval" / "kfold.json").exists()
    weights = (first / "backbone.safetensors").read_bytes()

    capsys.readouterr()
    study(config)  # goes on: scores the finished run without training it again, then trains and scores the next
    shown = capsys.readouterr()
    assert "simclr-none-seed0: kNN best" in shown.out and "nothing to do" not in shown.out + shown.err
    assert (first / "backbone.safetensors").read_bytes() == weights
    assert all((runs / name / "eval" / "kfold.json").is_file() for name in ("simclr-none-seed0", "simclr-none-seed1"))


_FAILING_STUDY = '''"""`clsp eval study` whose runs fail at their first step with an error that does not survive
pickling. The study's pool processes (spawn) import this file as their main module, so the fault is in them too."""
import threading

from torch.optim.optimizer import register_optimizer_step_post_hook

from clsp.errors import UserError


class NeedsTwo(Exception):  # pickles as NeedsTwo(message): unpickling it in the study fails (a missing argument)
    def __init__(self, message, detail):
        super().__init__(message)
        self.detail = detail


class HoldsALock(Exception):  # does not pickle at all
    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


class UserErrorNeedsTwo(UserError):  # a user error (one `error:` line, exit 2) that does not unpickle either
    def __init__(self, message, detail):
        super().__init__(message)
        self.detail = detail


def fail(optimizer, args, kwargs):
    raise {raise_it}


register_optimizer_step_post_hook(fail)

if __name__ == "__main__":
    from clsp.cli import app

    app(prog_name="clsp")
'''


@pytest.mark.parametrize("raise_it", ['NeedsTwo("the run broke", 7)', 'HoldsALock("the run broke")',
                                      'UserErrorNeedsTwo("the run broke: fix this", 7)'])
def test_a_parallel_runs_error_that_does_not_pickle_ends_the_study_with_that_error(tiny_world, tmp_path, raise_it):
    """A run's error goes back from the pool process by pickle. One that does not pickle (or unpickle) came back as
    the pickling error, or broke the pool and hung the study: it comes back as RunFailed with its type name, message
    and traceback text (a UserError's as one `error:` line), and the study ends."""
    import os
    import signal
    import subprocess
    import sys

    root, shards, source = tiny_world
    script = tmp_path / "failing_study.py"
    script.write_text(_FAILING_STUDY.replace("{raise_it}", raise_it))
    options = [arg for key, value in TINY_TRAIN for arg in ("--train-option", f"{key}={json.dumps(value)}")]
    study = subprocess.Popen([sys.executable, str(script), "eval", "study", str(shards), "--source", source, "--out",
                              str(tmp_path / "study"), "--positives", "none,synthetic", "--seeds", "0", "--folds", "2",
                              "--preset", "paper", "--jobs", "2", *options],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _, stderr = study.communicate(timeout=120)  # a guard against the hang, not a speed limit
    except subprocess.TimeoutExpired:
        os.killpg(study.pid, signal.SIGKILL)  # the study and its pool processes
        study.communicate()
        pytest.fail(f"the study did not end within 120 s of its runs' error ({raise_it})")
    kind = raise_it.split("(")[0]
    if kind == "UserErrorNeedsTwo":
        assert study.returncode == 2 and "Traceback" not in stderr, stderr
        assert stderr.strip().splitlines()[-1] == "error: the run broke: fix this", stderr
        return
    assert study.returncode == 1, stderr
    last = stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"clsp\.study\.RunFailed: simclr-(none|synthetic)-seed0 failed: \w+\.{kind}: the run broke",
                        last), stderr
    assert f'in fail\n    raise {raise_it}' in stderr  # the traceback text from the pool process, to the fault's line


def test_the_thread_count_recorded_is_the_one_a_streamed_run_trains_on(tiny_world, tmp_path, monkeypatch):
    """A run streaming through loader processes on the CPU leaves them their cores when the thread count is torch's
    default (train.shard_input: threads_beside_workers): the study recorded the default instead, so a resume on
    another count went unnoticed and a resume on the same one was named."""
    import torch

    from clsp import accelerator
    from clsp.study import StudyConfig, study

    root, shards, source = tiny_world
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = torch.get_num_threads()
    default = max(2, accelerator.available_cores())  # what torch chooses where nothing set it (the tests set 1)
    monkeypatch.setattr(accelerator, "_TORCH_DEFAULT_THREADS", default)
    torch.set_num_threads(default)  # as a process the user left alone starts
    seen = []
    monkeypatch.setattr(accelerator, "threads_beside_workers",  # what training sets, seen as it sets it
                        lambda workers, set_them=accelerator.threads_beside_workers: seen.append(set_them(workers)))
    monkeypatch.setattr("clsp.train.shard_input.threads_beside_workers", accelerator.threads_beside_workers)
    options = dict(TINY_TRAIN, workers=1, cache=False)
    config = StudyConfig(str(shards), source, str(tmp_path / "study"), positives=("none",), seeds=(0,), folds=2,
                         train_preset=None, train_options=tuple(options.items()))
    try:
        study(config)
    finally:
        torch.set_num_threads(threads)
    assert len(seen) == 1 and seen[0] == default - 1  # training gave one core to its loader process
    assert json.loads((tmp_path / "study" / "train-threads.json").read_text()) == {"simclr-none-seed0": seen[0]}


def test_a_run_going_on_on_another_thread_count_is_named_and_not_refused(tiny_world, tmp_path, capsys):
    """A CPU run's weights depend on its thread count, which the study sets from --jobs and the cores: one begun on
    one count and resumed on another ends unlike an uninterrupted run on either. The study records the count each run
    began on and says so when a run goes on on another; it does not refuse it. Under --jobs N a single run left to
    train goes to the pool too, on the threads --jobs gives every run, not on the study's own count."""
    import torch

    from clsp.accelerator import available_cores
    from clsp.errors import UserError
    from clsp.study import StudyConfig, study

    root, shards, source = tiny_world
    config = StudyConfig(str(shards), source, str(tmp_path / "study"), positives=("none",), seeds=(0,), folds=2,
                         train_preset=None, train_options=(*TINY_TRAIN[:1], ("epochs", 3), *TINY_TRAIN[2:]))
    with sigterm_after_step(2), pytest.raises(UserError, match="whose checkpoint is saved"):
        study(config)  # --jobs 1: in this process, on its thread count
    record = tmp_path / "study" / "train-threads.json"
    assert json.loads(record.read_text()) == {"simclr-none-seed0": torch.get_num_threads()}

    on_two_jobs = max(1, available_cores() // 2)  # what --jobs 2 gives each run
    began = on_two_jobs + 1  # as if begun where the study gave each run one thread more (other cores, another --jobs)
    record.write_text(json.dumps({"simclr-none-seed0": began}))
    capsys.readouterr()
    study(replace(config, jobs=2))  # goes on from the checkpoint: said, not refused
    out = capsys.readouterr().out
    assert f"training 1 run(s), 2 at a time on {on_two_jobs} thread(s) each" in out  # in the pool, alone
    assert (f"study: simclr-none-seed0 began training on {began} thread(s) and goes on from its checkpoint on "
            f"{on_two_jobs}: a CPU run's weights depend on its thread count, so they will not be byte-identical to an "
            f"uninterrupted run's on either count") in out
    assert json.loads(record.read_text()) == {"simclr-none-seed0": began}  # the count it began on stays recorded
    assert (tmp_path / "study" / "runs" / "simclr-none-seed0" / "eval" / "kfold.json").is_file()
