"""One meaning per option name across the stages (README, "One vocabulary"). Imports nothing heavy: every CLI module
reads its help strings from here before torch is loaded.

  --precision      auto (bf16 autocast on a GPU, fp32 on the CPU) | bf16 (GPUs only) | fp32, in every stage that
                   runs a network for long (generator training, synth, training); evaluation computes features and
                   probes in fp32, and its sampling (sweep, quality) is as synth's.
  --device         auto | cpu | cuda | cuda:N, default auto, where a stage runs in one process (eval, sweep,
                   quality); synth takes auto | cpu | cuda (CUDA_VISIBLE_DEVICES picks the GPU); the training
                   stages use the GPU of each process when there is one (Accelerate).
  --batch-size     training only: examples per optimizer step over all processes (images for the generator, anchors
                   for contrastive training, each seen in three views).
  --forward-batch  inference only: images per forward pass per process (synth, sweep, quality, eval); it sets memory
                   use, and float sums round by it (the synth job records it; evaluation under computed_with).
  positional       the thing a command acts on (a source, shards, a run, a generator); what it reads besides is an
                   option (`clsp eval all RUN --shards SHARDS`).
"""
from __future__ import annotations

from clsp.errors import UserError

PRECISIONS = ("auto", "bf16", "fp32")
SPEC_HELP = "digits | parquet:PATH_OR_GLOB | folder:DIR | cifar10:DIR | cifar100:DIR | stl10:DIR"  # a source
POSITIVES = ("synthetic", "augment", "none")  # --positives, the third view: synthetic positive, third real view, none
PRECISION_HELP = "auto (bf16 autocast on a GPU, fp32 on the CPU) | bf16 (GPUs only) | fp32"
DEVICE_HELP = "auto (a GPU when one is visible, else the CPU) | cpu | cuda | cuda:N"
# the synth job may run one process per GPU, each taking its own: CUDA_VISIBLE_DEVICES picks them, not cuda:N
SYNTH_DEVICE_HELP = "auto (a GPU when one is visible, else the CPU) | cpu | cuda (CUDA_VISIBLE_DEVICES picks the GPU)"
FORWARD_BATCH_HELP = "images per forward pass per process (memory use; float sums round by it)"
BATCH_SIZE_HELP = "examples per optimizer step over all processes"
# --compile (synth, train and their benches) is for GPUs. On the CPU, torch 2.13's inductor lays convolutions out NHWC,
# and a compiled width-4 ResNet-18 training step corrupted the heap here every time ("realloc(): invalid old size", in
# the compiled backward's aten.convolution_backward on NHWC tensors); the same eager model fed NHWC views did so now
# and then, which is one more reason the CPU path stays NCHW (train.speed). Heap corruption in compiled conv +
# normalisation CPU code is a known torch regression (pytorch/pytorch#181618), and a CPU run gains little from it.
CPU_COMPILE_REFUSED = ("--compile is for GPU runs and this one runs on the CPU: torch's compiled CPU code for "
                       "convolutions with normalisation layers can corrupt memory (pytorch/pytorch#181618), and a CPU "
                       "run gains little from it. Fix: leave --compile out on the CPU.")
# A run folder's hint when its source's fingerprint differs. The fingerprint covers the split and image size too, so
# other options change it as well; with the same options, the images changed
SOURCE_CHANGED = ("if the options are the same, the source now reads other images than the run began with (changed "
                  "since, or another source): put back the images it began with")


def bf16_for(precision: str | None, cuda: bool) -> bool | None:
    """--precision -> whether to autocast in bf16 (None: not given, the stage's default: auto). bf16 is used on GPUs
    only: asked for on a run without one, it is refused rather than silently ignored."""
    if precision is None:
        return None
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and not cuda:
        raise UserError("--precision bf16 is for GPUs and this run is on the CPU: use --precision auto or fp32")
    return precision != "fp32"
