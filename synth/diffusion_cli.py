"""`clsp diffusion train SOURCE --out DIR`: train an unconditional DDPM generator for `clsp synth run`;
`clsp diffusion convert DIR`: safetensors for a .bin-only generator; `clsp diffusion eval DIR`: its quality.

One process, or many under torchrun / accelerate launch (the batch is global and split across processes).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from clsp.errors import UserError
from clsp.presets import preset_values, source_defaults
from clsp.vocabulary import BATCH_SIZE_HELP, DEVICE_HELP, FORWARD_BATCH_HELP, PRECISION_HELP, SPEC_HELP, bf16_for

PRECISION_TO_MIXED = {"auto": "auto", "bf16": "bf16", "fp32": "no"}  # --precision -> the config's mixed_precision

# --help shows each unset option's default from DiffusionTrainConfig and PRESETS (read without importing torch)
HELP_DEFAULTS = {"train": (source_defaults("clsp.synth.diffusion_train", "DiffusionTrainConfig"),
                           source_defaults("clsp.synth.diffusion_train", "PRESETS"))}
app = typer.Typer(help="Train, convert and evaluate unconditional diffusion generators (one per dataset, as CLSP "
                  "does).", no_args_is_help=True)


@app.callback()
def diffusion() -> None:
    """Train, convert and evaluate unconditional diffusion generators (one per dataset, as CLSP does)."""


@app.command("train")
def train(
    source: str = typer.Argument(..., help=SPEC_HELP),
    out: Path = typer.Option(..., "--out", help="run directory; the generator (unet/, scheduler/) is written here"),
    preset: Optional[str] = typer.Option(None, help="embedded (small UNet for 16 px digits, ~46 min on one CPU thread) "
                                         "| ddpm-cifar10 (the DDPM CIFAR-10 settings)"),
    split: Optional[str] = typer.Option(None, help="train | test | all"),
    image_size: Optional[int] = typer.Option(None, help="read the source at this size (default: its native size)"),
    channels: Optional[str] = typer.Option(None, help="UNet widths, one per level"),
    layers_per_block: Optional[int] = typer.Option(None, help="res blocks per level"),
    attention_levels: Optional[str] = typer.Option(None, help="levels (0-based) with self-attention, or none"),
    norm_groups: Optional[int] = typer.Option(None, help="GroupNorm groups; divides every width"),
    dropout: Optional[float] = typer.Option(None, help="dropout in the res blocks"),
    train_timesteps: Optional[int] = typer.Option(None, help="T; betas linear 1e-4..0.02"),
    batch_size: Optional[int] = typer.Option(None, help=BATCH_SIZE_HELP + " (images)"),
    lr: Optional[float] = typer.Option(None, help="AdamW learning rate"),
    lr_schedule: Optional[str] = typer.Option(None, help="constant | cosine, after warm-up"),
    warmup_steps: Optional[int] = typer.Option(None, help="linear warm-up steps"),
    steps: Optional[int] = typer.Option(None, help="training steps"),
    snr_gamma: Optional[float] = typer.Option(None, help="Min-SNR loss weighting gamma; 0 = plain DDPM loss"),
    skip_dropout: Optional[float] = typer.Option(None, help="probability that a sample's below-full-resolution skips "
                                                 "are replaced in training, so the bottleneck carries shape"),
    skip_fill: Optional[str] = typer.Option(None, help="what replaces them: zero | shuffle (another image's skips)"),
    ema_decay: Optional[float] = typer.Option(None, help="EMA decay of the saved weights"),
    hflip: Optional[bool] = typer.Option(None, "--hflip/--no-hflip", help="random horizontal flips"),
    precision: Optional[str] = typer.Option(None, help=PRECISION_HELP + " (default: auto)"),
    seed: Optional[int] = typer.Option(None, help="init, batches and noise all follow from it"),
    checkpoint_every: Optional[int] = typer.Option(None, help="steps between checkpoints + sample grids"),
    keep_checkpoints: Optional[int] = typer.Option(None, help="newest checkpoints kept"),
    sample_steps: Optional[int] = typer.Option(None, help="DDIM steps for the sample grids"),
    grid_size: Optional[int] = typer.Option(None, help="images per sample grid"),
    resume: Optional[bool] = typer.Option(None, "--resume", help="continue from the newest checkpoint in OUT"),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="replace a run in OUT made with other settings"),
) -> None:
    """Train a DDPM on SOURCE; checkpoints, sample grids and the final EMA generator go to OUT."""
    import shlex
    import sys

    import torch

    from clsp.synth.diffusion_train import train_diffusion

    bf16 = bf16_for(precision, torch.cuda.is_available())  # checks the value; the generator's config keeps its names

    cfg = config_from_options(
        preset, out=out, source=source, split=split, image_size=image_size,
        channels=int_list(channels, "--channels"), layers_per_block=layers_per_block,
        attention_levels=int_list(attention_levels, "--attention-levels"), norm_groups=norm_groups, dropout=dropout,
        train_timesteps=train_timesteps, batch_size=batch_size, lr=lr, lr_schedule=lr_schedule,
        warmup_steps=warmup_steps, steps=steps, snr_gamma=snr_gamma, skip_dropout=skip_dropout, skip_fill=skip_fill,
        ema_decay=ema_decay, hflip=hflip, mixed_precision=None if bf16 is None else PRECISION_TO_MIXED[precision],
        seed=seed, checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints, sample_steps=sample_steps, grid_size=grid_size, resume=resume,
        overwrite=overwrite,
    )
    train_diffusion(cfg, command=shlex.join(["clsp", *sys.argv[1:]]))


def config_from_options(preset: str | None, **options):
    """Preset values, overridden by the options that were given (None = not given)."""
    from clsp.synth.diffusion_train import PRESETS, DiffusionTrainConfig

    return DiffusionTrainConfig(**preset_values(PRESETS, preset, options))


def int_list(text: str | None, what: str) -> tuple[int, ...] | None:
    """'32,64,64' -> (32, 64, 64); '' or 'none' -> ()."""
    if text is None:
        return None
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"{what} {text!r}: give comma-separated integers, e.g. 32,64,64") from None


@app.command("convert")
def convert_command(
    generator: Path = typer.Argument(..., help="generator dir whose weights are only diffusion_pytorch_model.bin "
                                     "(e.g. a local copy of a hub repo)"),
) -> None:
    """Write safetensors weights beside a .bin-only generator, from its tensors only (torch.load weights_only=True:
    pickled code is refused), so that it loads. Run it only for a file you trust; nothing is overwritten."""
    from clsp.synth.convert_weights import convert_pickle_weights

    done = convert_pickle_weights(generator)
    typer.echo(f"wrote {done['path']} ({done['tensors']} tensors)")
    typer.echo(f"weights sha256 {done['weights_sha256']} (the fingerprint `clsp synth run` records for it)")


@app.command("eval")
def eval_command(
    generator: str = typer.Argument(..., help="generator dir (from clsp diffusion train --out) or hub id"),
    source: Optional[str] = typer.Option(None, help=f"labelled real data: {SPEC_HELP}; default: the source in "
                                         "the generator's card"),
    split: Optional[str] = typer.Option(None, help="real split to compare with; default: the card's, else train"),
    out: Optional[Path] = typer.Option(None, help="directory for quality.json and quality.md; default: the generator"),
    samples: int = typer.Option(1000, help="plain samples generated (and at most as many real images)"),
    steps: int = typer.Option(50, help="DDIM steps of the plain samples"),
    eta: float = typer.Option(0.0, help="DDIM eta of the plain samples"),
    seed: int = typer.Option(0, help="sample noise and real sample"),
    neighbours: int = typer.Option(3, help="k of the k-NN manifolds for precision and recall"),
    components: int = typer.Option(32, help="PCA components of the fixed pixel feature space"),
    forward_batch: int = typer.Option(256, help=FORWARD_BATCH_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    inception_weights: Optional[Path] = typer.Option(None, help="local torch-fidelity Inception-v3 weights (.pth): "
                                                     "adds real FID; needs the optional extra fid (torchmetrics)"),
) -> None:
    """Offline quality of a generator: Frechet distance, precision/recall and confident samples (+ FID if asked)."""
    from clsp.eval.quality import QualityConfig, run_quality
    from clsp.run_dir import check_out_path

    if out is not None:
        check_out_path(out)
    try:
        config = QualityConfig(generator, source, split, None if out is None else str(out), samples, steps, eta,
                               seed, neighbours, components, forward_batch, device,
                               None if inception_weights is None else str(inception_weights))
        written = run_quality(config)
    except ValueError as error:
        raise UserError(str(error)) from None
    typer.echo(written["md"].read_text())
    typer.echo(f"wrote {written['json']} and {written['md']}" +
               ("; recorded in the generator's card.json and README.md" if written["card"] else ""))
