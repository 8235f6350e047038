"""`clsp shards verify|info|sheet`."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from clsp.errors import UserError, printable

app = typer.Typer(help="Inspect and check shard directories (the contract between teams).", no_args_is_help=True)


@app.command("verify")
def verify_command(directory: str = typer.Argument(..., help="Shard directory (holds manifest.json).")) -> None:
    """Check every shard opens, every anchor appears exactly once with K positives, and checksums match."""
    # imported here: the reader imports torch (webdataset); --help stays fast
    from clsp.shards.manifest import read_manifest
    from clsp.shards.verify import verify

    problems = verify(directory)
    if problems:
        for problem in problems:
            typer.echo(f"FAIL {printable(problem)}", err=True)  # names a stranger's files hold, escaped
        typer.echo(f"{directory}: {len(problems)} problem(s)", err=True)
        raise typer.Exit(1)
    manifest = read_manifest(directory)
    typer.echo(f"{directory}: OK ({manifest.count} anchors x {manifest.k} positives in {len(manifest.shards)} shards)")
    typer.echo(printable(f"made with   {_compute(manifest.run)}"))


@app.command("info")
def info_command(location: str = typer.Argument(..., help="Shard directory or URL."),
                 as_json: bool = typer.Option(False, "--json",
                                              help="Print the whole manifest run metadata as JSON.")) -> None:
    """Show what made a shard directory: source, generator, sampler settings, K, seed."""
    from clsp.shards.manifest import read_manifest

    manifest = read_manifest(location)
    if as_json:
        typer.echo(json.dumps({"count": manifest.count, "shards": len(manifest.shards), "run": manifest.run},
                              indent=2, sort_keys=True))
        return
    run = manifest.run
    lines = [f"anchors     {manifest.count} in {len(manifest.shards)} shards, K = {manifest.k}, "
             f"{run.get('image_size')} px, {manifest.codec} images (schema {manifest.schema_version})",
             *(f"{key:<11} " + ", ".join(f"{k}={v}" for k, v in sorted(run.get(key, {}).items()))
               for key in ("source", "generator", "sampler")),
             f"made with   {_compute(run)}", f"seed        {run.get('seed')}   clsp {run.get('package_version')}"]
    for line in lines:  # the sender's text, escaped: a value may hold a terminal's escape sequences or a newline
        typer.echo(printable(line))


def _compute(run: dict) -> str:
    """The device, CPU threads and software the shard bytes depend on (the synth job's run["compute"])."""
    compute = run.get("compute")
    if not isinstance(compute, dict):
        return "not recorded (made before clsp recorded device, threads and versions)"
    return ", ".join(f"{k}={v}" for k, v in sorted(compute.items()))


@app.command("sheet")
def sheet_command(directory: str = typer.Argument(..., help="Shard directory or URL."),
                  out: Path = typer.Option(..., "--out", help="Image file to write (.png, .jpg, .jpeg or .webp)."),
                  anchors: int = typer.Option(8, min=1, help="How many anchors (rows)."),
                  overwrite: bool = typer.Option(False, help="Replace an existing --out file.")) -> None:
    """Contact sheet: anchors in the first column, their positives to the right."""
    from clsp.shards.manifest import read_manifest
    from clsp.shards.sheet import check_sheet_out, contact_sheet
    from clsp.sources import refuse_out_inside

    try:
        check_sheet_out(out, overwrite)  # refused (one error line, exit 2) before any shard is read
    except ValueError as error:
        raise UserError(f"--out: {error}") from None
    manifest = read_manifest(directory)
    spec = manifest.run["source"].get("spec")
    if isinstance(spec, str):  # a sheet inside the folder the shards were made from would be read as an image of it
        refuse_out_inside(spec, out)
    typer.echo(contact_sheet(directory, out, anchors, overwrite, manifest))
