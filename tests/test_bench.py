"""The benchmarks on tiny settings: every column is measured, what must be equal is equal (split and naive samplers,
the ratios and their parts), the results file says where its figures come from, and --compile on the CPU is refused.
Nothing here asserts a time."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import typer
from typer.testing import CliRunner

from clsp import bench as common
from clsp.bench import best_of, gpu_peak_bf16_flops, launches, peak_bf16_flops
from clsp.synth import bench as sampler_bench
from clsp.train import bench as trainer_bench

COLUMNS = {"split", "cpu-noise", "naive", "authors", "shared"}  # bf16-weights and graphed: CUDA only


def test_sampler_bench_measures_every_column_and_split_equals_naive(tmp_path):
    out = tmp_path / "results" / "sampler.json"
    app = typer.Typer()
    app.command()(sampler_bench.main)
    result = CliRunner().invoke(app, ["--steps", "1", "--batch", "8", "--k", "4", "--repeats", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "split / naive" in result.output
    figures = json.loads(out.read_text())
    assert set(figures["images_per_s"]) == COLUMNS and min(figures["images_per_s"].values()) > 0
    # the same positives, fewer FLOPs (up to float rounding: the encoder's convolutions see 2B rows in the split)
    assert figures["max_abs_diff_split_vs_naive"] < 1e-5
    rate = figures["images_per_s"]
    assert figures["speedup_split_over_authors"] == pytest.approx(rate["split"] / rate["authors"])
    assert 1.0 < figures["split_step_over_forward"] < 2.0  # one forward plus the anchor's encoder
    assert figures["naive_flops_per_image"] > figures["split_flops_per_image"]
    assert figures["shared_noise_flop_saving"] > 0
    launches = figures["launches_per_step"]  # one step's host-side work: the naive step's second UNet pass costs more
    assert launches["counted"] == "aten ops" and 0 < launches["split"] < launches["naive"]
    assert figures["config"]["steps"] == 1 and figures["config"]["batch"] == 8
    assert {"device", "command", "versions", "date"} <= figures.keys() and figures["versions"]["torch"]
    assert "speedup_bf16_weights_over_autocast" not in figures  # a CUDA column; the CPU path stays fp32
    assert "speedup_graphed_over_split" not in figures  # CUDA graphs: a CUDA column too


def test_trainer_bench_measures_training_and_every_input(tmp_path):
    cfg = trainer_bench.BenchConfig(width=4, size=8, batch=4, steps=1, anchors=8, k=2, repeats=1)
    figures = trainer_bench.bench(cfg)
    train, inputs = figures["train"], figures["inputs"]
    assert train["anchors_per_s"] > 0 and train["gflop_per_step"] > 0 and train["compile_s"] is None
    assert 0 < train["augmented_anchors_per_s"] and train["augment_share_of_step"] == pytest.approx(
        1 - train["augmented_anchors_per_s"] / train["anchors_per_s"])
    assert train["view_layout"] == "contiguous_format"  # NCHW on the CPU (NHWC on CUDA: train.speed)
    # ResNet-18's 20 convolutions, forward and backward, at least: the step's host-side work
    assert train["launches_counted"] == "aten ops" and train["launches_per_step"] > 40
    for name in ("loader", "loader_raw", "stream", "stream_raw", "cached", "augment", "pil"):
        assert inputs[f"{name}_anchors_per_s"] > 0, name
    assert figures["cached_over_train"] == pytest.approx(inputs["cached_anchors_per_s"] / train["anchors_per_s"])
    assert figures["raw_loader_over_train"] == pytest.approx(inputs["loader_raw_anchors_per_s"] /
                                                             train["anchors_per_s"])
    assert min(figures["shard_bytes"].values()) > 0


@pytest.mark.parametrize("config", [lambda: sampler_bench.BenchConfig(compile=True),
                                    lambda: trainer_bench.BenchConfig(compile=True)])
def test_compile_is_refused_on_the_cpu(config):
    with pytest.raises(ValueError, match="--compile is for GPU runs"):
        config()


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12),
                                        ("NVIDIA H200 NVL", 835e12), ("NVIDIA GH200 480GB", 989e12),
                                        ("NVIDIA H100 80GB HBM3 MIG 3g.40gb", None),  # a part of the GPU
                                        ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A10", 125e12),
                                        ("NVIDIA A10G", None), ("NVIDIA GeForce RTX 4090", None)])
def test_the_peak_behind_fraction_of_peak_is_the_named_gpus(name, peak):
    assert gpu_peak_bf16_flops(name) == peak
    assert peak_bf16_flops("cpu") is None  # no fraction of peak is claimed on a CPU


def test_best_of_interleaves_the_variants_and_rotates_which_runs_first():
    calls = []
    variants = {name: (lambda name=name: calls.append(name) or name.upper()) for name in "abc"}
    times, outputs = best_of(variants, 4, "cpu")
    assert calls == list("abc" "bca" "cab" "abc")  # a position in the round is no variant's for good
    assert {name: len(seconds) for name, seconds in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert outputs == {"a": "A", "b": "B", "c": "C"}


def test_flop_figures_from_per_step_counts_worked_by_hand():
    # per image and step: a forward 10 FLOP, its encoder 3; split = forward + anchor's encoder = 13; naive = 2
    # forwards = 20; shared anchor noise at K = 4 runs the anchor's encoder once per 4 rows: 10 + 3 / 4 = 10.75
    flops = {"forward": 10.0, "encoder": 3.0, "split": 13.0, "naive": 20.0, "split_shared": 10.75}
    rate = {"split": 2.0, "naive": 1.0, "shared": 4.0, "authors": 1.5}  # images/s
    figures = sampler_bench._flop_figures(flops, 100, rate, peak=1e4)
    assert figures["split_flops_per_image"] == 1300 and figures["naive_flops_per_image"] == 2000  # 100 steps
    assert figures["tflop_per_s"] == pytest.approx({"split": 2600e-12, "naive": 2000e-12, "shared": 4300e-12,
                                                    "authors": 1950e-12})  # the authors' recipe does the split's work
    assert figures["fraction_of_peak"] == pytest.approx({"split": 0.26, "naive": 0.2, "shared": 0.43, "authors": 0.195})
    assert figures["split_step_over_forward"] == 1.3 and figures["encoder_share_of_forward"] == 0.3
    assert figures["shared_noise_flop_saving"] == pytest.approx(2.25 / 13)


def test_gpu_launches_are_kernels_copies_and_memsets_not_the_annotations_on_the_gpu_timeline(monkeypatch):
    # what kineto hands back for a CUDA-only profile: device work, plus the record_function ranges (optimizer steps,
    # torch.compile's regions) that it mirrors onto the GPU's timeline as user annotations of the CUDA device type
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [SimpleNamespace(name=name, device_type=device, is_user_annotation=kind == "gpu_user_annotation",
                              activity_type=kind)
              for name, device, kind in [
                  ("void at::native::elementwise_kernel<...>", cuda, "kernel"),
                  ("triton_poi_fused_add_0", cuda, "kernel"), ("sm90_xmma_fprop_implicit_gemm_bf16", cuda, "kernel"),
                  ("Memcpy HtoD (Pageable -> Device)", cuda, "gpu_memcpy"), ("Memset (Device)", cuda, "gpu_memset"),
                  ("Optimizer.step#SGD.step", cuda, "gpu_user_annotation"),
                  ("Torch-Compiled Region: 0/0", cuda, "gpu_user_annotation"), ("Context Sync", cuda, "cuda_sync"),
                  ("cudaLaunchKernel", cpu, "cuda_runtime")]]
    asked = []

    class Profile:
        def __init__(self, activities):
            asked.extend(activities)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def events(self):
            return events

    monkeypatch.setattr(torch.profiler, "profile", Profile)
    monkeypatch.setattr(common, "sync", lambda device: None)  # no GPU here
    assert launches(lambda: None, "cuda") == 5
    assert asked == [torch.profiler.ProfilerActivity.CUDA]


def test_a_variant_that_fails_its_warm_up_is_named_and_the_others_still_measured(monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(sampler_bench, "authors_recipe", broken)
    out = tmp_path / "sampler.json"
    app = typer.Typer()
    app.command()(sampler_bench.main)
    result = CliRunner().invoke(app, ["--steps", "1", "--batch", "8", "--k", "4", "--repeats", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "authors" in result.output and "FAILED in its warm-up: RuntimeError: no kernel image" in result.output
    figures = json.loads(out.read_text())  # written, with every other column
    assert figures["failed"] == {"authors": "RuntimeError: no kernel image is available for execution on the device"}
    assert set(figures["images_per_s"]) == COLUMNS - {"authors"} and "speedup_split_over_authors" not in figures
    assert figures["speedup_split_over_naive"] > 0 and figures["diversity_shared_anchor_noise"] > 0

    monkeypatch.setattr(sampler_bench, "naive_reference", broken)  # split and naive are every ratio's base
    with pytest.raises(RuntimeError, match="no kernel image"):
        sampler_bench.run_bench(sampler_bench.BenchConfig(steps=1, batch=8, k=4, repeats=1))


def test_the_compiled_bench_makes_static_graphs_and_keeps_one_per_variant_and_shape(monkeypatch):
    import torch._dynamo
    import torch._inductor.config

    import clsp.synth.job_setup
    import clsp.synth.noise

    compiled = []

    def compile_blocks(unet, **kwargs):  # what the bench asks of torch.compile, and dynamo's limit at that moment
        compiled.append((kwargs, torch._dynamo.config.recompile_limit))
        assert torch._inductor.config.deterministic  # as the job compiles: no kernel picked by timing it
        return unet

    assert torch._dynamo.config.recompile_limit == 8  # torch's default
    monkeypatch.setattr(clsp.synth.job_setup, "compile_blocks", compile_blocks)
    monkeypatch.setattr(clsp.synth.noise, "compiled_counter_normal", lambda backend: clsp.synth.noise.counter_normal)
    cfg = sampler_bench.BenchConfig(steps=1, batch=8, k=4, repeats=1)
    object.__setattr__(cfg, "compile", True)  # refused on the CPU; the compile itself is what is replaced here
    figures = sampler_bench.run_bench(cfg)
    # one graph per batch shape (the job's static graphs), never a dynamic one that would serve the split's 2B rows in
    # place of its own; the DDPM UNet's DownBlock2D needs 15 (3 blocks x 5 variant states and shapes)
    assert [kwargs for kwargs, _ in compiled] == [{"dynamic": False}]  # the fp32 UNet (bf16 weights: CUDA only)
    assert min(limit for _, limit in compiled) >= 16
    assert figures["failed"] == {} and "warmup_s" in figures
    assert figures["compiled_graphs"] == 0 and figures["recompile_limit_hits"] == 0  # nothing compiled here
    assert "graphs compiled" in sampler_bench.format_table(figures)
    assert torch._dynamo.config.recompile_limit == 8  # the bench's limit ends with it


def test_skipped_variants_are_left_out_but_split_and_naive_never(tmp_path):
    out = tmp_path / "sampler.json"
    app = typer.Typer()
    app.command()(sampler_bench.main)
    result = CliRunner().invoke(app, ["--steps", "1", "--batch", "8", "--k", "4", "--repeats", "1", "--out", str(out),
                                      "--skip", "authors, cpu-noise"])
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    assert set(figures["images_per_s"]) == COLUMNS - {"authors", "cpu-noise"} and figures["failed"] == {}
    assert figures["config"]["skip"] == ["authors", "cpu-noise"]
    with pytest.raises(ValueError, match="--skip takes variants among cpu-noise, authors, shared, bf16-weights, gra"):
        sampler_bench.BenchConfig(skip=("naive",))
