"""`clsp data info|sheet SOURCE`."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from clsp.errors import UserError
from clsp.sources import SPLIT_HELP
from clsp.vocabulary import SPEC_HELP

app = typer.Typer(help=f"Inspect data sources ({SPEC_HELP}).", no_args_is_help=True)


@app.command("info")
def info_command(source: str = typer.Argument(..., help=SPEC_HELP),
                 split: str = typer.Option("train", help=SPLIT_HELP),
                 image_size: int = typer.Option(None, help="Resize images to this many pixels (square).")) -> None:
    """Count, image size, splits, classes and content fingerprint of a source."""
    from clsp.sources import open_source

    typer.echo(json.dumps(open_source(source, split, image_size).describe(), indent=2))


@app.command("sheet")
def sheet_command(source: str = typer.Argument(..., help=SPEC_HELP),
                  out: Path = typer.Option(..., "--out", help="Image file to write (.png, .jpg, .jpeg or .webp)."),
                  split: str = typer.Option("train", help=SPLIT_HELP),
                  image_size: int = typer.Option(None, help="Resize images to this many pixels (square)."),
                  rows: int = typer.Option(8, min=1), columns: int = typer.Option(12, min=1),
                  overwrite: bool = typer.Option(False, help="Replace an existing --out file.")) -> None:
    """A grid of the first images of a source."""
    from clsp.sources import open_source, refuse_out_inside
    from clsp.shards.sheet import check_sheet_out, image_grid, save_sheet  # here: shards.sheet imports torch

    try:
        check_sheet_out(out, overwrite)  # refused (one error line, exit 2) before the source is read
    except ValueError as error:
        raise UserError(f"--out: {error}") from None
    refuse_out_inside(source, out)  # a sheet inside a class folder would be read as one of its images

    opened = open_source(source, split, image_size)
    records = list(opened.records(0, rows * columns))
    name = lambda label: (opened.classes[label] if 0 <= label < len(opened.classes) else  # noqa: E731
                          str(label) if label >= 0 else "no label")
    grid = [[r.image for r in records[i:i + columns]] for i in range(0, len(records), columns)]
    captions = [[name(r.label) for r in records[i:i + columns]] for i in range(0, len(records), columns)]
    title = f"{source} [{split}]: the first {len(records)} images, captioned with their class"
    typer.echo(save_sheet(image_grid(grid, min_side=48, anchor_gap=0, captions=captions, title=title), out, overwrite))
