"""Generators: load, save and fingerprint the diffusers UNet2DModel + DDIMScheduler pairs the sampler runs.

Two layouts load:
  save layout (what `save_generator` writes, also a diffusers DDIMPipeline/DDPMPipeline save):
      DIR/unet/{config.json, diffusion_pytorch_model.safetensors}, DIR/scheduler/scheduler_config.json,
      DIR/card.json + README.md (provenance), DIR/model_index.json (written LAST: its presence marks a complete dir)
  hub layout (e.g. google/ddpm-cifar10-32, or a local copy of such a repo):
      config.json + diffusion_pytorch_model.safetensors + scheduler_config.json at the root
Weights load from safetensors only (never pickle); `clsp diffusion convert DIR` (synth.convert_weights) turns a
`.bin`-only dir into safetensors when the user asks (torch.load with weights_only=True: tensors, no code). Whatever
scheduler class was saved, the sampler gets a DDIMScheduler built from its config (same betas and timestep count); a
config of sigmas without betas (variance-exploding, EDM) or with betas DDIM does not implement is refused.

A hub id loads from the local Hugging Face cache when it is there (offline too); otherwise one short probe of the hub
(or HF_HUB_OFFLINE) decides at once that the machine is offline, instead of a minute of retries.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
import warnings
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DModel

from clsp.errors import UserError
from clsp.file_checks import small_json, starts_with
from clsp.file_checks import NotARegularFile
from clsp.file_io import read_json, write_atomic
from clsp.hashing import weights_sha256

CARD_NAME = "card.json"
INDEX_NAME = "model_index.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
PICKLE_NAME = "diffusion_pytorch_model.bin"
PROBE_TIMEOUT_S = 3.0  # one connection attempt to the hub; huggingface_hub alone retries for about a minute
HUB_ID = re.compile(r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")  # owner/name, no ..


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


BETAS = ("beta_schedule", "beta_start", "trained_betas")  # how a DDPM-style (variance-preserving) config gives them


def generator_ddim(scheduler_config: dict, spec: str) -> DDIMScheduler:
    """as_ddim of a generator's saved scheduler config, refused (UserError) where DDIM cannot sample its model: a
    config of sigmas and no betas (a variance-exploding or EDM scheduler, whose sigmas DDIM's default betas would
    replace without a word) or betas DDIM does not implement. A DDPM config that names no betas has the defaults."""
    config = dict(scheduler_config)
    kind = config.get("_class_name", "scheduler")
    sigmas = sorted(key for key in config if key.startswith("sigma_"))  # sigma_min, sigma_max, sigma_data
    if sigmas and not any(key in config for key in BETAS):  # no betas at all: a DDPM config may rely on defaults
        raise UserError(f"generator {spec!r}: its {kind} config gives sigmas ({', '.join(sigmas)}) and no betas: a "
                        f"variance-exploding or EDM model, which the sampler's DDIM steps cannot drive. Fix: use a "
                        f"DDPM-style (variance-preserving, noise-predicting) generator")
    try:
        return as_ddim(config)
    except (NotImplementedError, ValueError, TypeError) as error:
        raise UserError(f"generator {spec!r}: DDIM cannot take its {kind} config ({error}). Fix: use a generator "
                        f"whose scheduler has a linear, scaled_linear or squaredcos_cap_v2 beta_schedule") from None


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
    elif HUB_ID.fullmatch(spec):
        unet, scheduler, model_id = _load_hub(spec)
    else:
        raise UserError(f"generator {spec!r} not found: no such directory, and it is not a hub id (owner/name). "
                        "Fix: train one with `clsp diffusion train SOURCE --out DIR` and pass DIR, or pass a hub id "
                        "such as google/ddpm-cifar10-32.")
    info = generator_info(model_id, unet, scheduler)  # hashed on the CPU, before the move
    unet = unet.to(device).eval()
    return unet, scheduler, info


def _load_local(path: Path, spec: str):
    _refuse_pickle_only(weights_folder(path), spec)
    if (path / "unet").is_dir():
        if not (path / INDEX_NAME).is_file():
            raise UserError(f"generator dir {spec!r} is incomplete ({INDEX_NAME} missing: the save was interrupted). "
                            "Fix: re-run the command that wrote it (e.g. `clsp diffusion train ... --out DIR`).")
        unet = _from_pretrained(spec, lambda: UNet2DModel.from_pretrained(path, subfolder="unet", use_safetensors=True))
        scheduler = _read_scheduler(path / "scheduler", spec)
        card_file = path / CARD_NAME
        card = {}
        if card_file.is_file():  # provenance only: the dir loads without one
            card = _read_json(card_file, spec, f"delete {CARD_NAME} (the generator then reports {spec} as its id) or "
                              "re-run the command that wrote the dir")
        return unet, scheduler, str(card.get("model_id") or spec)
    if (path / "config.json").is_file():
        unet = _from_pretrained(spec, lambda: UNet2DModel.from_pretrained(path, use_safetensors=True))
        return unet, _read_scheduler(path, spec), spec
    _refuse_unfinished_training(path, spec)
    raise UserError(f"{spec!r} is not a generator dir: expected unet/ + scheduler/ (save layout) or config.json + "
                    "diffusion_pytorch_model.safetensors + scheduler_config.json (hub layout). Fix: pass the dir "
                    "written by `clsp diffusion train --out DIR`.")


def _refuse_unfinished_training(path: Path, spec: str) -> None:
    """A `clsp diffusion train` --out whose run has not saved its generator yet (its record, train_config.json, is
    there; unet/ is written at the end): say so and how to finish it, rather than "not a generator dir"."""
    begun = small_json(path / "train_config.json")
    if isinstance(begun, dict) and begun.get("clsp_run") == "generator":
        source = begun.get("source") if isinstance(begun.get("source"), str) else "SOURCE"
        raise UserError(f"{spec!r} is a `clsp diffusion train` run that has not finished (it saves the generator, "
                        f"unet/ and scheduler/, at its last step): finish it with `clsp diffusion train {source} "
                        f"--out {spec} --resume` and the options it was begun with, then pass the same dir")


def _read_scheduler(folder: Path, spec: str) -> DDIMScheduler:
    config_file = folder / "scheduler_config.json"
    if not config_file.is_file():
        if (folder.parent / "scheduler" / config_file.name).is_file():  # PIPELINE/unet given: the folder above loads
            raise UserError(f"generator {spec!r} is the unet/ of a pipeline folder: pass that folder "
                            f"({folder.parent}), which holds the scheduler/ beside it")
        raise UserError(f"generator {spec!r} has no {config_file.name} in {folder.name or '.'}/. Fix: save the "
                        "scheduler next to the unet (scheduler.save_pretrained) or use synth.models.save_generator.")
    return generator_ddim(_read_json(config_file, spec, "re-save the scheduler (scheduler.save_pretrained) or re-run "
                                                        "the command that wrote the dir"), spec)


def _read_json(file: Path, spec: str, fix: str) -> dict:
    """A generator dir's JSON object file; a damaged or foreign one (not JSON, not UTF-8, not an object) is a UserError
    naming it, not a traceback from deep inside the loader."""
    try:
        data = read_json(file)  # a regular file of bounded size
    except NotARegularFile as error:  # a device, a FIFO, or larger than any of ours: never read
        raise UserError(f"generator {spec!r}: {error}. Fix: {fix}.") from None
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        reason = f"not valid JSON: {error}"
    else:
        if isinstance(data, dict):
            return data
        reason = "valid JSON but not an object (a {...} of settings)"
    raise UserError(f"generator {spec!r}: {file} is {reason}. Fix: {fix}.")


def weights_folder(path: Path) -> Path:
    """The folder holding a generator dir's unet weights: unet/ (save layout) or the dir itself (hub layout)."""
    return path / "unet" if (path / "unet").is_dir() else path


def _refuse_pickle_only(folder: Path, spec: str) -> None:
    if (folder / PICKLE_NAME).is_file() and not (folder / WEIGHTS_NAME).is_file():
        raise UserError(f"generator {spec!r} has no file named {WEIGHTS_NAME}, only the pickled {PICKLE_NAME}, "
                        "which is never loaded (unpickling can run code). Fix: if you trust it, "
                        f"`clsp diffusion convert {spec}` writes safetensors from its tensors "
                        "(torch.load weights_only=True), then run this again.")


def _load_hub(model_id: str):
    """From the local Hugging Face cache if it holds the repo, else (online only) from the hub."""
    try:
        return _load_hub_files(model_id, local_files_only=True)
    except (OSError, ValueError):
        pass  # not (completely) cached
    _require_online(model_id)
    return _load_hub_files(model_id, local_files_only=False)


def _load_hub_files(model_id: str, local_files_only: bool):
    def unet_loader():
        try:  # hub layout: unet at the repo root (google/ddpm-cifar10-32)
            return UNet2DModel.from_pretrained(model_id, use_safetensors=True, local_files_only=local_files_only)
        except OSError:  # pipeline layout: unet/ subfolder
            return UNet2DModel.from_pretrained(model_id, subfolder="unet", use_safetensors=True,
                                               local_files_only=local_files_only)

    def scheduler_loader():
        try:
            return DDIMScheduler.load_config(model_id, local_files_only=local_files_only)
        except OSError:
            return DDIMScheduler.load_config(model_id, subfolder="scheduler", local_files_only=local_files_only)

    with warnings.catch_warnings():  # diffusers passes an argument huggingface_hub deprecated: not the user's concern
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks", category=UserWarning)
        if local_files_only:  # a miss is expected here: the caller goes online, so no UserError wording
            return unet_loader(), generator_ddim(scheduler_loader(), model_id), model_id
        unet = _from_pretrained(model_id, unet_loader)
        return unet, generator_ddim(_from_pretrained(model_id, scheduler_loader), model_id), model_id


_GIVE_DIR = "give DIR as the generator (synth: --model DIR; diffusion eval, sweep: GENERATOR)"


def _require_online(model_id: str) -> None:
    """UserError at once when the hub cannot be reached: HF_HUB_OFFLINE is set, or one short request fails."""
    from urllib.error import HTTPError
    from urllib.request import Request, urlopen

    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        reason = "HF_HUB_OFFLINE is set"
    else:
        try:  # urllib honours the same *_proxy variables as huggingface_hub
            urlopen(Request(endpoint, method="HEAD"), timeout=PROBE_TIMEOUT_S).close()
            return
        except HTTPError:  # any HTTP answer means the hub is reachable
            return
        except OSError as error:  # URLError, timeouts, refused connections
            reason = f"{endpoint} cannot be reached: {getattr(error, 'reason', error)}"
    snapshot = _cached_snapshot_with_pickle_only(model_id)
    if snapshot is not None:
        raise UserError(f"generator {model_id!r} is in the local Hugging Face cache with only the pickled "
                        f"{PICKLE_NAME}, which is never loaded (unpickling can run code), and this machine is offline "
                        f"({reason}). Fix: if you trust it, copy the repo out of the cache (`cp -rL {snapshot} DIR`), "
                        f"run `clsp diffusion convert DIR` (safetensors from its tensors) and {_GIVE_DIR}.")
    raise UserError(f"generator {model_id!r} is no local folder, and as a hub id it is not in the local Hugging Face "
                    f"cache and this machine is offline ({reason}). Fix: for a folder, check its name (`ls "
                    f"{Path(model_id).parent}`); for a hub repo, download it where there is network (e.g. `hf download "
                    f"{model_id} --local-dir DIR`), copy it here and {_GIVE_DIR}, or set HF_HOME to a cache that holds "
                    "it.")


def _cached_snapshot_with_pickle_only(model_id: str) -> Path | None:
    """The cached snapshot folder of `model_id` that holds the UNet's pickled weights and no safetensors (at its
    root or under unet/), if the cache holds one."""
    from huggingface_hub import try_to_load_from_cache

    for folder in ("", "unet/"):
        pickled = try_to_load_from_cache(model_id, f"{folder}{PICKLE_NAME}")
        if isinstance(pickled, str) and not isinstance(try_to_load_from_cache(model_id, f"{folder}{WEIGHTS_NAME}"),
                                                        str):
            return Path(pickled).parent.parent if folder else Path(pickled).parent  # the snapshot: --model takes it
    return None


def _from_pretrained(spec: str, loader):
    try:
        return loader()
    except (OSError, ValueError) as err:
        reason = str(err).rstrip(".")
        raise UserError(f"could not load generator {spec!r}: {reason}. Fix: check the name/dir; weights must be "
                        f"safetensors ({WEIGHTS_NAME}; a dir with only {PICKLE_NAME}: `clsp diffusion convert DIR`); "
                        "hub ids need network access or a populated Hugging Face cache.") from err


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
    unet_config = dict(unet.config)
    if "_use_default_values" in unet_config:  # a set in diffusers, listed in hash order: it would differ run to run
        unet_config["_use_default_values"] = sorted(unet_config["_use_default_values"])
    full_card = {**card, **info, "unet_config": unet_config, "scheduler_class": type(scheduler).__name__,
                 "versions": versions}
    write_atomic(out / CARD_NAME, json.dumps(full_card, indent=2, sort_keys=True, default=str))
    write_readme(out / "README.md", card_readme(full_card))
    index = {"_class_name": "DDIMPipeline", "_diffusers_version": versions["diffusers"],
             "scheduler": ["diffusers", type(scheduler).__name__], "unet": ["diffusers", "UNet2DModel"]}
    write_atomic(out / INDEX_NAME, json.dumps(index, indent=2))
    return info


def _version(package: str) -> str:
    from importlib.metadata import version
    return version(package)


def write_readme(path: Path, text: str) -> bool:
    """Write a generator's README.md unless one that is not ours (the user's own notes) is there: False then."""
    if path.exists() and not starts_with(b"# Generator ")(path):
        print(f"note: {path} was not written by clsp: left as it is (the card is in {CARD_NAME})", file=sys.stderr)
        return False
    write_atomic(path, text)
    return True


def card_readme(card: dict) -> str:
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
