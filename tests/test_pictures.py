"""Pictures a researcher can read: training curves smoothed per epoch, a kNN panel only when the run had a monitor,
the monitor in percent (old logs in fractions converted on resume and in plots)."""
from __future__ import annotations

import csv

import numpy as np
from PIL import Image

from clsp.eval.plots import plot_training, rolling_mean
from clsp.train.checkpoint import RunLog


def write_log(path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)


def test_rolling_mean_averages_each_value_with_the_ones_before_it():
    values = np.array([4.0, 2.0, 6.0, 0.0, 10.0])
    assert np.allclose(rolling_mean(values, 2), [4.0, 3.0, 4.0, 3.0, 5.0])
    assert np.allclose(rolling_mean(values, 1), values)
    assert np.allclose(rolling_mean(values, 10), np.cumsum(values) / np.arange(1, 6))


def test_the_knn_panel_appears_only_when_the_run_had_a_monitor(tmp_path):
    columns = ["step", "epoch", "lr", "loss", "loss_base", "loss_clsp", "images_per_s", "knn_top1_pct"]
    rows = [{"step": s, "epoch": 1 + (s - 1) // 4, "lr": 0.1, "loss": 5 - s / 10, "loss_base": 4, "loss_clsp": 1,
             "images_per_s": 100, "knn_top1_pct": ""} for s in range(1, 13)]
    write_log(tmp_path / "plain.csv", rows, columns)
    for row in rows[3::4]:
        row["knn_top1_pct"] = 50 + row["step"]
    write_log(tmp_path / "monitored.csv", rows, columns)
    plain = Image.open(plot_training(tmp_path / "plain.csv", tmp_path / "plain.png")).size
    monitored = Image.open(plot_training(tmp_path / "monitored.csv", tmp_path / "monitored.png")).size
    assert monitored[0] > 1.5 * plain[0] and monitored[1] == plain[1]  # two panels side by side, or one


def test_a_log_begun_with_fractions_is_resumed_in_percent(tmp_path):
    old = ["step", "epoch", "lr", "loss", "loss_base", "loss_clsp", "images_per_s", "knn_top1"]
    write_log(tmp_path / "log.csv", [{"step": 1, "epoch": 1, "lr": 0.1, "loss": 3, "loss_base": 3, "loss_clsp": 0,
                                      "images_per_s": 10, "knn_top1": 0.625},
                                     {"step": 2, "epoch": 1, "lr": 0.1, "loss": 2, "loss_base": 2, "loss_clsp": 0,
                                      "images_per_s": 10, "knn_top1": ""}], old)
    RunLog(tmp_path / "log.csv", writer=True, keep_steps=2)
    with open(tmp_path / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["knn_top1_pct"] for r in rows] == ["62.5", ""] and "knn_top1" not in rows[0]


def test_a_run_with_a_log_begun_in_fractions_is_still_recognised_as_ours(tmp_path):
    from clsp.train.checkpoint import run_files

    old = ["step", "epoch", "lr", "loss", "loss_base", "loss_clsp", "images_per_s", "knn_top1"]
    write_log(tmp_path / "log.csv", [{"step": 1, "epoch": 1, "lr": 0.1, "loss": 3, "loss_base": 3, "loss_clsp": 0,
                                      "images_per_s": 10, "knn_top1": 0.5}], old)
    (tmp_path / "notes.csv").write_text("step,epoch\n1,1\n")
    assert [p.name for p in run_files(tmp_path)] == ["log.csv"]  # --overwrite deletes it, never the user's file


def test_tsne_legend_names_the_classes(tmp_path, monkeypatch):
    import matplotlib.axes

    from clsp.eval.plots import plot_tsne

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 10)
    features = rng.normal(size=(30, 4)) + labels[:, None] * 3.0
    legends, legend = [], matplotlib.axes.Axes.legend

    def spy(self, *args, handles=(), **kwargs):  # what each legend says
        legends.append([handle.get_label() for handle in handles])
        return legend(self, *args, handles=handles, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "legend", spy)
    named = Image.open(plot_tsne(features, labels, tmp_path / "named.png", class_names=["airplane", "cat", "truck"]))
    plain = Image.open(plot_tsne(features, labels, tmp_path / "plain.png"))
    assert named.size == plain.size
    assert legends == [["airplane", "cat", "truck"], ["0", "1", "2"]]  # each label's own name, else its number


def test_sheets_carry_captions_and_a_title(tmp_path):
    from conftest import build_shard_dir
    from clsp.shards.sheet import contact_sheet, image_grid

    tiles = [[np.full((8, 8, 3), 255, np.uint8)] * 3] * 2  # white tiles: any dark pixel is text
    plain = image_grid(tiles, min_side=48)
    captioned = image_grid(tiles, min_side=48, captions=[["a", "b", "c"]] * 2, title="line one\nline two")
    assert captioned.size[0] == plain.size[0] and captioned.size[1] == plain.size[1] + 2 * 14 + 2 * 15 + 4
    assert np.asarray(captioned)[:30].min() < 128  # the title's text is drawn (dark pixels above the grid)
    assert np.asarray(plain).min() >= 128  # no text without captions or title...
    top = 2 * 15 + 4  # under the title: the first row of tiles (48 px), then its captions' strip (14 px)
    assert np.asarray(captioned)[top + 48: top + 48 + 14].min() < 128  # ...and the captions are drawn
    shards = build_shard_dir(tmp_path / "shards", counts=(3,), k=2)
    sheet = Image.open(contact_sheet(str(shards), tmp_path / "sheet.png", anchors=3))
    assert sheet.size[1] > 3 * 64 + 5 * 15  # three captioned rows of 64 px tiles under a five-line title


def test_data_sheet_names_each_image_class(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from clsp.cli import app

    import clsp.shards.sheet as sheet
    from clsp.sources import open_source

    seen, image_grid = {}, sheet.image_grid
    monkeypatch.setattr(sheet, "image_grid",
                        lambda rows, **options: seen.update(options) or image_grid(rows, **options))
    out = tmp_path / "data.png"
    result = CliRunner().invoke(app, ["data", "sheet", "digits", "--out", str(out), "--rows", "2", "--columns", "5"])
    assert result.exit_code == 0, result.output
    source = open_source("digits")
    names = [source.classes[record.label] if source.classes else str(record.label) for record in source.records(0, 10)]
    assert seen["captions"] == [names[:5], names[5:]]  # each image captioned with its own class
    image = Image.open(out)
    assert image.size[1] == 15 + 4 + 2 * (48 + 14 + 2)  # a title line, then two rows of tiles with their captions
