"""What lets the sampler's loop be captured as one CUDA graph (synth/cuda_graph.py), checked without a GPU: a prepared
loop, run on the meta device, neither reads a tensor's value on the host nor moves a CPU tensor onto the device; and the
graph's key tensors take a new batch's keys in place. The capture itself needs CUDA (the last test)."""

import pytest
import torch
from conftest import host_traffic
from diffusers import DDIMScheduler

from clsp.synth.cuda_graph import GraphedSampler
from clsp.synth.noise import row_noise
from clsp.synth.sampler import DenoisingLoop, SamplerConfig, mixed_eps, sample_positives
from clsp.synth.untrained_unets import ddpm_cifar10_scheduler, ddpm_cifar10_unet, tiny_unet

SHAPE = (3, 16, 16)
IDS = ["a0", "a1"]
K = 2


def anchors_and_noise(kind: str, share: bool, seed: int = 0, ids: list[str] = IDS, size: int = 16):
    one_each = torch.rand((len(ids), 3, size, size), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return one_each.repeat_interleave(K, dim=0), row_noise(kind, seed, ids, K, share)  # (B, 3, 16, 16), B = 4


def loop_traffic(kind: str, share: bool, eta: float, model: str = "tiny") -> list[str]:
    """The host traffic of a prepared loop's run (2 steps) with every tensor on the meta device; model "ddpm-cifar10":
    the bench's GPU UNet (attention at 16 x 16, 32 px), built on the meta device."""
    if model == "ddpm-cifar10":
        with torch.device("meta"):
            unet, scheduler, size = ddpm_cifar10_unet(), ddpm_cifar10_scheduler(), 32
    else:
        unet, size = tiny_unet(sample_size=16, block_out_channels=(8, 16)).to("meta"), 16
        scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    anchors, noise = anchors_and_noise(kind, share, size=size)
    config = SamplerConfig(steps=2, eta=eta, share_anchor_noise=share, noise=kind)
    loop = DenoisingLoop.prepare(mixed_eps, unet, scheduler, anchors, noise, config, True)
    anchors = anchors.to("meta")
    with torch.inference_mode(), host_traffic() as seen:
        positives = loop.run(anchors, noise)
    assert positives.shape == anchors.shape and positives.device.type == "meta"
    return seen


@pytest.mark.parametrize("share, eta, model", [(False, 0.1, "tiny"), (True, 0.1, "tiny"), (False, 0.0, "tiny"),
                                               (True, 0.1, "ddpm-cifar10")])
def test_a_prepared_loop_does_device_work_only(share, eta, model):
    assert loop_traffic("counter", share, eta, model) == []


def test_the_watch_sees_the_cpu_generators_copies():
    """The check above can fail: the CPU generators' noise is drawn on the host and copied over every step."""
    assert len(loop_traffic("cpu-generator", False, 0.1)) == 5  # x_T, then per step (2) the anchor and variance noise


def test_set_keys_makes_the_noise_draw_the_other_batchs_noise():
    _, graph_noise = anchors_and_noise("counter", True)
    graph_noise.to_device(torch.device("meta"))  # a device copy of the keys that must follow too
    other = row_noise("counter", 7, ["b0", "b1"], K, True)
    held = graph_noise._keys(torch.device("meta"))[0]
    graph_noise.set_keys(other)
    assert graph_noise._keys(torch.device("meta"))[0] is held  # in place: a captured graph reads this memory
    assert torch.equal(graph_noise.start(SHAPE, "cpu"), other.start(SHAPE, "cpu"))
    assert torch.equal(graph_noise.anchor(1, SHAPE, "cpu"), other.anchor(1, SHAPE, "cpu"))
    with pytest.raises(ValueError, match="need keys for 4 rows in 2 groups, got 6 rows in 3 groups"):
        graph_noise.set_keys(row_noise("counter", 7, ["b0", "b1", "b2"], K, True))


def test_a_graph_is_refused_off_cuda():
    unet = tiny_unet(sample_size=16, block_out_channels=(8, 16))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    anchors, noise = anchors_and_noise("counter", False)
    with pytest.raises(ValueError, match="needs the UNet on a CUDA device, not cpu"):
        GraphedSampler(unet, scheduler, anchors, noise, SamplerConfig(steps=2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures a CUDA graph: needs a CUDA device")
@pytest.mark.parametrize("fast", [False, True])
def test_replays_give_the_eager_loops_positives_for_each_batch(fast):
    unet = tiny_unet(sample_size=16, block_out_channels=(8, 16)).to("cuda").eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    config = SamplerConfig(steps=3, eta=0.1, share_anchor_noise=True)
    anchors, noise = anchors_and_noise("counter", True)
    on_device = anchors.to("cuda")  # float32 on the device already: the graph must still keep its own copy
    graphed = GraphedSampler(unet, scheduler, on_device, noise, config, fast=fast)
    # the first batch again, then others; one of the last two has its anchor keys in descending order (the layout
    # must not follow the keys' order)
    for seed, ids in ((0, IDS), (5, ["c0", "c1"]), (6, ["d0", "d1"]), (7, ["d1", "d0"])):
        batch_anchors, batch_noise = anchors_and_noise("counter", True, seed, ids)
        expected = sample_positives(unet, scheduler, batch_anchors, batch_noise, config, fast=fast)
        assert torch.equal(graphed(batch_anchors, batch_noise), expected)
    assert torch.equal(on_device.cpu(), anchors)  # the calls' anchors went into the graph's copy, not this tensor
    with pytest.raises(ValueError, match="captured for .* Fix: capture a GraphedSampler per batch layout"):
        graphed(anchors, row_noise("counter", 0, IDS, K, False))
