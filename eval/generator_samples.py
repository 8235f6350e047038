"""A saved generator opened as the synth job opens it, and samples drawn outside the job (generator quality, sweep)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clsp.accelerator import resolve_device
from clsp.file_io import read_json


def sampler_config(w: float, steps: int, eta: float, **options):
    """The synth job's SamplerConfig; `options`: its other fields (noise, share_anchor_noise), else their defaults."""
    from clsp.synth.sampler import SamplerConfig

    return SamplerConfig(w=float(w), steps=int(steps), eta=float(eta), **options)


def card_source_record(generator: str) -> dict:
    """The source record (spec, split, fingerprint, ...) of a generator dir's card.json, or {}."""
    from clsp.synth.models import CARD_NAME

    card_file = Path(generator).expanduser() / CARD_NAME
    card = read_json(card_file) if card_file.is_file() else {}  # a regular file of bounded size
    return card.get("source") if isinstance(card.get("source"), dict) else {}


def card_source(generator: str) -> tuple[str | None, str | None]:
    """(source spec, split) recorded in a generator dir's card.json, or (None, None)."""
    source = card_source_record(generator)
    return source.get("spec"), source.get("split")


def no_source(generator: str) -> ValueError:
    """The error for a generator without a recorded source: a local one without a card, or a mistyped folder (which
    names no source because it is no folder at all), or a hub id."""
    fix = "pass --source, the labelled data it was trained on (e.g. --source cifar10:DIR)"
    if Path(generator).expanduser().is_dir():
        return ValueError(f"{generator} records no source (no card.json with a source): {fix}")
    return ValueError(f"{generator} is no local folder (check its name: `ls {Path(generator).parent}`); for a hub "
                      f"generator, {fix}")


def synth_config(generator: str, source: str, out: str | Path, k: int, sampler, seed: int, bf16: bool = True):
    """The synth job's config for sampling outside the job (sample_batch reads k, seed, sampler and bf16; bf16, as
    the job's default: bf16 autocast on a GPU, ignored on the CPU)."""
    from clsp.synth.job import SynthConfig

    return SynthConfig(source=source, model=generator, out=Path(out), k=k, sampler=sampler, seed=seed, bf16=bf16)


def open_generator(synth_cfg, device: str):
    """(unet prepared on the device, scheduler, info, torch device), with the job's own checks (RGB, steps <= T)."""
    from clsp.synth.job_setup import load_job_generator, prepare_unet

    target = resolve_device(device)
    unet, scheduler, info = load_job_generator(synth_cfg)
    return prepare_unet(unet, target), scheduler, info, target


def sample_records(synth_cfg, records: list, unet, scheduler, device, batch_rows: int, progress) -> np.ndarray:
    """K images per record through the job's sample_batch (noise keyed on (seed, id, j)) -> (A, K, H, W, 3) uint8."""
    from clsp.synth.job import sample_batch

    per_batch = max(1, batch_rows // synth_cfg.k)  # whole anchors per call
    chunks = []
    for start in range(0, len(records), per_batch):
        images, _ = sample_batch(synth_cfg, records[start:start + per_batch], unet, scheduler, device)
        chunks.append(images)
        progress.update(images.shape[0] * images.shape[1])
    return np.concatenate(chunks)


def plain_samples(synth_cfg, count: int, size: int, unet, scheduler, device, batch_rows: int) -> np.ndarray:
    """`count` unconditional samples (synth_cfg.sampler.w must be 1) -> (count, H, W, 3) uint8, row i keyed on i."""
    from tqdm.auto import tqdm

    from clsp.sources import Record

    if synth_cfg.sampler.w != 1.0:
        raise ValueError("plain samples need w = 1 (the anchor's bottleneck then has weight 0)")
    grey = np.full((size, size, 3), 128, dtype=np.uint8)  # an anchor the sampler ignores at w = 1
    records = [Record(f"plain-{i:06d}", grey, -1) for i in range(count)]
    with tqdm(total=count, desc="plain samples", unit="img", dynamic_ncols=True) as progress:
        return sample_records(synth_cfg, records, unet, scheduler, device, batch_rows, progress)[:, 0]


def image_size(info: dict) -> int:
    """The generator's sample size in pixels (diffusers stores an int or an (H, W) pair)."""
    size = info["sample_size"]
    return int(size if isinstance(size, int) else size[0])
