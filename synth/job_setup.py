"""The synth job's setup: its generator (loaded, checked, placed on the device), its source at the generator's image
size, the run record written to run.json and the manifest, the compute record, and the reference classifier that
scores class agreement."""
from __future__ import annotations

import contextlib
import hashlib
import json
import platform
from dataclasses import asdict
from typing import TYPE_CHECKING

import numpy as np
import torch

from clsp import __version__
from clsp.errors import UserError
from clsp.sources import open_source
from clsp.shards.manifest_writer import AgreementScorer
from clsp.shards.schema import schema_version
from clsp.synth.models import load_generator
from clsp.synth.unet_split import compile_blocks

if TYPE_CHECKING:
    from clsp.synth.job import SynthConfig


def load_job_generator(cfg: SynthConfig):
    """(unet, scheduler, info): load_generator's info plus the digests of the scheduler's and the UNet's configs."""
    unet, scheduler, info = load_generator(cfg.model)  # raises UserError naming the fix
    try:
        cfg.sampler.check_scheduler(scheduler)  # steps <= the generator's training timesteps
    except ValueError as error:
        raise UserError(f"{cfg.model}: {error}") from None
    if unet.config.in_channels == 3 and unet.config.out_channels == 6:
        raise UserError(f"{cfg.model} predicts a learned variance beside the noise (out_channels 6: improved-DDPM / "
                        f"ADM style), which the sampler's DDIM steps do not use: use a generator that predicts the "
                        f"noise alone (out_channels 3)")
    if unet.config.in_channels != 3 or unet.config.out_channels != 3:
        raise UserError(f"{cfg.model} makes {unet.config.out_channels}-channel images; the anchors are RGB: "
                        f"use a generator trained on RGB images")
    if unet.class_embedding is not None:
        raise UserError(f"{cfg.model} is class-conditional (class_embed_type {unet.config.class_embed_type}, "
                        f"num_class_embeds {unet.config.num_class_embeds}); the sampler interpolates an "
                        f"unconditional generator's features, as the paper does: use an unconditional generator")
    info = {**info, "scheduler_sha256": config_sha256(scheduler.config),
            "unet_config_sha256": config_sha256(unet.config)}
    return unet.eval().requires_grad_(False), scheduler, info


def config_sha256(config) -> str:
    """sha256 of a diffusers config's settings as loaded (defaults filled in). The sampled bytes depend on settings that
    the weights do not show: the scheduler's (beta_schedule, prediction_type, clip_sample, timestep_spacing, ...) and
    the UNet's that change no tensor shape (flip_sin_to_cos, freq_shift, norm_eps, ...). The keys diffusers keeps for
    itself (`_class_name`, `_diffusers_version`, `_name_or_path`, `_use_default_values`) are left out: where the model
    was loaded from (a hub id, a local copy) and which diffusers saved it do not change it. A diffusers that adds a
    setting does; the record holds the diffusers version (compute.diffusers), which a resume compares anyway."""
    settings = {key: value for key, value in dict(config).items() if not key.startswith("_")}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def sample_size(unet) -> int:
    size = unet.config.sample_size
    return int(size if isinstance(size, int) else size[0])


def open_matching_source(cfg: SynthConfig, model_size: int):
    if cfg.resize:
        return open_source(cfg.source, cfg.split, model_size)
    source = open_source(cfg.source, cfg.split, cfg.image_size)
    if source.image_size != model_size:
        raise UserError(f"{source.name} images are {source.image_size} px but the generator {cfg.model} makes "
                        f"{model_size} px images: pass --resize to resize the anchors to {model_size} px")
    return source


GENERATOR_CONFIGS = ("scheduler_sha256", "unet_config_sha256")  # load_job_generator's config digests


def run_metadata(cfg: SynthConfig, source, count: int, info: dict) -> dict:
    """What the shards are made of: the manifest's `run` record, also written to run.json before any shard.

    "codec" is always recorded here, so a resume compares it (run.json files from before it read as png); the manifest
    records it only for raw (write_manifest drops "png"), so a PNG run's manifest is as before."""
    return {
        "schema_version": schema_version(cfg.codec),  # 2 for png, 3 for raw
        "codec": cfg.codec,
        "source": {"spec": cfg.source, "split": cfg.split, "fingerprint": source.fingerprint(), "count": count,
                   **({"num_classes": len(source.classes)} if source.classes else {})},  # bounds the labels
        # the weights and the config digests are the generator's identity (model_id, a name, is operational); an info
        # from load_generator itself, without the digests, records the weights alone
        "generator": {"model_id": info["model_id"], "weights_sha256": info["weights_sha256"],
                      **{key: info[key] for key in GENERATOR_CONFIGS if key in info}},
        "sampler": asdict(cfg.sampler),  # every SamplerConfig field: a new option is recorded and compared on resume
        "k": cfg.k,
        "seed": cfg.seed,
        "image_size": source.image_size,
        "anchors_per_shard": cfg.anchors_per_shard,
        "package_version": __version__,
    }


def reference_scorer(spec: str, image_size: int) -> AgreementScorer:
    """Class agreement of each positive: eval.audit's reference (PCA of pixels + logistic regression, its default
    settings, so that every run is scored alike) fitted on the source's labelled train split."""
    from clsp.sources import load_arrays
    from clsp.eval.audit import AuditConfig, fit_reference

    config = AuditConfig()
    try:
        train = open_source(spec, "train", image_size)
        reference = fit_reference(*load_arrays(train)[:2], config)
    except (UserError, ValueError) as error:
        raise UserError(f"--score-reference fits a classifier on the labelled train split of {spec}, which failed: "
                        f"{error}; leave --score-reference out for a source without labels") from None

    def score(positives: np.ndarray, labels: np.ndarray) -> np.ndarray:  # (n, K, H, W, 3), (n,) -> (n, K)
        n, k = positives.shape[:2]
        return reference.class_probability(positives.reshape(n * k, *positives.shape[2:]), np.repeat(labels, k)) \
            .reshape(n, k)

    record = {"reference": f"{reference.describe()}; LogisticRegression on its standardised features",
              "fitted_on": {"spec": spec, "split": "train", "fingerprint": train.fingerprint()},
              "pca_components": config.pca_components, "max_fit": config.max_fit, "seed": config.seed}
    return AgreementScorer(score, record)


def image_library() -> dict:
    """Pillow and the deflate it links: PNG members' bytes depend on them (Pillow 13 ships zlib-ng, whose output differs
    from zlib's; "zlib" is then zlib-ng's compatible version), and so do anchors that Pillow decodes, whatever the
    codec. A version that this Pillow does not report is None."""
    import PIL
    from PIL import features

    return {"pillow": PIL.__version__, "zlib": features.version("zlib"), "zlib_ng": features.version("zlib_ng")}


def compute_record(cfg: SynthConfig, device: torch.device, forward_batch: int | None) -> dict:
    """What the shard bytes depend on besides the settings: device, CPU threads per process, rows per forward pass
    (`forward_batch`; None: the GPU's default), precision, software.

    Same settings + same record -> the same bytes, whatever the world size. A folder is only ever continued with the
    record it was begun with (an identity field of run.json), so its shards never mix two."""
    from importlib.metadata import version

    cuda = device.type == "cuda"
    return {"device": device.type, "gpu": torch.cuda.get_device_name(device) if cuda else None,
            "threads": None if cuda else torch.get_num_threads(),  # CPU float sums depend on the thread count
            "forward_batch": forward_batch,  # ... and on the rows per forward pass (how convolutions block them)
            "precision": "bf16" if cuda and cfg.bf16 else "fp32", "compiled": cfg.compile,
            "machine": platform.machine(), "torch": torch.__version__, "diffusers": version("diffusers"),
            **image_library()}


# Graphs dynamo may keep per compiled function. One block class serves several blocks (the DDPM UNet's three
# DownBlock2D), each compiled per state (fp32 weights under autocast, bf16 weights, the authors' fp32 in the bench) and
# per batch shape (the job: full batches, a shard's last one, and each halving after running out of memory; the bench:
# 2B, B + A and B rows): up to 15 for DownBlock2D, where dynamo's default of 8 would run the rest eagerly, on other
# kernels than a fresh process would use.
RECOMPILE_LIMIT = 64


@contextlib.contextmanager
def compiled_as_the_job_runs(limit: int = RECOMPILE_LIMIT):
    """Within, torch.compile as the synth job (and its benchmark) uses it; the process's settings are restored after.
    Dynamo may keep up to `limit` graphs per compiled function (torch >= 2.7 calls the setting recompile_limit, older
    releases cache_size_limit), and inductor runs in its deterministic mode: it never picks a kernel by timing the
    candidates (its reduction configs, e.g. GroupNorm's), a choice that may differ from one process to the next and,
    with it, the last bits of the positives."""
    import torch._dynamo
    import torch._inductor.config

    dynamo = torch._dynamo.config
    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    inductor = {"deterministic": True} if hasattr(torch._inductor.config, "deterministic") else {}
    with dynamo.patch(**{name: max(limit, getattr(dynamo, name))}), torch._inductor.config.patch(**inductor):
        yield


def prepare_unet(unet, device: torch.device, compile: bool = False):
    """The UNet as the job samples with it (the benchmark too): on `device`; on a GPU channels_last and cuDNN in its
    deterministic mode; with `compile`, the blocks the split sampler calls compiled."""
    unet = unet.to(device)
    if device.type == "cuda":
        unet = unet.to(memory_format=torch.channels_last)
        # Same settings, same GPU and software -> the same shard bytes: cuDNN's autotuner may pick a different
        # convolution algorithm in each run (measured: every shard differed between two identical H100 runs).
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    if compile:  # the sampler calls the blocks directly (split UNet), so compile them, not unet.forward
        # static: one graph per batch shape. Dynamo's automatic dynamic shapes would serve a shard's full batches from
        # a static graph in a fresh process but from a dynamic one after any shard's smaller last batch, so the same
        # shard would be sampled on other kernels in a resumed run or on another rank
        compile_blocks(unet, dynamic=False)
    return unet
