"""Evaluation: weighted kNN, the linear probe and its frozen-backbone guard, the feature cache, report aggregation."""

import errno
import json
import math
import multiprocessing
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from clsp.eval import latest, write_new, write_new_set
from clsp.eval.features import extract_features
from clsp.eval.knn import knn_accuracy, knn_predict
from clsp.eval.linear import BackboneChangedError, ProbeConfig, linear_probe_accuracy, probe_backbone
from clsp.eval.evaluate import EvalConfig, EvalInputs, score_run
from clsp.eval.paired import paired_differences
from clsp.eval.report import report, verdicts
from clsp.eval.results import METRICS, aggregate, mean_std
from clsp.file_io import write_atomic
from clsp.hashing import weights_sha256
from clsp.train.backbones import build_backbone
from conftest import dead_pid

FAST_PROBE = ProbeConfig(epochs=20, lr=0.5, batch_size=32, milestones=(12, 16))


def clustered(n_per_class: int, classes: int, dim: int, noise: float, seed: int):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 3.0
    labels = np.repeat(np.arange(classes), n_per_class)
    return (centres[labels] + noise * rng.normal(size=(len(labels), dim))).astype(np.float32), labels


def test_knn_high_on_clusters_and_chance_on_random_labels():
    x_train, y_train = clustered(100, 5, 16, 0.5, seed=0)
    x_test, y_test = clustered(40, 5, 16, 0.5, seed=0)  # same centres (same seed), fresh noise draws below
    x_test = x_test + 0.3 * np.random.default_rng(1).normal(size=x_test.shape).astype(np.float32)
    accs = knn_accuracy(x_train, y_train, x_test, y_test)
    assert set(accs) == {5, 10, 20, 50, 100, 200}
    assert min(accs.values()) > 95.0

    rng = np.random.default_rng(2)
    noise_train, noise_test = rng.normal(size=(1000, 16)), rng.normal(size=(1000, 16))
    random_accs = knn_accuracy(noise_train, rng.integers(0, 5, 1000), noise_test, rng.integers(0, 5, 1000))
    assert all(abs(a - 20.0) < 6.0 for a in random_accs.values()), random_accs


def brute_force_knn(train, train_labels, test, k, temperature, classes):
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    preds = []
    for q in test:
        sims = train @ q
        order = np.argsort(-sims, kind="stable")[:k]
        votes = np.zeros(classes)
        for i in order:
            votes[train_labels[i]] += math.exp(sims[i] / temperature)
        preds.append(int(np.argmax(votes)))
    return np.array(preds)


def test_knn_matches_brute_force_and_caps_k_at_train_size():
    rng = np.random.default_rng(3)
    train, labels, test = rng.normal(size=(30, 6)), rng.integers(0, 4, 30), rng.normal(size=(11, 6))
    preds = knn_predict(train, labels, test, ks=(1, 3, 7, 200), temperature=0.5, chunk_size=4)
    assert sorted(preds) == [1, 3, 7, 30]  # 200 capped at the 30 train rows
    for k, pred in preds.items():
        np.testing.assert_array_equal(pred, brute_force_knn(train, labels, test, k, 0.5, 4))


def test_knn_refuses_unlabelled_data():
    with pytest.raises(ValueError, match="unknown labels"):
        knn_predict(np.ones((3, 2)), np.array([0, -1, 1]), np.ones((1, 2)))


def test_linear_probe_learns_separable_data():
    x_train, y_train = clustered(60, 4, 10, 0.3, seed=4)
    x_test, y_test = clustered(20, 4, 10, 0.3, seed=4)
    result = linear_probe_accuracy(x_train, y_train, x_test, y_test, FAST_PROBE)
    assert result["top1"] > 95.0 and result["train_top1"] > 95.0
    shuffled = linear_probe_accuracy(x_train, np.random.default_rng(0).permutation(y_train), x_test, y_test,
                                     FAST_PROBE)
    assert shuffled["top1"] < 60.0  # permuted labels carry no signal: the probe cannot generalise


def test_a_feature_constant_on_the_training_set_does_not_decide_test_predictions():
    """A unit that never fires on the training images but fires weakly on some test images (a dead ReLU channel of
    the bank): training never moves its weight from its random start, so it must not be scaled up on test images."""
    x_train, y_train = clustered(60, 4, 10, 0.3, seed=4)
    x_test, y_test = clustered(20, 4, 10, 0.3, seed=4)
    fires = np.arange(len(y_test)) % 3 == 0  # a third of the test images
    clean = linear_probe_accuracy(x_train, y_train, x_test, y_test, FAST_PROBE)["top1"]
    with_unit = linear_probe_accuracy(np.c_[x_train, np.zeros(len(y_train), np.float32)], y_train,
                                      np.c_[x_test, 0.05 * fires.astype(np.float32)], y_test, FAST_PROBE)["top1"]
    assert clean > 95.0 and with_unit == clean


def test_probe_config_rejects_bad_schedule():
    with pytest.raises(ValueError, match="milestones"):
        ProbeConfig(epochs=10, milestones=(12,))


class StuckInTrainMode(nn.Module):
    """A backbone whose eval() is ignored (e.g. a wrapper that forces train mode): BatchNorm stats keep moving."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.inner = backbone

    def train(self, mode: bool = True):
        return super().train(True)

    def forward(self, x):
        return self.inner(x)


def tiny_images(n: int, seed: int):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = rng.integers(0, 60, size=(n, 8, 8, 3))
    images[labels == 1, 2:6, 2:6, :] += 180  # class 1: a bright square
    return images.astype(np.uint8), labels


def test_probe_backbone_passes_for_frozen_and_raises_when_the_backbone_changes():
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18", width=4, small_stem=True)
    train_images, train_labels = tiny_images(48, 0)
    test_images, test_labels = tiny_images(16, 1)
    norm = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    before = weights_sha256(backbone)
    backbone.train()  # probe_backbone must put it in eval mode itself
    result = probe_backbone(backbone, train_images, train_labels, test_images, test_labels, *norm, FAST_PROBE,
                            batch_size=16)
    assert 0.0 <= result["top1"] <= 100.0
    assert weights_sha256(backbone) == before and not backbone.training
    assert all(p.requires_grad for p in backbone.parameters())  # restored afterwards

    with pytest.raises(BackboneChangedError, match="running_mean"):
        probe_backbone(StuckInTrainMode(backbone), train_images, train_labels, test_images, test_labels, *norm,
                       FAST_PROBE, batch_size=16)


def test_feature_cache_is_keyed_by_weights(tmp_path):
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18", width=2, small_stem=True)
    images, _ = tiny_images(10, 2)
    norm = ((0.5,) * 3, (0.25,) * 3)
    left = [tmp_path / f".abc.{ext}.tmp-{dead_pid()}" for ext in ("npy", "json")]  # what a killed write left
    for temp in left:
        temp.write_bytes(b"\x93NUMPY")
    first = extract_features(backbone, images, *norm, batch_size=4, cache_dir=tmp_path, source_fingerprint="abc")
    assert first.shape == (10, dim) and first.dtype == np.float32
    assert not any(temp.exists() for temp in left)
    np.testing.assert_allclose(first, extract_features(backbone, images, *norm, batch_size=10), rtol=1e-5, atol=1e-6)
    assert np.array_equal(np.load(tmp_path / "abc.npy", allow_pickle=False), first)
    with torch.no_grad():
        backbone.conv1.weight.mul_(2.0)  # new weights: the cache must not be reused
    second = extract_features(backbone, images, *norm, batch_size=4, cache_dir=tmp_path, source_fingerprint="abc")
    assert not np.allclose(first, second)
    assert json.loads((tmp_path / "abc.json").read_text())["weights_sha256"] == weights_sha256(backbone)


def test_a_kill_between_the_feature_cache_files_never_pairs_an_array_with_another_key(tmp_path, monkeypatch):
    """The array was replaced first and its key second: killed in between, the new array sat beside the old key, and
    the old weights (a retrain with the same seed gives them again) read the new weights' features."""
    import clsp.eval.features as features

    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18", width=2, small_stem=True)
    images, _ = tiny_images(10, 2)
    norm = ((0.5,) * 3, (0.25,) * 3)
    first = extract_features(backbone, images, *norm, batch_size=4, cache_dir=tmp_path, source_fingerprint="abc")
    real = features.write_atomic

    def killed_before_the_key(path, data):
        if Path(path).suffix == ".json":
            raise SystemExit("kill -9")
        return real(path, data)

    monkeypatch.setattr(features, "write_atomic", killed_before_the_key)
    with torch.no_grad():
        backbone.conv1.weight.mul_(2.0)
    with pytest.raises(SystemExit):
        extract_features(backbone, images, *norm, batch_size=4, cache_dir=tmp_path, source_fingerprint="abc")
    monkeypatch.undo()
    with torch.no_grad():
        backbone.conv1.weight.div_(2.0)  # the first weights again
    again = extract_features(backbone, images, *norm, batch_size=4, cache_dir=tmp_path, source_fingerprint="abc")
    np.testing.assert_allclose(again, first, rtol=1e-5, atol=1e-6)


def test_the_feature_cache_never_gives_one_weights_the_array_of_others(tmp_path, monkeypatch):
    """Two evaluations of one run folder whose weights differ (retrained in place meanwhile) fill one cache pair:
    E1 array, E2 array, E2 key, E1 key (each write atomic) left E2's array under E1's key."""
    import clsp.eval.features as features

    torch.manual_seed(0)
    b1, _ = build_backbone("resnet18", width=2, small_stem=True)
    torch.manual_seed(1)
    b2, _ = build_backbone("resnet18", width=2, small_stem=True)
    images, _ = tiny_images(10, 2)
    norm = ((0.5,) * 3, (0.25,) * 3)
    order = [("E1", ".npy"), ("E2", ".npy"), ("E2", ".json"), ("E1", ".json")]
    cond, real = threading.Condition(), features.write_atomic

    def in_order(path, data, *args, **kwargs):
        me = (threading.current_thread().name, Path(path).suffix)
        with cond:
            assert cond.wait_for(lambda: order and order[0] == me, timeout=60)
            try:
                return real(path, data, *args, **kwargs)
            finally:
                order.pop(0)
                cond.notify_all()

    got = {}
    monkeypatch.setattr(features, "write_atomic", in_order)
    threads = [threading.Thread(name=name, target=lambda n=name, b=b: got.__setitem__(
            n, features.extract_features(b, images, *norm, batch_size=4, cache_dir=tmp_path, source_fingerprint="fp")))
            for name, b in (("E1", b1), ("E2", b2))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    monkeypatch.undo()
    again = features.extract_features(b1, images, *norm, batch_size=4, cache_dir=tmp_path, source_fingerprint="fp")
    assert not np.allclose(got["E1"], got["E2"])
    np.testing.assert_allclose(again, got["E1"], rtol=1e-5, atol=1e-6)  # E1's weights, E1's features


def test_knn_k20_is_not_another_ks_score_when_the_bank_holds_fewer_than_20_images(tmp_path, capsys):
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18", width=2, small_stem=True)
    backbone.eval()
    (train, train_labels), (test, test_labels) = tiny_images(12, 1), tiny_images(6, 2)
    norm = ((0.5,) * 3, (0.25,) * 3)
    inputs = EvalInputs(tmp_path, backbone, norm, (train, train_labels, "a" * 64), (test, test_labels, "b" * 64),
                        {"weights_sha256": "w"})
    result = score_run(inputs, EvalConfig(linear=False, device="cpu"))
    assert set(result["knn"]) == {"5", "10", "12"}  # k = 20 was never computed...
    assert result["knn_k20"] is None  # ...so it is not reported as k = 20 (it was k = 12's score)
    assert "fewer than k = 20: knn_k20 is left out" in capsys.readouterr().err


def test_a_backbone_with_non_finite_weights_is_refused_not_scored(tmp_path):
    """NaN features would be scored without a word (kNN ranks NaN first: 23 % instead of 77 % with one NaN row), so
    the features are refused, naming the fix, and nothing is cached."""
    from clsp.errors import UserError

    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18", width=2, small_stem=True)
    with torch.no_grad():
        backbone.conv1.weight[0, 0, 0, 0] = float("nan")  # as a diverged run leaves it
    images, _ = tiny_images(6, 2)
    with pytest.raises(UserError, match=r"non-finite features .* for 6 of 6 images.*retrain it"):
        extract_features(backbone, images, (0.5,) * 3, (0.25,) * 3, cache_dir=tmp_path, source_fingerprint="abc")
    assert not list(tmp_path.iterdir())


def test_write_new_never_overwrites_a_different_result(tmp_path, capsys):
    target = tmp_path / "r.json"
    assert write_new(target, "a") == target
    assert write_new(target, "a") == target  # same content: nothing new
    assert write_new(target, "b").name == "r-2.json"
    assert target.read_text() == "a" and latest(target).read_text() == "b"
    assert write_new(target, "a").name == "r-3.json"  # differs from the newest, so a new file
    assert "r-3.json" in capsys.readouterr().err


def test_files_written_as_a_set_share_one_number_also_after_a_kill(tmp_path, capsys):
    """sweep.json/.csv/.md, audit.json/.md...: numbered one by one, a set cut short by a kill put the next result's
    files under two numbers (sweep-3.json beside sweep-2.csv), so `stem-N.*` no longer came from one computation."""
    result, notes = tmp_path / "s.json", tmp_path / "s.md"
    assert write_new_set({result: "A", notes: "a"}) == [result, notes]
    assert write_new_set({result: "A", notes: "a"}) == [result, notes]  # the same: nothing new
    (tmp_path / "s-2.json").write_text("B")  # B was killed after its first file
    assert write_new_set({result: "B", notes: "b"}) == [tmp_path / "s-2.json", tmp_path / "s-2.md"]  # completed
    (tmp_path / "s-3.json").write_text("C")  # C was killed after its first file
    assert write_new_set({result: "D", notes: "d"}) == [tmp_path / "s-4.json", tmp_path / "s-4.md"]
    assert "wrote s-4.json, s-4.md instead" in capsys.readouterr().err
    assert [p.read_text() for p in (result, notes, tmp_path / "s-2.md", tmp_path / "s-3.json")] == ["A", "a", "b", "C"]
    cut, live, other = (tmp_path / f".s-3.md.tmp-{dead_pid()}", tmp_path / f".s-5.md.tmp-{os.getppid()}",
                        tmp_path / f".sweep.md.tmp-{dead_pid()}")
    impossible = tmp_path / f".s.json.tmp-{2 ** 70}"  # a pid no process can have (os.kill: OverflowError)
    for temp in (cut, live, other, impossible):
        temp.write_text("partial")
    write_new_set({result: "E", notes: "e"})  # removes only its own series' temps whose writer is gone
    assert not cut.exists() and live.exists() and other.exists() and not impossible.exists()



def _write_sets(directory, writer, count, barrier):
    """One of several processes that write result sets into `directory` at once (once all have started)."""
    barrier.wait()
    for i in range(count):
        write_new_set({Path(directory) / "s.json": f"{writer}-{i}", Path(directory) / "s.md": f"{writer}-{i} notes"})


def test_concurrent_writers_of_one_result_set_never_replace_each_other(tmp_path):
    """Two evaluations writing into one folder at once both chose the next free number, and the later rename replaced
    the other's result; each file is now created exclusively, so every result survives, each set whole."""
    writers, count = 4, 8
    spawn = multiprocessing.get_context("spawn")
    barrier = spawn.Barrier(writers, timeout=120)
    processes = [spawn.Process(target=_write_sets, args=(tmp_path, w, count, barrier)) for w in range(writers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    results = sorted(p.read_text() for p in tmp_path.glob("s*.json"))
    assert results == sorted(f"{w}-{i}" for w in range(writers) for i in range(count))
    assert all(p.with_suffix(".md").read_text() == p.read_text() + " notes" for p in tmp_path.glob("s*.json"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_an_exclusive_write_without_hard_links_still_never_replaces_a_file(tmp_path, monkeypatch):
    """Some file systems (FUSE mounts of object stores) refuse hard links: the name is then claimed by an exclusive
    create before the rename, so an existing file still stops the write."""
    def no_hard_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(os, "link", no_hard_links)
    target = tmp_path / "r.json"
    assert write_atomic(target, "a", exclusive=True) == target and target.read_text() == "a"
    with pytest.raises(FileExistsError):
        write_atomic(target, "b", exclusive=True)
    assert target.read_text() == "a" and [p.name for p in tmp_path.iterdir()] == ["r.json"]
    assert write_new(target, "b").name == "r-2.json"

def make_run(root, name, method, positives, seed, linear, knn):
    run = root / name
    (run / "eval").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"method": method, "positives": positives, "lam": 1.0, "seed": seed}))
    (run / "eval" / "results.json").write_text(json.dumps(
        {"run": name, "linear_top1": linear, "knn_best": knn, "knn_best_k": 20, "knn_k20": knn}))
    (run / "log.csv").write_text("step,epoch,lr,loss,loss_base,loss_clsp,images_per_s,knn_top1_pct\n"
                                 "1,0,0.1,5.0,4.5,0.5,100,\n2,0,0.1,4.0,3.7,0.3,100,40.0\n")
    return run


def test_report_aggregates_mean_and_std_over_seeds(tmp_path):
    runs = [make_run(tmp_path, f"simclr-synthetic-seed{s}", "simclr", "synthetic", s, lin, lin - 1)
            for s, lin in enumerate((80.0, 82.0, 84.0))]
    runs += [make_run(tmp_path, f"simclr-none-seed{s}", "simclr", "none", s, lin, lin - 1)
             for s, lin in enumerate((70.0, 71.0, 72.0))]
    out = report(runs, tmp_path / "report")
    groups = {g["positives"]: g for g in out["groups"]}
    assert groups["synthetic"]["linear_top1"] == pytest.approx((82.0, 2.0, 3))  # sample std (ddof=1)
    assert groups["none"]["knn_best"] == pytest.approx((70.0, 1.0, 3))
    assert groups["synthetic"]["seeds"] == [0, 1, 2]
    # paired by seed: +10, +11, +12 -> mean 11, sd 1, n 3: 11 ± t(0.975, 2) / sqrt(3) = 11 ± 2.48
    assert out["verdicts"] == ["- **simclr** (lam 1.0), CLSP vs its baseline (none), 3 paired seeds: linear +11.00 "
                               "points, better (interval [+8.52, +13.48]); kNN best +11.00 points, better (interval "
                               "[+8.52, +13.48])."]
    text = (tmp_path / "report" / "report.md").read_text()
    assert ("| synthetic | 1.0 | 3 | 81.00 ± 2.00 | 81.00 ± 2.00 | 82.00 ± 2.00 | +11.00 [+8.52, +13.48] | "
            "+11.00 [+8.52, +13.48] |") in text
    csv_lines = (tmp_path / "report" / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 7 and csv_lines[0].startswith("run,method,positives,lam,seed")
    assert (tmp_path / "report" / "summary.png").stat().st_size > 1000
    assert (tmp_path / "report" / "pictures" / "simclr-none-seed0-training.png").is_file()


def test_a_metric_some_seeds_lack_names_how_many_seeds_its_mean_is_over(tmp_path):
    """A mean over 2 of 3 seeds stood beside "seeds 3" as if over all three."""
    runs = [make_run(tmp_path, f"simclr-none-seed{s}", "simclr", "none", s, lin, 60.0)
            for s, lin in enumerate((70.0, 72.0, None))]  # seed 2 has no linear probe result
    report(runs, tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| none | - | 3 | 60.00 ± 0.00 | 60.00 ± 0.00 | 71.00 ± 1.41 (2 of 3 seeds) | - | - |" in text


def test_verdict_reports_noise_and_single_seeds_honestly():
    from clsp.eval.paired import paired_differences

    assert math.isnan(mean_std([3.0])[1])
    close = aggregate([
        {"method": "moco", "positives": p, "lam": 0.5, "seed": s, "linear_top1": v, "knn_best": v, "knn_k20": v}
        for p, vals in (("synthetic", (50.0, 60.0)), ("augment", (51.0, 59.0))) for s, v in enumerate(vals)])
    [line] = verdicts(paired_differences(close, METRICS))  # no none runs: only the control to compare with
    assert line.startswith("- **moco** (lam 0.5), CLSP vs the augment control, 2 paired seeds: linear +0.00 points, "
                           "within noise (interval [-12.71, +12.71])")  # diffs -1, +1: t(0.975, 1) = 12.71
    single = aggregate([{"method": "moco", "positives": p, "lam": 0.5, "seed": 0, "linear_top1": v, "knn_best": v,
                         "knn_k20": v} for p, v in (("synthetic", 60.0), ("none", 50.0))])
    assert "linear +10.00 points, no verdict (fewer than two paired seeds: no interval)" in verdicts(
        paired_differences(single, METRICS))[0]


def test_the_augment_control_is_compared_only_at_the_same_lam():
    """CLSP at lam 0.2 was compared with an augment control at lam 1.0 (the only one there), as if it controlled."""
    from clsp.eval.paired import paired_differences

    groups = aggregate([{"method": "simclr", "positives": p, "lam": lam, "seed": s, "linear_top1": 50.0 + s,
                         "knn_best": 40.0, "knn_k20": 40.0} for p, lam in (("synthetic", 0.2), ("synthetic", 1.0),
                                                                            ("augment", 1.0), ("none", None))
                        for s in range(2)])
    found = {(c["mode"], c["lam"], c["against"]) for c in paired_differences(groups, METRICS)}
    assert found == {("synthetic", 0.2, "none"), ("synthetic", 1.0, "none"), ("synthetic", 1.0, "augment"),
                     ("augment", 1.0, "none")}


def test_spellings_of_one_source_are_one_group_and_compared():
    rows = [{"source": spec, "test_source": spec, "method": "simclr", "positives": pos, "lam": lam, "seed": s,
             "train_fingerprint": "a" * 64, "test_fingerprint": "b" * 64, "knn_best": v + s, "knn_k20": v + s,
             "linear_top1": v + s}
            for spec, pos, lam, v in (("folder:images", "none", None, 50.0),
                                      ("folder:./images", "synthetic", 1.0, 60.0))
            for s in (0, 1)]
    groups = aggregate(rows)
    assert len({g["source"] for g in groups}) == 1  # the same images: one table, not one per spelling
    assert [(c["mode"], c["against"]) for c in paired_differences(groups, METRICS)] == [("synthetic", "none")]
    other = [{**row, "train_fingerprint": "c" * 64} for row in rows if row["positives"] == "none"]
    assert len({g["source"] for g in aggregate(rows[2:] + other)}) == 2  # other images: never one group


# --- end to end: a tiny trained run, evaluated through the CLI (the study: tests/test_study.py) ------------------

TINY_TRAIN = (("width", 2), ("epochs", 1), ("batch_size", 4), ("workers", 0), ("proj_hidden", 16), ("proj_dim", 8),
              ("warmup_epochs", 0.0), ("bf16", False))


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """Shards (8 px, K=2, 3 classes) and a labelled image-folder source with train/ and test/ splits of 8 px images."""
    from PIL import Image

    from conftest import build_shard_dir

    root = tmp_path_factory.mktemp("world")
    shards = build_shard_dir(root / "shards", counts=(6, 6), k=2, size=8)
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("test", 4)):
        for c in range(3):
            (root / "images" / split / f"c{c}").mkdir(parents=True)
            for i in range(count):
                image = rng.integers(0, 50, (8, 8, 3)).astype(np.uint8)
                image[:, 2 * c : 2 * c + 3] = 230  # a class-specific bright column band
                Image.fromarray(image).save(root / "images" / split / f"c{c}" / f"{i}.png")
    source = f"folder:{root / 'images'}"
    record_source(shards, source)
    return root, shards, source


def record_source(shards, spec: str) -> None:
    """Make the shards' manifest say they were made from `spec`'s train split (runs and eval check that record)."""
    from clsp.sources import open_source
    from clsp.shards.manifest import read_manifest
    from clsp.shards.manifest_writer import write_manifest

    run = read_manifest(shards).run
    made_from = open_source(spec, "train", image_size=int(run["image_size"]))
    write_manifest(shards, {**run, "source": {"spec": spec, "split": "train", "fingerprint": made_from.fingerprint(),
                                              "count": len(made_from)}})


def test_eval_all_command_end_to_end_and_idempotent(tiny_world):
    from typer.testing import CliRunner

    from clsp.cli import app
    from clsp.train.loop import make_config, train

    root, shards, source = tiny_world
    run = root / "run-simclr"
    train(make_config(None, shards=str(shards), out=str(run), method="simclr", positives="synthetic",
                      **dict(TINY_TRAIN)))
    args = ["eval", "all", str(run), "--shards", str(shards), "--source", source, "--out", str(root / "report"),
            "--probe-epochs", "3", "--audit-anchors", "8"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "kNN top-1 %" in first.output and "class agreement" in first.output
    made = sorted(p.name for p in (root / "report").rglob("*") if p.is_file())
    assert {"report.md", "results.csv", "audit.json", "audit.md", "contact_sheet.png", "summary.png"} <= set(made)
    assert {"run-simclr-training.png", "run-simclr-tsne.png"} <= set(made)
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["method"] == "simclr" and results["positives"] == "synthetic" and results["seed"] == 0
    assert set(results["knn"]) == {"5", "10", "20", "24"}  # 50, 100, 200 capped at the 24 train images
    (root / "report" / ".contact_sheet.tmp.png").write_bytes(b"\x89PNG")  # earlier versions' temp, a kill left
    (root / "report" / f".audit.md.tmp-{dead_pid()}").write_text("# Aud")  # a write a kill cut short
    second = CliRunner().invoke(app, args)  # same inputs: same results, no new files, no leftovers
    assert second.exit_code == 0, second.output
    assert sorted(p.name for p in (root / "report").rglob("*") if p.is_file()) == made

    from clsp.errors import UserError

    with pytest.raises(UserError, match="has no eval/results.json"):  # the root CLI prints it as one `error:` line
        report([root], root / "r2")


def test_a_report_row_names_the_folder_given_its_result_file_shards_and_training_options(tiny_world, tmp_path):
    """A copied run was listed under the name its results.json recorded, and neither the tables nor report.md said
    which shards or training options a row came from: two studies at 25 and 80 epochs read alike."""
    import csv
    import shutil

    from clsp.eval.evaluate import evaluate_run
    from clsp.file_io import read_json
    from clsp.train.loop import make_config, train

    root, shards, source = tiny_world
    run = tmp_path / "trained-here"
    train(make_config(None, shards=str(shards), out=str(run), method="simclr", positives="synthetic",
                      **dict(TINY_TRAIN)))
    evaluate_run(run, EvalConfig(source=source, probe=FAST_PROBE))
    copy = tmp_path / "copied"
    shutil.copytree(run, copy)
    report([copy], tmp_path / "report")
    (row,) = csv.DictReader(open(tmp_path / "report" / "results.csv"))
    assert row["run"] == "copied" and row["run_dir"] == str(copy) and row["results_file"] == "results.json"
    assert row["shards_sha256"] == read_json(run / "config.json")["data"]["shards_sha256"]
    assert json.loads(row["training"])["epochs"] == 1 and json.loads(row["training"])["width"] == 2
    text = (tmp_path / "report" / "report.md").read_text()
    assert re.search(rf"Trained with: .*epochs 1, .*; 12 anchors at 8 px; synthetic positives from shards "
                     rf"{row['shards_sha256'][:12]} \(sha256\)\.", text), text


def test_outputs_inside_a_source_or_among_another_stages_files_are_refused_before_anything_is_written(tiny_world,
                                                                                                     tmp_path):
    """train wrote its run inside the folder source its shards were made from, which every later command then read
    as a split-less part ("mixes parts named for a split"); eval wrote its report among a shard folder's files."""
    from typer.testing import CliRunner

    from clsp.cli import app
    from clsp.train.loop import make_config, train

    root, shards, source = tiny_world
    options = ["--width", "2", "--epochs", "1", "--batch-size", "4", "--workers", "0"]
    for out, extra in ((root / "images" / "runs", []), (tmp_path / "r", ["--knn-every", "1", "--knn-source",
                                                                          f"folder:{tmp_path}"])):
        refused = CliRunner().invoke(app, ["train", "run", str(shards), "--out", str(out), *options, *extra])
        assert refused.exit_code == 2 and f"--out {out} lies inside" in refused.output, refused.output
        assert not out.exists()
    run = tmp_path / "run"
    train(make_config(None, shards=str(shards), out=str(run), method="simclr", positives="none", **dict(TINY_TRAIN)))
    for out, held in ((shards, "shards (manifest.json)"), (run, "a clsp train run (config.json)")):
        before = sorted(p.name for p in out.iterdir())
        refused = CliRunner().invoke(app, ["eval", "all", str(run), "--shards", str(shards), "--source", source,
                                           "--out", str(out)])
        assert refused.exit_code == 2 and f"--out {out} holds {held}" in refused.output, refused.output
        assert sorted(p.name for p in out.iterdir()) == before


def test_a_moved_source_is_said_relative_only_when_the_run_recorded_a_relative_path(tiny_world, tmp_path,
                                                                                     monkeypatch):
    """A recorded source that is gone got "a relative path there is relative to where the run was made" also when the
    run had recorded an absolute path."""
    import shutil

    from clsp.eval.evaluate import EvalConfig, prepare_eval
    from clsp.errors import UserError
    from clsp.train.loop import make_config, train

    root, shards, _ = tiny_world
    monkeypatch.chdir(tmp_path)
    for spec in (f"folder:{tmp_path / 'absolute'}", "folder:relative"):
        images = tmp_path / spec.partition(":")[2]
        shutil.copytree(root / "images", images)
        made = shutil.copytree(shards, tmp_path / f"shards-{images.name}")
        record_source(made, spec)
        run = tmp_path / f"run-{images.name}"
        train(make_config(None, shards=str(made), out=str(run), method="simclr", positives="none", **dict(TINY_TRAIN)))
        images.rename(tmp_path / f"moved-{images.name}")
        with pytest.raises(UserError) as refused:
            prepare_eval(run, EvalConfig())
        relative = "a relative path there is relative to where the run was made" in str(refused.value)
        assert relative == (spec == "folder:relative"), str(refused.value)


def test_a_rerun_on_the_same_inputs_replaces_its_result_and_other_inputs_get_a_new_file(tmp_path):
    from clsp.eval import write_result

    target = tmp_path / "knn.json"
    first = {"weights_sha256": "aa", "eval_config": {"ks": [20]}, "knn_best": 90.0}
    assert write_result(target, first, {"knn_best"}) == target
    again = {**first, "knn_best": 90.5}  # e.g. other float rounding on another thread count: same inputs
    cut, live = tmp_path / f".knn-2.json.tmp-{dead_pid()}", tmp_path / f".knn.json.tmp-{os.getppid()}"
    for temp in (cut, live):  # a killed write's leftover, and a running writer's temp
        temp.write_text('{"weights')
    assert write_result(target, again, {"knn_best"}) == target  # the rerun in place also removes the leftover
    assert json.loads(target.read_text())["knn_best"] == 90.5 and not (tmp_path / "knn-2.json").exists()
    assert not cut.exists() and live.exists()
    live.unlink()
    retrained = {**first, "weights_sha256": "bb"}  # other weights: the earlier result is kept
    assert write_result(target, retrained, {"knn_best"}).name == "knn-2.json"
    assert json.loads(target.read_text())["weights_sha256"] == "aa"
    assert write_result(target, {**retrained, "knn_best": 1.0}, {"knn_best"}).name == "knn-2.json"  # its own rerun
    assert write_result(target, {**first, "knn_best": 89.0}, {"knn_best"}) == target  # the first inputs again: their
    assert json.loads(target.read_text())["knn_best"] == 89.0 and not (tmp_path / "knn-3.json").exists()  # own file
    (tmp_path / "notes.json").write_text("not json at all")
    assert write_result(tmp_path / "notes.json", first, {"knn_best"}).name == "notes-2.json"  # never over a stranger
    assert (tmp_path / "notes.json").read_text() == "not json at all"
