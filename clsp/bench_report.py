"""The README's benchmark tables, made from the results files the benches write, so every figure in them can be
checked against a committed JSON file (device, command, versions, date beside each figure).

A table lives between two markers in README.md that name its kind and its files (paths relative to the README):

    <!-- bench-table sampler: bench/results/gpu/sampler-eager.json bench/results/gpu/sampler-compiled.json -->
    ...made here...
    <!-- /bench-table -->

One column per file, one row per figure; every ratio is computed from the two rates of the same file, so from one run.
A file that does not exist yet is named in a "not measured yet" line instead of a column.

    python -m clsp.bench_report            # rewrite the tables in README.md
    python -m clsp.bench_report --check    # exit 1 if a table differs from its files (the tests run this)
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import typer

from clsp.file_io import write_atomic

BLOCK = re.compile(r"(<!-- bench-table (?P<kind>[a-z]+): (?P<files>[^>]*?) -->\n)(?P<body>.*?)(<!-- /bench-table -->)",
                   re.DOTALL)
Row = tuple[str, Callable[[dict], str]]


def _sig(x: float) -> str:
    """About three significant figures, thousands separated: 9.27, 23.6, 1,054."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 'es' if word.endswith('s') else 's'}"


def _flops(tflop_s: float, fraction: float | None = None) -> str:
    rate = f"{tflop_s:.1f} TFLOP/s" if tflop_s >= 1 else f"{tflop_s * 1e3:.0f} GFLOP/s"
    return rate if fraction is None else f"{rate}, {fraction:.1%} of bf16 peak"


def _images(r: dict, name: str) -> str:
    """One sampler variant: images/s and the FLOP/s it achieved (and the share of the GPU's peak, when known); for a
    variant that failed in its warm-up (the bench leaves it out and names its error under "failed"), the error's
    kind."""
    if name in r.get("failed", {}):
        return f"failed ({r['failed'][name].split(':')[0]}: see the results file)"
    if name not in r["images_per_s"]:
        return "—"
    fraction = r.get("fraction_of_peak", {}).get(name)
    return f"{_sig(r['images_per_s'][name])} images/s ({_flops(r['tflop_per_s'][name], fraction)})"


def _ratio(r: dict, a: str, b: str) -> str:
    rate = r["images_per_s"]
    return f"{_sig(rate[a] / rate[b])}x" if a in rate and b in rate else "—"


def _launches(r: dict) -> str:
    """What one step asks of the device (CUDA kernels, or aten ops on the CPU), and the split step's time per launch:
    when the host needs about that long to issue one, it limits the step (files from before the count: '—')."""
    launches = r.get("launches_per_step")
    if not launches or not launches.get("split"):  # none counted (a profiler that saw no kernels): no time per launch
        return "—"
    step_s = r["config"]["batch"] / r["images_per_s"]["split"] / r["config"]["steps"]  # one split step, best round
    return (f"{launches['split']:,} / {launches['naive']:,} {launches['counted']} "
            f"({_sig(1e6 * step_s / launches['split'])} µs of a split step each)")


PROVENANCE_ROWS: list[Row] = [  # every table's first rows: what produced the column, where and when
    ("command", lambda r: f"`{r['command']}`"),
    ("where, when", lambda r: f"{r['device']}; torch {r['versions']['torch']}, clsp "
                              f"{r['versions']['clsp-positives']}; {r['date'][:10]}"),
]
SAMPLER_ROWS: list[Row] = [
    *PROVENANCE_ROWS,
    ("work", lambda r: f"{r['config']['model']} UNet ({r['parameters'] / 1e6:.1f}M parameters), batch "
                       f"{r['config']['batch']} = {r['config']['batch'] // r['config']['k']} anchors x K "
                       f"{r['config']['k']}, {r['config']['steps']} DDIM steps"
                       f"{', compiled' if r['config']['compile'] else ''}"),
    ("split sampler (ours)", lambda r: _images(r, "split")),
    ("naive reference", lambda r: _images(r, "naive")),
    ("split / naive", lambda r: f"{_ratio(r, 'split', 'naive')}, " + (
        "identical outputs" if r["max_abs_diff_split_vs_naive"] == 0
        else f"outputs differ by at most {r['max_abs_diff_split_vs_naive']:.1e}")),
    ("authors' recipe (fp32)", lambda r: _images(r, "authors")),
    ("split / authors' recipe", lambda r: _ratio(r, "split", "authors")),
    ("shared anchor noise", lambda r: _images(r, "shared")),
    ("bf16 weights (no autocast)", lambda r: _images(r, "bf16-weights")),
    ("whole loop as one CUDA graph", lambda r: _images(r, "graphed")),
    ("counter / CPU-generator noise", lambda r: f"{_ratio(r, 'split', 'cpu-noise')}; one step's noise "
                                                f"{r['noise_ms_per_step']['counter']:.1f} / "
                                                f"{r['noise_ms_per_step']['cpu-generator']:.1f} ms"),
    ("launches per step, split / naive", _launches),
    ("FLOP per image, split / naive", lambda r: f"{r['split_flops_per_image'] / 1e9:,.1f} / "
                                                f"{r['naive_flops_per_image'] / 1e9:,.1f} G (a split step = "
                                                f"{r['split_step_over_forward']:.3f} forward passes)"),
]


def _anchors(r: dict, rate: float) -> str:
    """An input rate, and how many times what training consumes it delivers (above 1: the model limits training)."""
    return f"{_sig(rate)} anchors/s ({_sig(rate / r['train']['anchors_per_s'])}x training)"


def _training(r: dict) -> str:
    t = r["train"]
    compiled = f"; compiling took {t['compile_s']:.0f} s" if t.get("compile_s") is not None else ""
    launched = "" if not t.get("launches_per_step") else (
        f"; {t['launches_per_step']:,} {t['launches_counted']} a step "
        f"({_sig(1e6 * r['config']['batch'] / t['anchors_per_s'] / t['launches_per_step'])} µs each)")
    return (f"{_sig(t['anchors_per_s'])} anchors/s ({_flops(t['achieved_tflop_s'], t.get('fraction_of_peak'))})"
            f"{compiled}{launched}")


def _augmented_training(r: dict) -> str:
    """The loop's step, views augmented on the device first: its rate, the augmentation's share of it and what one
    view's augmentation launches (files from before these figures: '—')."""
    t = r["train"]
    if "augmented_anchors_per_s" not in t:
        return "—"
    launched = (f", {t['augment_launches_per_view']:,} {t['launches_counted']} a view"
                if "augment_launches_per_view" in t else "")
    return (f"{_sig(t['augmented_anchors_per_s'])} anchors/s (augmentation: "
            f"{100 * t['augment_share_of_step']:.1f} % of a step{launched})")


TRAINER_ROWS: list[Row] = [
    *PROVENANCE_ROWS,
    ("work", lambda r: f"ResNet-18 width {r['config']['width']} at {r['config']['size']} px, batch "
                       f"{r['config']['batch']} anchors x 3 views, {_count(r['config']['workers'], 'loader process')}"
                       f", {_count(r['threads'], 'thread')}{', compiled' if r['config'].get('compile') else ''}"),
    ("training", _training),
    ("training + augment on the device", _augmented_training),
    ("streamed png shards + augment", lambda r: _anchors(r, r["inputs"]["loader_anchors_per_s"])),
    ("streamed raw shards + augment", lambda r: _anchors(r, r["inputs"]["loader_raw_anchors_per_s"])),
    ("in-memory input + augment", lambda r: _anchors(r, r["inputs"]["cached_anchors_per_s"])),
    ("batch augment / per-image PIL", lambda r: f"{_sig(r['inputs']['augment_anchors_per_s'])} / "
                                                f"{_sig(r['inputs']['pil_anchors_per_s'])} anchors/s"),
]

KINDS = {"sampler": SAMPLER_ROWS, "trainer": TRAINER_ROWS}


def render(kind: str, files: list[str], root: Path) -> str:
    """The markdown between a block's markers: a table with one column per existing file, then a line naming the
    files not measured yet."""
    if kind not in KINDS:
        raise ValueError(f"unknown bench-table kind {kind!r}: use one of {', '.join(KINDS)}")
    found = {name: _load(root / name) for name in files if (root / name).is_file()}
    columns = {name: _column(kind, name, figures) for name, figures in found.items()}
    lines = []
    if columns:
        lines += ["| | " + " | ".join(f"`{Path(name).name}`" for name in columns) + " |",
                  "|---" * (len(columns) + 1) + "|"]
        for row, (label, _) in enumerate(KINDS[kind]):
            lines.append(f"| {label} | " + " | ".join(cells[row] for cells in columns.values()) + " |")
    missing = [name for name in files if name not in found]
    if missing:
        lines.append("Not measured yet: " + ", ".join(f"`{name}`" for name in missing) + ".")
    return "\n".join(lines) + "\n"


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} cannot be read as a results file ({error}). Fix: run its bench again") from None


def _column(kind: str, name: str, figures: dict) -> list[str]:
    """One file's cells, top to bottom; a file another bench wrote (or an older bench without a figure) is refused."""
    try:
        return [cell(figures) for _, cell in KINDS[kind]]
    except (KeyError, TypeError) as error:
        raise ValueError(f"{name} is not a {kind} results file of this clsp (no {error}). Fix: name it in a block of "
                         f"its own kind, or run `python -m clsp.{'synth' if kind == 'sampler' else 'train'}.bench` "
                         f"again") from None


def refresh(text: str, root: Path) -> str:
    """`text` with every block's table made again from its files (read relative to `root`)."""
    return BLOCK.sub(lambda m: m.group(1) + render(m["kind"], m["files"].split(), root) + m.group(5), text)


def main(readme: Path = typer.Argument(Path("README.md"), help="the markdown file whose bench-table blocks to fill"),
         check: bool = typer.Option(False, "--check", help="write nothing; exit 1 if a table differs from its files")
         ) -> None:
    """Fill the README's benchmark tables from the results files under bench/results/."""
    if not readme.is_file():
        raise typer.BadParameter(f"{readme} does not exist. Fix: run from the project's root or name the README.")
    text = readme.read_text()
    if not BLOCK.search(text):
        raise typer.BadParameter(f"{readme} has no `<!-- bench-table KIND: FILES -->` block to fill")
    try:
        fresh = refresh(text, readme.parent)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    if fresh == text:
        typer.echo(f"{readme}: every bench table matches its results files")
    elif check:
        typer.echo(f"{readme}: a bench table differs from its results files. Fix: python -m clsp.bench_report",
                   err=True)
        raise typer.Exit(1)
    else:
        write_atomic(readme, fresh)
        typer.echo(f"{readme}: bench tables rewritten from their results files")


if __name__ == "__main__":
    typer.run(main)
