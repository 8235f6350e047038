"""What the benchmarks share: their common options, interleaved best-of timing, and a results file that says where its
figures come from (device, command, versions, date), so a figure quoted in the README can be checked against it.

    python -m clsp.synth.bench [--device cuda] [--out bench/results/sampler-h100.json]
    python -m clsp.train.bench [--device cuda] [--out bench/results/trainer-h100.json]
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

import typer

from clsp.file_io import write_atomic

DEVICE = typer.Option("cpu", help="cpu | cuda (the first GPU) | cuda:N")
THREADS = typer.Option(0, help="torch CPU threads; 0 keeps torch's choice (one per core)")
REPEATS = typer.Option(2, help="interleaved timed rounds; the best of each is reported")
OUT = typer.Option(None, help="also write the results as JSON here (bench/results/ holds the README's figures)")
# Dense bf16 tensor-core peak, FLOP/s, by a word of torch.cuda.get_device_name (first match wins, so "H100 PCIe"
# before "H100"); the datasheets' figures without sparsity. The SXM parts are "NVIDIA H100 80GB HBM3" and "NVIDIA
# H200"; the NVL (and PCIe) parts run at lower clocks and power; a GH200's GPU is an H100/H200 SXM.
PEAK_BF16_FLOPS = {"H200 NVL": 835e12, "GH200": 989e12, "H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,
                   "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
PACKAGES = ("clsp-positives", "torch", "triton", "diffusers", "accelerate", "webdataset", "numpy", "pillow", "kornia")


def set_threads(threads: int) -> None:
    import torch

    if threads < 0:
        raise typer.BadParameter(f"--threads must be >= 0 (0 = torch's choice), got {threads}")
    if threads:
        torch.set_num_threads(threads)


def on_cuda(device) -> bool:
    """Whether `device` (a torch.device or its name: "cpu", "cuda", "cuda:1") is a GPU."""
    return getattr(device, "type", str(device)).startswith("cuda")


def sync(device) -> None:
    import torch

    if on_cuda(device):
        torch.cuda.synchronize(device)


def best_of(variants: dict[str, Callable[[], object]], repeats: int, device) -> tuple[dict, dict]:
    """Run every variant `repeats` times, interleaved (one round runs each once), so load from elsewhere on a shared
    machine hits them alike; each round starts one variant later than the last, so that no variant always runs first
    (right after the set-up, or after the slowest) -> ({name: [seconds per round]}, {name: its output in the last
    round})."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    outputs: dict[str, object] = {}
    names = list(variants)
    for round_ in range(repeats):
        first = round_ % len(names)
        for name in names[first:] + names[:first]:
            run = variants[name]
            sync(device)
            start = time.perf_counter()
            outputs[name] = run()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times, outputs


def launches(run: Callable[[], object], device) -> int:
    """What `run()` asks of the device, each launch costing the host some microseconds: on a GPU the CUDA kernels (and
    copies) it launches, on the CPU the tensor ops it dispatches (the outermost aten op of each call, backward's too).
    A step that takes longer to launch than its kernels take to run leaves the GPU idle: what CUDA graphs remove."""
    from torch.profiler import ProfilerActivity, profile

    sync(device)  # work queued before the profile is not this run's
    with profile(activities=[ProfilerActivity.CUDA if on_cuda(device) else ProfilerActivity.CPU]) as prof:
        run()
        sync(device)
    if on_cuda(device):
        return sum(map(is_device_launch, prof.events()))
    return sum(e.name.startswith("aten::") and not (e.cpu_parent and e.cpu_parent.name.startswith("aten::"))
               for e in prof.events())


# Events of the CUDA device type that launch nothing: the ranges of record_function that kineto mirrors onto the
# GPU's timeline (optimizer steps, torch.compile's "Torch-Compiled Region" and "CompiledFunction", inductor's "## Call
# CompiledFxGraph"), and, where a profiler records them, the waits of synchronisations (torch's device-time totals and
# inductor's benchmarking leave both out, by these names).
NOT_LAUNCHES = {"gpu_user_annotation", "cuda_sync"}  # kineto activity types
SYNC_EVENTS = {"Context Sync", "Stream Sync", "Event Sync", "Stream Wait Event"}


def is_device_launch(event) -> bool:
    """Whether a profiler event is work launched on a GPU: a kernel, a copy or a memset."""
    import torch

    return (event.device_type == torch.autograd.DeviceType.CUDA and not getattr(event, "is_user_annotation", False)
            and getattr(event, "activity_type", None) not in NOT_LAUNCHES and event.name not in SYNC_EVENTS)


def launch_unit(device) -> str:
    return "CUDA kernels" if on_cuda(device) else "aten ops"


def device_name(device) -> str:
    import torch

    if on_cuda(device):
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return (f"{platform.processor() or platform.machine()} CPU, {threads} thread{'s' * (threads != 1)} "
            f"of {os.cpu_count()}")


def peak_bf16_flops(device) -> float | None:
    """The dense bf16 peak of a known GPU in FLOP/s; None on the CPU and on GPUs not in PEAK_BF16_FLOPS."""
    if not on_cuda(device):
        return None
    return gpu_peak_bf16_flops(device_name(device))


def gpu_peak_bf16_flops(name: str) -> float | None:
    """PEAK_BF16_FLOPS of the GPU called `name` (torch.cuda.get_device_name); whole words only, so an A10G is not
    taken for an A10. None for a MIG slice ("... MIG 3g.40gb"): it has a part of the GPU's multiprocessors."""
    if re.search(r"\bMIG\b", name):
        return None
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if re.search(rf"\b{key}\b", name)), None)


def provenance(device) -> dict:
    """Where a set of figures comes from: device, command, package versions, date (UTC)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    command = "python -m " + (sys.modules["__main__"].__spec__.name
                              if getattr(sys.modules["__main__"], "__spec__", None) else Path(sys.argv[0]).name)
    if on_cuda(device):  # the libraries the GPU's kernels come from
        import torch

        versions.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return {"device": device_name(device), "command": shlex.join([*command.split(), *sys.argv[1:]]),
            "versions": versions, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def write_results(results: dict, out: Path | None) -> None:
    """Print nothing; write `results` as JSON to `out` (atomically) when given."""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, (json.dumps(results, indent=2) + "\n").encode())
