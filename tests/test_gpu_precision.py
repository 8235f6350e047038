"""What a GPU run computes that a CPU run does not, checked on the CPU: accelerate runs Method.forward, losses
included, under bf16 autocast on a GPU, and the synth job compiles its UNet for static shapes."""
import math

import pytest
import torch
import torch.nn.functional as F

from clsp.train.backbones import build_backbone
from clsp.train.losses import info_nce, moco_infonce, nnclr_loss
from clsp.train.methods import MethodConfig, build_method


def bf16_autocast():
    # CPU autocast runs matmuls in bf16 as CUDA's does; its list of fp32 ops is shorter (log_softmax stays bf16 here)
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("loss", ["info_nce", "moco", "nnclr"])
def test_the_losses_compute_in_fp32_under_bf16_autocast(loss):
    g = torch.Generator().manual_seed(0)
    a, b, queue = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g), torch.randn(32, 8, generator=g)
    call = {"info_nce": lambda: info_nce(torch.cat([a, b]), torch.arange(16).repeat(2), 0.2),
            "moco": lambda: moco_infonce(a, b, queue, 0.2),
            "nnclr": lambda: nnclr_loss(a, b, 0.2)}[loss]
    fp32 = call()
    with bf16_autocast():
        on_gpu = call()
    assert on_gpu.dtype == torch.float32 and torch.equal(on_gpu, fp32)


def test_nnclr_takes_the_nearest_neighbour_under_bf16_autocast():
    backbone, dim = build_backbone("resnet18", width=4)
    method = build_method("nnclr", backbone, dim, MethodConfig.for_method("nnclr", proj_dim=2, queue_size=4)).eval()
    z = torch.tensor([[1.0, 0.0]])
    # slot 0 at cosine 0.988, slot 1 at 0.990: both round to 0.98828125 in bf16, and argmax takes the first
    method.support.enqueue(torch.tensor([[c, math.sqrt(1 - c * c)] for c in (0.988, 0.990)]))
    assert torch.equal(method.nearest(z), method.support.get()[1:])
    with bf16_autocast():
        assert torch.equal(method.nearest(z), method.support.get()[1:])


def test_a_compiled_synth_job_compiles_static_graphs_and_keeps_every_shape_compiled(generator, tmp_path, monkeypatch):
    """One graph per batch shape, as the bench measures them (tests/test_bench.py): with dynamo's automatic dynamic
    shapes a shard's full batches ran on the static graph in a fresh process but on the dynamic one after a shard's
    last, smaller batch, so a resumed run (or another rank) sampled the same shard on other kernels; past dynamo's
    default of 8 graphs a block ran eagerly; and inductor may pick a reduction's kernel by timing the candidates.
    torch.compile itself is replaced here (--compile is for GPUs)."""
    import torch._dynamo
    import torch._inductor.config

    import clsp.synth.job as job
    import clsp.synth.job_setup as job_setup
    import clsp.synth.noise as noise
    from clsp.synth.job import SynthConfig, run_synth
    from clsp.synth.sampler import SamplerConfig

    asked, limits, sample = [], [], job.sample_positives
    monkeypatch.setattr(job_setup, "compile_blocks", lambda unet, **kwargs: asked.append(kwargs) or unet)
    monkeypatch.setattr(noise, "compiled_counter_normal", lambda backend: noise.counter_normal)
    monkeypatch.setattr(job, "sample_positives", lambda *args, **kwargs: limits.append(
        (torch._dynamo.config.recompile_limit, torch._inductor.config.deterministic)) or sample(*args, **kwargs))
    cfg = SynthConfig(source="digits", model=str(generator), out=tmp_path / "shards", image_size=8, k=2,
                      device="cpu", sampler=SamplerConfig(steps=2), anchors_per_shard=3, limit=5)
    object.__setattr__(cfg, "compile", True)  # refused on the CPU; the compile itself is what is replaced here
    run_synth(cfg)
    assert asked == [{"dynamic": False}]
    # two shards of 3 and 2 anchors, each sampled with room for its graphs and no kernel picked by timing it
    assert len(limits) == 2 and all(limit >= 16 and deterministic for limit, deterministic in limits)
    assert torch._dynamo.config.recompile_limit == 8 and not torch._inductor.config.deterministic  # they end with it
