"""Real FID (torchmetrics, Inception-v3) from local weights, with the optional `fid` extra installed."""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np

FID_EXTRA = "pip install 'clsp-positives[fid]' (torchmetrics + torch-fidelity)"


def fid_metric_class():
    try:
        import torch_fidelity  # noqa: F401  (torchmetrics' Inception network)
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        raise ValueError(f"real FID (--inception-weights) needs the optional extra: {FID_EXTRA}; or leave "
                         "--inception-weights out for the offline numbers only") from None
    return FrechetInceptionDistance


@contextmanager
def _weights_only_loads():
    """torch.load refuses pickled code while the block runs (torch-fidelity loads its weights with
    weights_only=False; torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides that)."""
    saved = {name: os.environ.pop(name, None) for name in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD",
                                                            "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def inception_fid(real: np.ndarray, fake: np.ndarray, weights: str, device, batch_size: int) -> dict:
    """FID (torchmetrics, Inception-v3 pool3, 2048 features) of uint8 (N, H, W, 3) real vs fake images."""
    import pickle

    import torch

    from clsp.hashing import weights_sha256

    metric_class = fid_metric_class()
    try:
        with _weights_only_loads():
            metric = metric_class(feature=2048, feature_extractor_weights_path=str(weights), normalize=False)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"--inception-weights {weights} is not a plain state dict of Inception-v3 tensors ({first}): "
                         "give torch-fidelity's weights-inception-2015-12-05-6726825d.pth") from None
    metric = metric.to(device)
    with torch.inference_mode():
        for images, is_real in ((real, True), (fake, False)):
            for start in range(0, len(images), batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))  # (B, H, W, 3)
                metric.update(batch.permute(0, 3, 1, 2).to(device), real=is_real)  # (B, 3, H, W) uint8
        value = float(metric.compute())
    return {"value": value, "features": "Inception-v3 pool3 (2048), torchmetrics FrechetInceptionDistance",
            "weights_sha256": weights_sha256(metric.inception), "real": int(len(real)), "generated": int(len(fake))}
