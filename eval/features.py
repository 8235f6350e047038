"""Embeddings from a frozen backbone, computed once and cached beside the checkpoint.

Cache layout: `<run_dir>/features/<source-fingerprint>.npy` (np.save, no pickle) with a `.json` sidecar naming the
backbone's weights hash and the normalisation. A cache whose weights hash or normalisation differs from the backbone in
hand (e.g. training went on after the features were cached) is recomputed and replaced: it is a cache, not a result.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from clsp.accelerator import resolve_device  # the one device check (--device cuda without CUDA is a UserError)
from clsp.errors import UserError
from clsp.file_checks import SMALL_JSON, read_regular
from clsp.file_io import remove_cut_writes, write_atomic
from clsp.hashing import weights_sha256
from clsp.train.augment import EvalTransform
from clsp.train.backbones import embed

MAX_FEATURE_BYTES = 16 << 30  # the most a cached feature array (N x D float32) is read for


def normalization_from_config(config: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per RGB channel from a run's config.json: its `normalize` section (or top-level mean/std)."""
    for section in (config.get("normalize") or {}, config):
        if isinstance(section, dict) and "mean" in section and "std" in section:
            mean, std = tuple(float(v) for v in section["mean"]), tuple(float(v) for v in section["std"])
            if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
                raise ValueError(f"config mean/std must be 3 floats each with std > 0, got {mean} {std}")
            return mean, std
    raise ValueError("the run's config.json has no `mean`/`std`; re-run training with a clsp version that records them")


def _embed(backbone: nn.Module, images: np.ndarray, mean, std, batch_size: int, device: torch.device) -> np.ndarray:
    backbone.to(device).eval()  # eval: BN uses its running stats and does not update them
    transform = EvalTransform(images.shape[1], mean, std)  # no resize: the images' own size
    features = embed(backbone, images, transform, batch_size, device, progress=f"features of {len(images)} images"
                     ).cpu().numpy()  # (N, D) float32
    broken = int((~np.isfinite(features).all(axis=1)).sum())
    if broken:  # kNN ranks NaN similarities first and the probe fits NaN: the scores would be garbage, not low
        raise UserError(f"the backbone gives non-finite features (NaN or inf) for {broken} of {len(images)} images: "
                        f"its weights are broken (did its training diverge? see its log.csv); retrain it")
    return features


def npy_bytes(array: np.ndarray) -> bytes:
    """The array as a .npy file's bytes (no pickle), to write atomically and to hash."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def extract_features(
    backbone: nn.Module,
    images: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
    source_fingerprint: str | None = None,
) -> np.ndarray:
    """Backbone features (N, D) float32 of uint8 images (N, H, W, 3); the backbone is left in eval mode.

    With `cache_dir` and `source_fingerprint`, reads/writes `cache_dir/<source_fingerprint>.npy` keyed by the
    backbone's weights hash.
    """
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    device = resolve_device(device) if isinstance(device, str) else device
    if cache_dir is None or source_fingerprint is None:
        return _embed(backbone, images, mean, std, batch_size, device)

    key = {
        "weights_sha256": weights_sha256(backbone),
        "source_fingerprint": source_fingerprint,
        "count": int(images.shape[0]),
        "image_size": int(images.shape[1]),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
    }
    cache_dir = Path(cache_dir)
    npy, sidecar = cache_dir / f"{source_fingerprint}.npy", cache_dir / f"{source_fingerprint}.json"
    try:  # one read of each: the array's bytes are used only if they are those its key was written with
        recorded = json.loads(read_regular(sidecar, SMALL_JSON))  # regular files only: a FIFO is never waited on
        blob = read_regular(npy, MAX_FEATURE_BYTES)
    except (OSError, ValueError):
        recorded, blob = None, b""
    if (isinstance(recorded, dict) and recorded.get("npy_sha256") == hashlib.sha256(blob).hexdigest()
            and {k: v for k, v in recorded.items() if k != "npy_sha256"} == key):
        cached = np.load(io.BytesIO(blob), allow_pickle=False)
        if cached.shape[0] == images.shape[0]:
            return cached
    feats = _embed(backbone, images, mean, std, batch_size, device)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for path in (npy, sidecar):  # what a kill during an earlier write left
        remove_cut_writes(path)
    sidecar.unlink(missing_ok=True)  # first: a kill between the two writes must not leave the old key on the new array
    blob = npy_bytes(feats)
    write_atomic(npy, blob)
    write_atomic(sidecar, json.dumps({**key, "npy_sha256": hashlib.sha256(blob).hexdigest()}, indent=2) + "\n")
    # the key after the array, and naming its bytes: neither a half-written pair nor two evaluations' writes
    # interleaved (each array, then each key) ever match
    return feats
