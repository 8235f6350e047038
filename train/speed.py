"""How the trainer runs fast on a GPU, done the same way by `clsp train run` and `python -m clsp.train.bench`.

- channels_last views on CUDA: the augmentation's output (B, 3, S, S) is laid out NHWC, so cuDNN's convolutions run
  their tensor-core NHWC kernels from the first layer on (the layout propagates through BatchNorm, ReLU and the
  residual adds). The weights keep the default layout, so checkpoints do not change (safetensors stores contiguous
  tensors only). The CPU keeps NCHW: CPU runs are bit-reproducible, and NHWC changes the last bits of mkldnn's sums.
- `--compile`: torch.compile, in place (`nn.Module.compile`), the encoders: the backbone and, for MoCo and BYOL, its
  momentum twin; they hold almost all the FLOPs. Losses, queues and heads stay eager (data-dependent code that would
  break graphs). The augmentation's stages are compiled too (`BatchAugment.compile_stages`: about 240 small ops a
  view eagerly, each a kernel launch on a GPU, three views a step), its draws staying eager. Compiling in place keeps
  the state-dict names (no `_orig_mod.` prefix), so checkpoints and backbone.safetensors are those of an eager run.
  Compiled code rounds differently from eager code, so a run records `compile` and a resume must match it. GPU runs
  only (clsp.vocabulary.CPU_COMPILE_REFUSED says why).
"""
from __future__ import annotations

import torch
from torch import nn

ENCODERS = ("backbone", "target_backbone")  # Method.backbone; MomentumMethod.target_backbone


def view_layout(device: torch.device) -> torch.memory_format:
    """The memory layout of the views fed to the model on `device`: NHWC on CUDA, NCHW elsewhere."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def to_view_layout(views: torch.Tensor) -> torch.Tensor:
    """views (B, 3, S, S) in the layout of their device (a no-op on the CPU)."""
    return views.contiguous(memory_format=view_layout(views.device))


def compile_encoders(method: nn.Module, backend: str = "inductor") -> list[str]:
    """torch.compile the method's encoders in place; returns their attribute names."""
    names = [name for name in ENCODERS if isinstance(getattr(method, name, None), nn.Module)]
    for name in names:
        getattr(method, name).compile(backend=backend)
    return names
