"""--log-with: the scalars of log.csv also go to an Accelerate tracker (TensorBoard here), whose files the run owns."""
from __future__ import annotations

import csv

import pytest

from clsp.errors import UserError
from conftest import build_shard_dir
from clsp.train.checkpoint import run_files
from clsp.train.loop import make_config, train

TINY = dict(width=4, epochs=2, batch_size=4, lr=0.05, warmup_epochs=0.0, proj_hidden=16, proj_dim=8, workers=0,
            knn_every=1, knn_source="digits")


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_gets_the_same_scalars_as_log_csv(tmp_path):
    shards = build_shard_dir(tmp_path / "shards", counts=(6, 6), k=1, size=16)
    out = tmp_path / "run"
    train(make_config(**TINY, shards=str(shards), out=str(out), log_with="tensorboard"))
    with open(out / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    logged = scalars(out / "tracker")
    assert set(logged) == {"epoch", "lr", "loss", "loss_base", "loss_clsp", "images_per_s", "knn_top1_pct"}
    assert [step for step, _ in logged["loss"]] == [int(r["step"]) for r in rows]
    assert [v for _, v in logged["loss"]] == pytest.approx([float(r["loss"]) for r in rows], rel=1e-5)
    knn = [(int(r["step"]), float(r["knn_top1_pct"])) for r in rows if r["knn_top1_pct"]]
    assert [s for s, _ in logged["knn_top1_pct"]] == [s for s, _ in knn]
    assert [v for _, v in logged["knn_top1_pct"]] == pytest.approx([v for _, v in knn], rel=1e-5)
    assert len(knn) == 2 and all(v > 1 for _, v in knn)  # one per epoch, in percent as eval reports it

    events = [p for p in run_files(out) if p.parent.name == "tracker"]
    assert events and all(p.name.startswith("events.out.tfevents.") for p in events)
    train(make_config(**TINY, shards=str(shards), out=str(out), overwrite=True))  # --overwrite removes them
    assert not (out / "tracker").exists()


def test_an_unknown_or_missing_tracker_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    import accelerate.utils

    shards = build_shard_dir(tmp_path / "shards", counts=(6,), k=1)
    with pytest.raises(UserError, match="not a tracker Accelerate supports: use one of .*tensorboard"):
        train(make_config(**TINY, shards=str(shards), out=str(tmp_path / "a"), log_with="tensorbored"))
    assert not (tmp_path / "a").exists()
    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)  # as without its package
    with pytest.raises(UserError, match=r"--log-with tensorboard needs its package.*clsp-positives\[tensorboard\]"):
        train(make_config(**TINY, shards=str(shards), out=str(tmp_path / "b"), log_with="tensorboard"))
    assert not (tmp_path / "b").exists()
