"""`clsp synth run SOURCE --model M --out DIR`: build synthetic-positive shards (one process, or many under torchrun /
accelerate launch: `torchrun --nproc_per_node 4 $(which clsp) synth run ...`)."""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Optional

import typer

from clsp.presets import source_defaults, source_fields, source_literal
from clsp.vocabulary import FORWARD_BATCH_HELP, SPEC_HELP, SYNTH_DEVICE_HELP, PRECISION_HELP, bf16_for

# --help shows each unset option's default from SynthConfig and SamplerConfig (read without importing torch)
SAMPLER_FIELDS = source_fields("clsp.synth.sampler", "SamplerConfig")  # [(name, "float", default)]: one option each
SAMPLER_HELP = source_literal("clsp.synth.sampler", "SAMPLER_HELP")
_DEFAULTS = {**source_defaults("clsp.synth.job", "SynthConfig"),
             **source_defaults("clsp.synth.sampler", "SamplerConfig")}
HELP_DEFAULTS = {"run": (_DEFAULTS, source_defaults("clsp.synth.job", "PRESETS"))}
app = typer.Typer(help="Generate synthetic positives into shards.", no_args_is_help=True)


@app.callback()
def main() -> None:
    """Generate synthetic positives into shards (`clsp synth run`)."""


def run(
    source: str = typer.Argument(..., help=SPEC_HELP),
    model: str = typer.Option(..., "--model", help="generator dir (unet/, scheduler/) or hub id"),
    out: Path = typer.Option(..., "--out", help="shard directory"),
    preset: Optional[str] = typer.Option(None, help="defaults for a known run: embedded (digits, K=4, 32 steps)"),
    split: Optional[str] = typer.Option(None, help="train | test | all"),
    image_size: Optional[int] = typer.Option(None, help="read the source at this size (default: its native size)"),
    resize: Optional[bool] = typer.Option(None, "--resize", help="resize anchors to the generator's sample size"),
    k: Optional[int] = typer.Option(None, "--k", help="positives per anchor"),
    seed: Optional[int] = typer.Option(None, help="base seed, keyed with (anchor id, j)"),
    anchors_per_shard: Optional[int] = typer.Option(None, help="anchors per shard file"),
    forward_batch: Optional[int] = typer.Option(
        None, help=FORWARD_BATCH_HELP + "; a row is one candidate of one anchor (default: 256 on the CPU, 2,048 on a "
        "GPU, halved until it fits; a rerun keeps the recorded one)"),
    limit: Optional[int] = typer.Option(None, help="only the first N anchors"),
    device: Optional[str] = typer.Option(None, help=SYNTH_DEVICE_HELP + " (default: auto)"),
    precision: Optional[str] = typer.Option(None, help=PRECISION_HELP + " (default: auto)"),
    compile: Optional[bool] = typer.Option(None, "--compile", help="torch.compile the UNet blocks (GPU runs only)"),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="delete shards made with other settings"),
    score_reference: Optional[bool] = typer.Option(
        None, "--score-reference", help="also score each positive's class agreement (a reference classifier fitted on "
        "SOURCE's labelled train split) into index.parquet; rerun a finished job with it to add the scores"),
    codec: Optional[str] = typer.Option(
        None, help="image members: png (smaller, for sharing) | raw (.npy arrays, schema 3: larger, read without "
        "decoding when training)"),
    **sampler,  # one option per SamplerConfig field (w, steps, eta, ...): see with_sampler_options below
) -> None:
    """Make K synthetic positives per anchor of SOURCE with the generator MODEL; write shards + manifest to OUT.
    Rerun the same command to resume; finished shards are kept."""
    from clsp.accelerator import resolve_device
    from clsp.synth.job import config_from_options, run_synth

    cfg = config_from_options(
        preset, source=source, model=model, out=out, split=split, image_size=image_size, resize=resize, k=k,
        seed=seed, anchors_per_shard=anchors_per_shard, **sampler,
        batch_size=forward_batch, limit=limit, device=device,
        bf16=bf16_for(precision, resolve_device(device).type == "cuda"),
        compile=compile, overwrite=overwrite, score_reference=score_reference, codec=codec,
    )
    run_synth(cfg)


def with_sampler_options(command):
    """`command` with one keyword option per SamplerConfig field in place of its **sampler: the field's name, type,
    help (SAMPLER_HELP) and default, read from synth/sampler.py without importing it. A new sampler field is thereby
    a new option, recorded in the manifest and compared on resume, with no edit here."""
    kinds = {"float": float, "int": int, "bool": bool, "str": str}
    parameters = [p for p in inspect.signature(command).parameters.values() if p.kind is not p.VAR_KEYWORD]
    annotations = {p.name: p.annotation for p in parameters}
    for name, annotation, _ in SAMPLER_FIELDS:
        flag = "--" + name.replace("_", "-")
        option = typer.Option(None, flag, help=SAMPLER_HELP[name])  # None: unset, so the preset's value stands
        annotations[name] = Optional[kinds[annotation]]
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                            annotation=annotations[name]))
    command.__signature__ = inspect.Signature(parameters, return_annotation=None)
    command.__annotations__ = {**annotations, "return": None}
    return command


run = app.command("run")(with_sampler_options(run))


if __name__ == "__main__":  # `torchrun --nproc_per_node N -m clsp.synth.cli run ...` (or `-m clsp synth run ...`)
    import sys

    from clsp.cli import app as clsp_app  # through the `clsp` group: errors a user can fix become one `error:` line

    clsp_app(["synth", *sys.argv[1:]], prog_name="clsp")
