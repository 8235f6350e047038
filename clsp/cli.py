"""The `clsp` command: one typer sub-app per stage, mounted here.

    clsp data ...       inspect data sources                     (clsp/data_cli.py)
    clsp diffusion ...  train an unconditional DDPM generator    (synth/diffusion_cli.py)
    clsp synth ...      sample positives into shards             (synth/cli.py)
    clsp shards ...     verify / inspect shard directories       (shards/cli.py)
    clsp train ...      contrastive training from shards         (train/cli.py)
    clsp eval ...       kNN, linear probe, audit, pictures       (eval/cli.py)

Errors a user can fix print one line naming the problem and the fix and exit with status 2: UserError, the shard
package's ShardError / SchemaError, OS failures on the user's paths (clsp.errors.OS_PROBLEMS: a full disk, a read-only
or foreign path), files that are not what they claim (an image PIL cannot identify, a file that is not Parquet) and a
missing fsspec backend (s3://, gs://). Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import importlib

import typer
from typer.core import TyperGroup

from clsp import __version__
from clsp.errors import UserError, os_problem
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
        except Exception as error:
            message = user_message(error)
            if message is None:
                raise
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(2) from None


def user_message(error: Exception) -> str | None:
    """The one-line message for an error the user can fix, or None for a bug (which keeps its traceback)."""
    from PIL import UnidentifiedImageError
    from pyarrow import ArrowInvalid
    from safetensors import SafetensorError

    if isinstance(error, (UserError, ShardError, SchemaError)):
        return str(error)
    if isinstance(error, UnidentifiedImageError):
        return f"{error}: it is not an image file this can read; replace or remove it"
    if isinstance(error, (OSError, SafetensorError)):  # safetensors words a full disk as "... (os error 28)"
        return os_problem(error)
    if isinstance(error, ArrowInvalid) and "parquet" in str(error).lower():
        return f"not a readable Parquet file ({error}): check the path points to Parquet files"
    if isinstance(error, ImportError) and _missing_fsspec_backend(error):
        return f"{error}: `pip install {error.__cause__.name}` in this environment, or copy the data to a local path"
    return None


def _missing_fsspec_backend(error: ImportError) -> bool:
    """fsspec's own "Install s3fs to access S3" for a URL scheme whose package is not installed."""
    from fsspec.registry import known_implementations

    return (isinstance(error.__cause__, ModuleNotFoundError) and error.__cause__.name is not None
            and str(error) in {spec.get("err") for spec in known_implementations.values()})


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
