"""The split sampler's whole denoising loop as one CUDA graph, captured once per batch layout and replayed per batch.

At 32 px a DDIM step of the DDPM CIFAR-10 UNet is about a thousand short kernels (the bench's launches per step), so
the host's time to launch them can match the GPU's time to run them. A graph replays every kernel of every step from
one launch. What makes the loop capturable: a prepared DenoisingLoop (synth/sampler.py) reads nothing back from the
device and copies nothing onto it (tests/test_cuda_graph.py checks this on the meta device), its noise is the counter
noise drawn on the device from key tensors that stay in place, and autocast runs without its weight cache.

The graph holds its inputs (the anchors and the noise keys) and its output in fixed tensors: a call copies the batch's
anchors and keys in, replays, and returns a copy of the output. Replays launch the kernels the capture recorded, those
of the eager loop it ran. So far this is a benchmark variant (synth/bench.py "graphed"); the job runs the eager loop.
"""
from __future__ import annotations

import copy

import torch
from diffusers import UNet2DModel

from clsp.synth.noise import CounterNoise
from clsp.synth.sampler import DenoisingLoop, SamplerConfig, check_batch, mixed_eps


class GraphedSampler:
    """sample_positives for one batch layout (rows, anchor-noise groups, image shape) as a replayed CUDA graph.

    Built from a first batch (anchors (B, C, H, W) in [-1, 1] and its CounterNoise), which it samples twice: once to
    warm up (cuDNN and cuBLAS handles, compiled blocks) on a side stream, once while capturing."""

    def __init__(self, unet: UNet2DModel, scheduler, anchors: torch.Tensor, noise: CounterNoise,
                 config: SamplerConfig, *, fast: bool = True):
        device = unet.conv_in.weight.device
        if device.type != "cuda":
            raise ValueError(f"a CUDA graph needs the UNet on a CUDA device, not {device}. Fix: move the UNet to "
                             "cuda, or call sample_positives.")
        if not isinstance(noise, CounterNoise):
            raise ValueError(f"a CUDA graph needs the counter noise drawn on the device, got {type(noise).__name__}. "
                             "Fix: build the noise with synth.noise.row_noise('counter', ...).")
        self.noise = copy.deepcopy(noise)  # its own: its key tensors on the device are the graph's noise inputs
        self.loop = DenoisingLoop.prepare(mixed_eps, unet, scheduler, anchors, self.noise, config, fast)
        # (B, C, H, W), the graph's anchor input: a copy, so that a call never writes into the caller's tensor
        self.anchors = anchors.to(device=device, dtype=torch.float32, copy=True)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.inference_mode():
            self.loop.run(self.anchors, self.noise)  # warm-up: nothing runs for the first time inside the capture
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # captured on `side`, a stream of the UNet's device: torch.cuda.graph's default capture stream is made once per
        # process on whatever device was current then (cuda:0), where the loop's kernels on cuda:N would not be
        # recorded (an empty graph, whose replays return the capture's positives)
        with torch.inference_mode(), torch.cuda.graph(self.graph, stream=side):
            self.positives = self.loop.run(self.anchors, self.noise)  # (B, C, H, W), rewritten by every replay

    def __call__(self, anchors: torch.Tensor, noise: CounterNoise) -> torch.Tensor:
        """anchors (B, C, H, W) in [-1, 1] with their CounterNoise, laid out as the first batch -> positives (B, C,
        H, W) in [-1, 1] on the device: what sample_positives returns for them."""
        check_batch(self.loop.unet, anchors, noise, self.loop.config)  # the counter noise, as the config's
        if anchors.shape != self.anchors.shape or not torch.equal(noise.anchor_row, self.noise.anchor_row):
            raise ValueError(f"this graph was captured for {tuple(self.anchors.shape)} anchors with anchor-noise "
                             f"groups {self.noise.anchor_row.tolist()}; got {tuple(anchors.shape)} and "
                             f"{noise.anchor_row.tolist()}. Fix: capture a GraphedSampler per batch layout, or call "
                             "sample_positives.")
        self.anchors.copy_(anchors)
        self.noise.set_keys(noise)
        with torch.cuda.device(self.anchors.device):  # replay launches on the current device's stream
            self.graph.replay()
        with torch.inference_mode():
            return self.positives.clone()
