"""Where and with what a generator was trained, for its card."""
from __future__ import annotations

import torch


def machine_info(device: torch.device) -> dict:
    """Where the generator was trained (for its card): the float results, and so the weights, depend on it."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):  # the CPU model: its instruction set decides the rounding of float sums
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    cuda = device.type == "cuda"
    return {"os": platform.system(), "arch": platform.machine(), "cpu": cpu, "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": device.type,
            "gpu": torch.cuda.get_device_name(device) if cuda else None}


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from clsp import __version__

    found = {"clsp": __version__}  # the distribution is clsp-positives; the package and its version are clsp's
    for name in ("torch", "diffusers", "accelerate", "torchvision", "numpy"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found
