"""The README's benchmark tables: made from the results files (the committed README must match its files), one column
per file, ratios from the same file, files not measured yet named as such, and nothing outside the markers touched."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from clsp import bench_report
from clsp.synth import bench as sampler_bench
from clsp.train import bench as trainer_bench

ROOT = Path(__file__).resolve().parents[1]


def invoke(*args: str):
    app = typer.Typer()
    app.command()(bench_report.main)
    return CliRunner().invoke(app, list(args))


def said(result) -> str:
    """The command's output as one line of words (typer draws its errors in a wrapped box)."""
    return " ".join(result.output.replace("│", " ").split())


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """A folder with one tiny run of each bench, as the benches write them."""
    folder = tmp_path_factory.mktemp("results")
    sampler = sampler_bench.run_bench(sampler_bench.BenchConfig(steps=1, batch=8, k=4, repeats=1))
    trainer = trainer_bench.bench(trainer_bench.BenchConfig(width=4, size=8, batch=4, steps=1, anchors=8, k=2,
                                                            repeats=1))
    for name, figures in (("sampler.json", sampler), ("trainer.json", trainer)):
        (folder / name).write_text(json.dumps(figures))
    return folder


def cells(table: str, label: str) -> list[str]:
    """The cells of the row named `label`, without the label."""
    row = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in row.strip("|").split("|")][1:]


def test_the_readme_tables_match_the_committed_results_files():
    result = invoke(str(ROOT / "README.md"), "--check")
    assert result.exit_code == 0, result.output + "\nFix: python -m clsp.bench_report"
    named = {name for m in bench_report.BLOCK.finditer((ROOT / "README.md").read_text()) for name in m["files"].split()}
    committed = {str(p.relative_to(ROOT)) for p in (ROOT / "bench" / "results").rglob("*.json")}
    assert committed <= named, f"results files no README table shows: {sorted(committed - named)}"


def test_a_sampler_table_carries_its_run_and_ratios_within_it(results):
    figures = json.loads((results / "sampler.json").read_text())
    table = bench_report.render("sampler", ["sampler.json", "gpu.json"], results)
    assert cells(table, "command") == [f"`{figures['command']}`"]  # one column: the file that exists
    rate = figures["images_per_s"]
    assert cells(table, "split sampler (ours)")[0].startswith(bench_report._sig(rate["split"]) + " images/s")
    assert cells(table, "split / naive")[0].startswith(bench_report._sig(rate["split"] / rate["naive"]) + "x")
    assert cells(table, "split / authors' recipe") == [bench_report._sig(rate["split"] / rate["authors"]) + "x"]
    assert cells(table, "bf16 weights (no autocast)") == ["—"]  # a CUDA column
    assert cells(table, "whole loop as one CUDA graph") == ["—"]  # another
    launches, step_s = figures["launches_per_step"], 8 / rate["split"] / 1  # batch 8, 1 step
    assert cells(table, "launches per step, split / naive") == [
        f"{launches['split']:,} / {launches['naive']:,} aten ops "
        f"({bench_report._sig(1e6 * step_s / launches['split'])} µs of a split step each)"]
    assert table.rstrip().endswith("Not measured yet: `gpu.json`.")


def test_a_results_file_from_before_the_launch_count_shows_a_dash(results):
    figures = json.loads((results / "sampler.json").read_text())
    del figures["launches_per_step"]
    (results / "older.json").write_text(json.dumps(figures))
    assert cells(bench_report.render("sampler", ["older.json"], results), "launches per step, split / naive") == ["—"]


def test_a_trainer_table_gives_each_input_against_training(results):
    figures = json.loads((results / "trainer.json").read_text())
    table = bench_report.render("trainer", ["trainer.json"], results)
    cached, train = figures["inputs"]["cached_anchors_per_s"], figures["train"]["anchors_per_s"]
    assert cells(table, "in-memory input + augment") == [
        f"{bench_report._sig(cached)} anchors/s ({bench_report._sig(cached / train)}x training)"]
    assert "Not measured yet" not in table
    step = figures["train"]  # the training figures
    augmented = (f"{bench_report._sig(step['augmented_anchors_per_s'])} anchors/s "
                 f"(augmentation: {100 * step['augment_share_of_step']:.1f} % of a step")
    assert cells(table, "training + augment on the device") == [
        f"{augmented}, {step['augment_launches_per_view']:,} aten ops a view)"]
    del step["augment_launches_per_view"]  # a file from before that figure
    (results / "older.json").write_text(json.dumps(figures))
    assert cells(bench_report.render("trainer", ["older.json"], results), "training + augment on the device") == [
        f"{augmented})"]
    del step["augmented_anchors_per_s"]  # and before the augmented step
    (results / "oldest.json").write_text(json.dumps(figures))
    assert cells(bench_report.render("trainer", ["oldest.json"], results), "training + augment on the device") == ["—"]


def test_a_results_file_of_the_other_bench_is_refused_by_name(results):
    with pytest.raises(ValueError, match="trainer.json is not a sampler results file"):
        bench_report.render("sampler", ["trainer.json"], results)
    (results / "broken.json").write_text("{")
    readme = results / "BROKEN.md"
    readme.write_text("<!-- bench-table trainer: broken.json -->\n<!-- /bench-table -->\n")
    result = invoke(str(readme))
    assert result.exit_code == 2 and "cannot be read as a results file" in said(result)


def test_only_missing_files_give_a_line_and_no_table(tmp_path):
    assert bench_report.render("trainer", ["a.json", "b.json"], tmp_path) == "Not measured yet: `a.json`, `b.json`.\n"
    with pytest.raises(ValueError, match="unknown bench-table kind 'speed'"):
        bench_report.render("speed", ["a.json"], tmp_path)


def test_check_refuses_a_stale_table_and_a_rewrite_touches_only_the_blocks(results):
    readme = results / "README.md"
    before, after = "# Title\n\nSome text | with a pipe.\n\n", "\nMore text.\n"
    block = "<!-- bench-table sampler: sampler.json -->\n| stale | table |\n<!-- /bench-table -->\n"
    readme.write_text(before + block + after)

    stale = invoke(str(readme), "--check")
    assert stale.exit_code == 1 and "python -m clsp.bench_report" in said(stale)
    assert "| stale | table |" in readme.read_text()  # --check writes nothing

    assert invoke(str(readme)).exit_code == 0
    text = readme.read_text()
    assert text.startswith(before + "<!-- bench-table sampler: sampler.json -->\n| | `sampler.json` |")
    assert text.endswith("<!-- /bench-table -->\n" + after) and "stale" not in text
    assert invoke(str(readme), "--check").exit_code == 0  # made from its files: nothing left to change


def test_a_file_without_tables_is_refused(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no tables here\n")
    result = invoke(str(readme))
    assert result.exit_code == 2 and "no `<!-- bench-table KIND: FILES -->` block" in said(result)


def test_a_variant_that_failed_says_so_and_its_ratios_are_dashes(results):
    figures = json.loads((results / "sampler.json").read_text())
    for key in ("images_per_s", "tflop_per_s", "seconds"):
        del figures[key]["authors"]
    figures.pop("speedup_split_over_authors")
    figures["failed"] = {"authors": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"}
    (results / "failed.json").write_text(json.dumps(figures))
    table = bench_report.render("sampler", ["failed.json"], results)
    assert cells(table, "authors' recipe (fp32)") == ["failed (OutOfMemoryError: see the results file)"]
    assert cells(table, "split / authors' recipe") == ["—"]
    assert cells(table, "shared anchor noise")[0].endswith("GFLOP/s)")  # the others are measured


def test_no_launches_counted_shows_a_dash_rather_than_dividing_by_zero(results):
    sampler = json.loads((results / "sampler.json").read_text())
    sampler["launches_per_step"] = {"split": 0, "naive": 0, "counted": "CUDA kernels"}  # a profiler that saw none
    trainer = json.loads((results / "trainer.json").read_text())
    trainer["train"].update(launches_per_step=0, launches_counted="CUDA kernels")
    (results / "sampler-none.json").write_text(json.dumps(sampler))
    (results / "trainer-none.json").write_text(json.dumps(trainer))
    assert cells(bench_report.render("sampler", ["sampler-none.json"], results),
                 "launches per step, split / naive") == ["—"]
    assert "µs each" not in cells(bench_report.render("trainer", ["trainer-none.json"], results), "training")[0]
