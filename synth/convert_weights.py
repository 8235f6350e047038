"""`clsp diffusion convert DIR`: safetensors weights for a generator dir that has only the pickled .bin."""
from __future__ import annotations

import os
import pickle  # only for its exception type: torch.load(weights_only=True) below refuses anything but tensors
from pathlib import Path

import torch
from diffusers import UNet2DModel

from clsp.errors import UserError
from clsp.file_io import write_atomic
from clsp.hashing import weights_sha256
from clsp.synth.models import PICKLE_NAME, WEIGHTS_NAME, weights_folder


def convert_pickle_weights(path: str | os.PathLike) -> dict:
    """Write diffusion_pytorch_model.safetensors beside the .bin of a generator dir, from its tensors only.

    The .bin is read with torch.load(weights_only=True), which refuses pickled objects other than tensors and plain
    containers; the tensors must fit the dir's config.json, under their names or the attention names of diffusers
    before 0.14 (query, key, value, proj_attn), which diffusers renames on load and so are written renamed. Returns
    {"path", "tensors", "weights_sha256"}: the fingerprint load_generator reports, of the weights as they load (in
    the model's float32: an fp16 .bin's tensors are written as they are and widened on load). Nothing is written
    unless every check passes; nothing is overwritten.
    """
    from safetensors.torch import save_file

    folder = weights_folder(Path(path).expanduser())
    source, target = folder / PICKLE_NAME, folder / WEIGHTS_NAME
    if not source.is_file():
        raise UserError(f"{folder} holds no {PICKLE_NAME}: nothing to convert. Fix: pass the generator dir (hub "
                        "layout: config.json at its root; save layout: unet/) that holds it.")
    if target.exists():
        raise UserError(f"{target} already exists and is left as it is: the dir needs no conversion. Fix: load the "
                        "dir as it is, or move that file away to convert again.")
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:  # a refused object, or not torch's
        raise UserError(f"{source} was not converted: it is not a plain state dict of tensors ({type(error).__name__}: "
                        f"{str(error).splitlines()[0]}). Fix: ask its author for safetensors weights.") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise UserError(f"{source} was not converted: it holds {type(state).__name__}, not a state dict (names -> "
                        "tensors). Fix: ask its author for safetensors weights.")
    unet = _loaded(folder, state)
    state = {name: tensor.detach().clone().contiguous() for name, tensor in state.items()}  # no shared storage
    write_atomic(target, lambda temp: save_file(state, str(temp), metadata={"format": "pt"}))
    return {"path": str(target), "tensors": len(state), "weights_sha256": weights_sha256(unet)}


def _loaded(folder: Path, state: dict) -> UNet2DModel:
    """The dir's UNet with `state` loaded, as from_pretrained loads it; `state`'s pre-0.14 attention names are
    renamed in place."""
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} has no config.json beside {PICKLE_NAME}. Fix: pass a generator dir as the hub "
                        "has it (config.json, the weights and scheduler_config.json).")
    unet = UNet2DModel.from_config(UNet2DModel.load_config(folder))
    rename = getattr(unet, "_fix_state_dict_keys_on_load", None)  # what from_pretrained does to a single file
    if rename is not None:
        rename(state)
    try:
        unet.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise UserError(f"{folder / PICKLE_NAME} was not converted: its tensors do not fit config.json "
                        f"({str(error).splitlines()[0]} ...). "
                        "Fix: pair it with the config it was saved with.") from None
    return unet
