"""`clsp train run SHARDS --out DIR ...`: options -> TrainConfig -> train.loop.train.

Several processes: `torchrun --nproc_per_node N -m clsp.train.cli run ...` or
`accelerate launch -m clsp.train.cli run ...`.
"""
from __future__ import annotations

from typing import Optional

import typer

from clsp.presets import source_defaults
from clsp.vocabulary import BATCH_SIZE_HELP, PRECISION_HELP, bf16_for

# --help shows each unset option's real default, read from TrainConfig and PRESETS (train.loop imports torch: too slow
# for --help, so it is imported only when a run starts)
PRESETS = source_defaults("clsp.train.loop", "PRESETS")
HELP_DEFAULTS = {"run": (source_defaults("clsp.train.loop", "TrainConfig"), PRESETS)}
app = typer.Typer(help="Contrastive training from shards (streaming, resumable, one or many processes).",
                  no_args_is_help=True)


@app.callback()
def main() -> None:
    """Contrastive training from shards."""


@app.command("run")
def run_command(
    shards: str = typer.Argument(
        ..., help="Shard directory or fsspec URL (file://, https://, s3://) with manifest.json."),
    out: str = typer.Option(
        ..., "--out", help="Run directory: checkpoint/, log.csv, backbone.safetensors, config.json."),
    preset: Optional[str] = typer.Option(None, help=f"Defaults for a known setting: {' | '.join(PRESETS)} "
                                         "(paper-cifar10: the paper's SimCLR CIFAR-10 schedule); options given here "
                                         "override it."),
    method: Optional[str] = typer.Option(None, help="simclr | moco | byol | nnclr."),
    positives: Optional[str] = typer.Option(None, help="synthetic (CLSP) | augment (third real view) | none."),
    lam: Optional[float] = typer.Option(None, help="Weight of the CLSP term (default: the method's; MoCo on CIFAR-100: the paper's is 0.2)."),
    backbone: Optional[str] = typer.Option(None, help="resnet18 | resnet50."),
    width: Optional[int] = typer.Option(None, help="Backbone stem channels (64 = standard ResNet)."),
    image_size: Optional[int] = typer.Option(None, help="Augmented view size (default: the shards' image size)."),
    epochs: Optional[int] = typer.Option(None, help="Passes over the anchors."),
    batch_size: Optional[int] = typer.Option(None, help=BATCH_SIZE_HELP.capitalize() + " (anchors, each seen in three "
                                             "views; split evenly over the processes)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (after warm-up)."),
    momentum: Optional[float] = typer.Option(None, help="SGD momentum."),
    weight_decay: Optional[float] = typer.Option(None, help="SGD weight decay."),
    warmup_epochs: Optional[float] = typer.Option(
        None, help="Linear warm-up epochs, then cosine to 0; when not given, at most a tenth of the run."),
    optimizer: Optional[str] = typer.Option(None, help="sgd."),
    proj_hidden: Optional[int] = typer.Option(None, help="Projector hidden width (default: the method's)."),
    proj_dim: Optional[int] = typer.Option(None, help="Projection size (default: the method's)."),
    temperature: Optional[float] = typer.Option(None, help="InfoNCE temperature: SimCLR, MoCo, NNCLR (default: the "
                                                "method's)."),
    queue_size: Optional[int] = typer.Option(None, help="MoCo queue / NNCLR support set size (default: the method's)."),
    seed: Optional[int] = typer.Option(None, help="Initial weights, augmentations and draws follow from it."),
    workers: Optional[int] = typer.Option(None, help="Loader processes per training process (streamed input)."),
    shuffle_buffer: Optional[int] = typer.Option(None, help="Samples mixed per loader process."),
    cache: Optional[bool] = typer.Option(
        None, "--cache/--no-cache", help="Decode every image once and train from memory (no loader processes); "
        "default: when one process's share fits in 4 GiB."),
    precision: Optional[str] = typer.Option(None, help=PRECISION_HELP + " (default: auto)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the encoders and the augmentation's stages: "
                                 "faster steps on a GPU after a first step that compiles (minutes); recorded, a resume "
                                 "must match it."),
    knn_every: Optional[int] = typer.Option(None, help="Epochs between kNN monitor runs (0: off)."),
    knn_source: Optional[str] = typer.Option(None, help="Labelled source for the kNN monitor, e.g. digits."),
    log_with: Optional[str] = typer.Option(
        None, help="Also log the scalars of log.csv to an Accelerate tracker: tensorboard (files in OUT/tracker/; "
        "pip install 'clsp-positives[tensorboard]'), wandb, mlflow, ... (default: log.csv only)."),
    skip_corrupt: bool = typer.Option(
        False, "--skip-corrupt", help="Skip unreadable shards (counted in summary.json)."),
    expect_k: Optional[int] = typer.Option(None, help="Refuse shards that do not hold this many positives per anchor."),
    positive_filter: Optional[str] = typer.Option(
        None, help="Draw only synthetic positives whose score passes METRIC OP NUMBER, e.g. distance>=0.05 or "
        "agreement>=0.5 (scores from the shards' index; an anchor with none left keeps its best one) (default: off)."),
    positive_weighting: Optional[str] = typer.Option(
        None, help="uniform | harder: draw a positive in proportion to its distance to the anchor (default: uniform)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out (same options); no-op if finished."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run already in --out."),
) -> None:
    """Train an encoder on shards; the backbone lands in OUT/backbone.safetensors."""
    options = dict(locals())
    preset = options.pop("preset")
    for flag in ("skip_corrupt", "resume", "overwrite", "compile"):
        options[flag] = options[flag] or None  # unset unless given, so a preset could set them
    import torch

    from clsp.train.loop import make_config, train

    options["bf16"] = bf16_for(options.pop("precision"), torch.cuda.is_available())

    out = train(make_config(preset, **options))
    from accelerate import PartialState

    if PartialState().is_main_process:  # once, not once per process: `RUN=$(accelerate launch ... train run ...)`
        typer.echo(out)


if __name__ == "__main__":  # torchrun / accelerate launch -m clsp.train.cli run ...
    import sys

    from clsp.cli import app as clsp_app  # through the `clsp` group: errors a user can fix become one `error:` line

    clsp_app(["train", *sys.argv[1:]], prog_name="clsp")
