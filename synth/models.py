"""Generators: load, save, fingerprint and build the diffusers UNet2DModel + DDIMScheduler pairs the sampler runs.

Two layouts load:
  save layout (what `save_generator` writes, also a diffusers DDIMPipeline/DDPMPipeline save):
      DIR/unet/{config.json, diffusion_pytorch_model.safetensors}, DIR/scheduler/scheduler_config.json,
      DIR/card.json + README.md (provenance), DIR/model_index.json (written LAST: its presence marks a complete dir)
  hub layout (e.g. google/ddpm-cifar10-32, or a local copy of such a repo):
      config.json + diffusion_pytorch_model.safetensors + scheduler_config.json at the root
Weights load from safetensors only (never pickle). Whatever scheduler class was saved, the sampler gets a
DDIMScheduler built from its config (same betas and timestep count).
"""

from __future__ import annotations

import inspect
import json
import os
import re
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DModel

from clsp.errors import UserError
from clsp.hashing import weights_sha256
from clsp.run_dir import write_atomic

CARD_NAME = "card.json"
INDEX_NAME = "model_index.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def generator_info(model_id: str, unet: UNet2DModel, scheduler) -> dict:
    """Provenance and shape facts the synth job records in the shard manifest."""
    return {
        "model_id": model_id,
        "weights_sha256": weights_sha256(unet),
        "sample_size": unet.config.sample_size,
        "in_channels": unet.config.in_channels,
        "num_train_timesteps": int(scheduler.config.num_train_timesteps),
    }


def as_ddim(scheduler_config: dict) -> DDIMScheduler:
    """A DDIMScheduler with the betas/timesteps of any diffusers scheduler config (e.g. a DDPMScheduler's)."""
    accepted = set(inspect.signature(DDIMScheduler.__init__).parameters) - {"self"}
    return DDIMScheduler(**{k: v for k, v in dict(scheduler_config).items() if k in accepted})


def load_generator(path_or_id: str | os.PathLike, device: str | torch.device = "cpu"):
    """Load (unet in eval mode on `device`, DDIMScheduler, info) from a local dir or a hub id.

    info = {model_id, weights_sha256, sample_size, in_channels, num_train_timesteps}.
    """
    spec = str(path_or_id)
    path = Path(spec).expanduser()
    if path.is_dir():
        unet, scheduler, model_id = _load_local(path, spec)
    elif path.exists():
        raise UserError(f"generator {spec!r} is a file, not a directory. Fix: pass the directory written by "
                        "`clsp diffusion train --out DIR` (it holds unet/ and scheduler/) or a hub id.")
    elif _HUB_ID.match(spec) and ".." not in spec:
        unet, scheduler, model_id = _load_hub(spec)
    else:
        raise UserError(f"generator {spec!r} not found: no such directory, and it is not a hub id (owner/name). "
                        "Fix: train one with `clsp diffusion train SOURCE --out DIR` and pass DIR, or pass a hub id "
                        "such as google/ddpm-cifar10-32.")
    info = generator_info(model_id, unet, scheduler)  # hashed on the CPU, before the move
    unet = unet.to(device).eval()
    return unet, scheduler, info


def _load_local(path: Path, spec: str):
    if (path / "unet").is_dir():
        if not (path / INDEX_NAME).is_file():
            raise UserError(f"generator dir {spec!r} is incomplete ({INDEX_NAME} missing: the save was interrupted). "
                            "Fix: re-run the command that wrote it (e.g. `clsp diffusion train ... --out DIR`).")
        unet = _from_pretrained(spec, lambda: UNet2DModel.from_pretrained(path, subfolder="unet", use_safetensors=True))
        scheduler = _read_scheduler(path / "scheduler", spec)
        card_file = path / CARD_NAME
        card = json.loads(card_file.read_text()) if card_file.is_file() else {}
        return unet, scheduler, str(card.get("model_id") or spec)
    if (path / "config.json").is_file():
        unet = _from_pretrained(spec, lambda: UNet2DModel.from_pretrained(path, use_safetensors=True))
        return unet, _read_scheduler(path, spec), spec
    raise UserError(f"{spec!r} is not a generator dir: expected unet/ + scheduler/ (save layout) or config.json + "
                    "diffusion_pytorch_model.safetensors + scheduler_config.json (hub layout). Fix: pass the dir "
                    "written by `clsp diffusion train --out DIR`.")


def _read_scheduler(folder: Path, spec: str) -> DDIMScheduler:
    config_file = folder / "scheduler_config.json"
    if not config_file.is_file():
        raise UserError(f"generator {spec!r} has no {config_file.name} in {folder.name or '.'}/. Fix: save the "
                        "scheduler next to the unet (scheduler.save_pretrained) or use synth.models.save_generator.")
    return as_ddim(json.loads(config_file.read_text()))


def _load_hub(model_id: str):
    def unet_loader():
        try:  # hub layout: unet at the repo root (google/ddpm-cifar10-32)
            return UNet2DModel.from_pretrained(model_id, use_safetensors=True)
        except OSError:  # pipeline layout: unet/ subfolder
            return UNet2DModel.from_pretrained(model_id, subfolder="unet", use_safetensors=True)

    def scheduler_loader():
        try:
            return DDIMScheduler.load_config(model_id)
        except OSError:
            return DDIMScheduler.load_config(model_id, subfolder="scheduler")

    unet = _from_pretrained(model_id, unet_loader)
    return unet, as_ddim(_from_pretrained(model_id, scheduler_loader)), model_id


def _from_pretrained(spec: str, loader):
    try:
        return loader()
    except (OSError, ValueError) as err:
        reason = str(err).rstrip(".")
        raise UserError(f"could not load generator {spec!r}: {reason}. Fix: check the name/dir; weights must be "
                        "safetensors (diffusion_pytorch_model.safetensors); hub ids need network access or a "
                        "populated Hugging Face cache.") from err


def save_generator(out_dir: str | os.PathLike, unet: UNet2DModel, scheduler, card: dict) -> dict:
    """Write a generator dir in save layout; model_index.json goes last so only a complete dir loads.

    card: JSON-serialisable provenance (source, fingerprint, training settings, ...); a "model_id" key, if
    present, becomes the id that load_generator reports. Returns the info dict load_generator will return.
    """
    try:
        json.dumps(card)
    except TypeError as err:
        raise ValueError(f"generator card must be JSON-serialisable: {err}. Fix: pass plain str/int/float/list/dict "
                         "values.") from err
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX_NAME).unlink(missing_ok=True)  # an overwrite in progress must not look complete
    unet.save_pretrained(out / "unet", safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")
    info = generator_info(str(card.get("model_id") or out.name), unet, scheduler)
    versions = {"diffusers": _version("diffusers"), "torch": torch.__version__}
    full_card = {**card, **info, "unet_config": dict(unet.config), "scheduler_class": type(scheduler).__name__,
                 "versions": versions}
    write_atomic(out / CARD_NAME, json.dumps(full_card, indent=2, sort_keys=True, default=str))
    write_atomic(out / "README.md", _readme(full_card))
    index = {"_class_name": "DDIMPipeline", "_diffusers_version": versions["diffusers"],
             "scheduler": ["diffusers", type(scheduler).__name__], "unet": ["diffusers", "UNet2DModel"]}
    write_atomic(out / INDEX_NAME, json.dumps(index, indent=2))
    return info


def _version(package: str) -> str:
    from importlib.metadata import version
    return version(package)


def _readme(card: dict) -> str:
    n_params = card.get("parameters")
    lines = [f"# Generator {card['model_id']}", "",
             "Unconditional diffusers UNet2DModel (noise prediction) + scheduler config, used by `clsp synth run` to",
             "make synthetic positives. Load with `synth.models.load_generator(DIR)`.", "",
             f"- weights sha256: `{card['weights_sha256']}`",
             f"- sample size: {card['sample_size']} px, {card['in_channels']} channels, "
             f"T = {card['num_train_timesteps']}" + (f", {n_params} parameters" if n_params else ""), ""]
    provenance = {k: v for k, v in card.items() if k not in {"unet_config", "versions"}}
    lines += ["## Provenance", "", "```json", json.dumps(provenance, indent=2, sort_keys=True, default=str), "```", ""]
    return "\n".join(lines)


def tiny_unet(
    sample_size: int = 16,
    block_out_channels: tuple[int, ...] = (8, 16),
    layers_per_block: int = 1,
    in_channels: int = 3,
    attention: bool = True,
    seed: int = 0,
    **overrides,
) -> UNet2DModel:
    """A small UNet2DModel (seeded init, global RNG untouched) for tests and quick runs; attention on the last level."""
    n = len(block_out_channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    config = dict(sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
                  block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                  down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=4,
                  attention_head_dim=8)
    config.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel(**config).eval()


def ddpm_cifar10_unet(seed: int = 0) -> UNet2DModel:
    """Random-init UNet with the architecture of google/ddpm-cifar10-32 (35.7M parameters; the CLSP generator)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel(
            sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
            layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),  # attention at 16x16
            attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
            norm_num_groups=32, act_fn="silu", mid_block_scale_factor=1, center_input_sample=False,
        ).eval()


def ddpm_cifar10_scheduler() -> DDIMScheduler:
    """DDIM over the DDPM CIFAR-10 schedule: T = 1000, linear betas 1e-4..0.02, x0 clipped to [-1, 1]."""
    return DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                         clip_sample=True)
