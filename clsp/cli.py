"""The `clsp` command: one typer sub-app per stage, mounted here.

    clsp data ...       inspect data sources                     (clsp/data_cli.py)
    clsp diffusion ...  train an unconditional DDPM generator    (synth/diffusion_cli.py)
    clsp synth ...      sample positives into shards             (synth/cli.py)
    clsp shards ...     verify / inspect shard directories       (shards/cli.py)
    clsp train ...      contrastive training from shards         (train/cli.py)
    clsp eval ...       kNN, linear probe, audit, pictures       (eval/cli.py)

Errors a user can fix (UserError, and the shard package's ShardError / SchemaError) print one line naming the problem
and the fix and exit with status 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import importlib

import typer
from typer.core import TyperGroup

from clsp import __version__
from clsp.errors import UserError
from shards.reader import ShardError
from shards.schema import SchemaError

STAGES = [  # (name, module holding `app`)
    ("data", "clsp.data_cli"),
    ("diffusion", "synth.diffusion_cli"),
    ("synth", "synth.cli"),
    ("shards", "shards.cli"),
    ("train", "train.cli"),
    ("eval", "eval.cli"),
]


class _Group(TyperGroup):
    """Turns the errors a user can fix into one clear line and exit status 2, for every sub-command."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (UserError, ShardError, SchemaError) as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None


app = typer.Typer(cls=_Group, help="Contrastive learning with synthetic positives: build diffusion-positive shards, "
                  "train on them, evaluate.", no_args_is_help=True, pretty_exceptions_enable=False,
                  add_completion=False)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"clsp {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """Contrastive learning with synthetic positives (CLSP, ECCV 2024)."""


for _name, _module in STAGES:
    app.add_typer(importlib.import_module(_module).app, name=_name)
