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

Stage modules are imported only when their command runs (or `clsp --help` lists them), and they import torch and
diffusers only inside their commands, so `clsp --version` and `--help` answer in well under a second. Help is plain
text (no rich markup, which ate bracketed words such as `[train]`); every option shows the default it really gets.
"""
from __future__ import annotations

import importlib
import sys

from clsp.progress import bars_for_stderr

bars_for_stderr()  # before any stage imports tqdm: into a log, a bar's frame every 30 s

import typer  # noqa: E402
from typer.core import TyperArgument, TyperGroup  # noqa: E402
from typer.main import get_group  # noqa: E402

from clsp import __version__  # noqa: E402
from clsp.errors import UserError, os_problem, printable  # noqa: E402
from clsp.presets import default_note  # noqa: E402

STAGES = [  # (name, module holding `app`)
    ("data", "clsp.data_cli"),
    ("diffusion", "clsp.synth.diffusion_cli"),
    ("synth", "clsp.synth.cli"),
    ("shards", "clsp.shards.cli"),
    ("train", "clsp.train.cli"),
    ("eval", "clsp.eval.cli"),
]


STOPPED_BY_CTRL_C = ("stopped by Ctrl-C; every file is written whole or not at all, so what finished is kept: run the "
                     "same command again to go on (with --resume for `clsp train run` and `clsp diffusion train`)")


class _Group(TyperGroup):
    """The root group: loads a stage's sub-app when it is asked for, and turns the errors a user can fix into one clear
    line and exit status 2, for every sub-command."""

    def list_commands(self, ctx):
        return [name for name, _ in STAGES]

    def get_command(self, ctx, name):
        module = dict(STAGES).get(name)
        return None if module is None else stage_group(name, module)

    def invoke(self, ctx):
        try:
            result = super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):  # --help, usage errors: typer's own handling
            raise
        except KeyboardInterrupt:  # a command that keeps no StopFlag (synth, eval), or a second Ctrl-C in training
            typer.echo(f"\nerror: {STOPPED_BY_CTRL_C}", err=True)
            raise typer.Exit(130) from None  # the shell's status for SIGINT
        except Exception as error:
            message = user_message(error)
            if message is None:
                raise
            typer.echo(f"error: {printable(message)}", err=True)  # one line, whatever a file put in it
            raise typer.Exit(2) from None
        if "torch" in sys.modules:  # after a command that succeeded (not after an error: a peer may still wait in a
            from clsp.accelerator import leave_process_group  # collective, and the launcher ends the launch)

            leave_process_group()
        return result


def user_message(error: Exception) -> str | None:
    """The one-line message for an error the user can fix, or None for a bug (which keeps its traceback)."""
    from PIL import UnidentifiedImageError
    from pyarrow import ArrowInvalid
    from safetensors import SafetensorError

    from clsp.shards.reader import ShardError  # imported here: shards.reader imports webdataset, which imports torch
    from clsp.shards.schema import SchemaError

    if isinstance(error, (UserError, ShardError, SchemaError)):
        return str(error)
    if isinstance(error, UnidentifiedImageError):
        return f"{error}: it is not an image file this can read; replace or remove it"
    if isinstance(error, (OSError, SafetensorError)):  # safetensors words a full disk as "... (os error 28)"
        return os_problem(error)
    if isinstance(error, ArrowInvalid) and "parquet" in str(error).lower():
        return f"not a readable Parquet file ({error}): check the path points to Parquet files"
    if isinstance(error, ImportError) and _missing_fsspec_backend(error):
        name = error.__cause__.name
        extra = {"aiohttp": "http", "s3fs": "s3"}.get(name)
        how = f"`pip install 'clsp-positives[{extra}]'` (or `pip install {name}`)" if extra else f"`pip install {name}`"
        return f"{error}: {how} in this environment, or copy the data to a local path"
    return None


def _missing_fsspec_backend(error: ImportError) -> bool:
    """fsspec's own "Install s3fs to access S3" for a URL scheme whose package is not installed."""
    from fsspec.registry import known_implementations

    return (isinstance(error.__cause__, ModuleNotFoundError) and error.__cause__.name is not None
            and str(error) in {spec.get("err") for spec in known_implementations.values()})


def stage_group(name: str, module: str):
    """The click group of one stage's typer sub-app, with plain help: no rich markup, value placeholders named after
    the type (none for flags), and for options left unset (None) the default from the stage's HELP_DEFAULTS."""
    stage = importlib.import_module(module)
    group = get_group(stage.app)
    group.name = name
    help_defaults = getattr(stage, "HELP_DEFAULTS", {})  # {command: (config defaults, presets)}
    for command_name, command in group.commands.items():
        defaults, presets = help_defaults.get(command_name, ({}, {}))
        _plain_help(command, defaults, presets)
    _plain_help(group, {}, {})
    return group


_METAVARS = {"int": "INT", "float": "FLOAT", "Path": "PATH"}  # typer's type name -> placeholder; others: TEXT


def _plain_help(command, defaults: dict, presets: dict) -> None:
    command.rich_markup_mode = None
    for param in command.params:
        if isinstance(param, TyperArgument):  # "SHARDS", not "shards <str>"
            param.metavar = param.metavar or param.name.upper()
            param.display_type_rich = lambda ctx: None
        elif getattr(param, "is_flag", False):
            param.metavar = ""  # a flag takes no value: typer would show <bool>
            if not param.secondary_opts:
                continue  # a lone flag (--resume) is off unless given: nothing to show
        elif param.metavar is None:
            param.metavar = _METAVARS.get(param.bare_type(), "TEXT")
        note = default_note(param.name, defaults, presets) if param.default is None and not param.required else ""
        if note:
            param.help = f"{param.help or ''} {note}".strip()


app = typer.Typer(cls=_Group, help="Contrastive learning with synthetic positives: build diffusion-positive shards, "
                  "train on them, evaluate.", no_args_is_help=True, pretty_exceptions_enable=False,
                  add_completion=False, rich_markup_mode=None)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"clsp {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """Contrastive learning with synthetic positives (CLSP, ECCV 2024)."""

