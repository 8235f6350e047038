"""The run directory of `clsp diffusion train`: its config file, atomic checkpoints and log.

A run directory is ours when it holds train_config.json; it is resumed only with the same training fields.
Checkpoints are written to a temp dir and renamed into place, so a listed checkpoint is always complete.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from clsp.errors import UserError

if TYPE_CHECKING:
    from synth.diffusion_train import DiffusionTrainConfig

CONFIG_NAME = "train_config.json"
STEP_PREFIX = "step-"


def checkpoint_dirs(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed into place only when fully written), oldest first."""
    found = []
    for path in (out / "checkpoints").glob(f"{STEP_PREFIX}*"):
        number = path.name[len(STEP_PREFIX):]
        if path.is_dir() and number.isdigit():
            found.append((int(number), path))
    return sorted(found)


def prepare_out_dir(cfg: DiffusionTrainConfig) -> int:
    """Check `out` against cfg; return the step to resume from (0: fresh; -1: already finished, nothing to do)."""
    out = cfg.out
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a directory")
    saved_file = out / CONFIG_NAME
    if out.is_dir() and any(out.iterdir()):
        if not saved_file.is_file():
            raise UserError(f"--out {out} is not empty and was not made by `clsp diffusion train`: "
                            f"choose a new or empty directory")
        if cfg.overwrite:
            shutil.rmtree(out)  # ours (it holds our config): start over
        else:
            saved = json.loads(saved_file.read_text())
            now = cfg.training_fields()
            differs = [f"{k}: {saved.get(k)!r} there, {now.get(k)!r} now" for k in sorted(set(saved) | set(now))
                       if saved.get(k) != now.get(k)]
            if differs:
                raise UserError(f"--out {out} holds a run with another config ({'; '.join(differs)}): "
                                f"pass the same options to resume it, another --out, or --overwrite to replace it")
            last = checkpoint_dirs(out)[-1][0] if checkpoint_dirs(out) else 0
            finished = (out / "model_index.json").is_file() and last >= cfg.steps
            if not cfg.resume:
                what = ("a finished generator" if finished else
                        f"an unfinished run ({f'checkpoint at step {last}' if last else 'no checkpoint yet'})")
                raise UserError(f"--out {out} already holds {what} with this config: pass --resume to "
                                f"{'keep it' if finished else 'continue it'} or --overwrite to train again")
            if finished:
                return -1
            (out / "model_index.json").unlink(missing_ok=True)  # about to change: must not look complete
            return last
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(json.dumps(cfg.training_fields(), indent=2) + "\n")
    return 0


def save_checkpoint(out: Path, step: int, unet, ema, optimizer, extra: dict, keep: int) -> Path:
    """Write checkpoints/step-N/ via a temp dir + rename; keep the newest `keep`."""
    from safetensors.torch import save_file

    final = out / "checkpoints" / f"{STEP_PREFIX}{step:06d}"
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}, tmp / "unet.safetensors")
    save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}, tmp / "ema_unet.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "step": step, **extra}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for _, old in checkpoint_dirs(out)[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: Path, unet, ema, optimizer) -> dict:
    """Restore weights (safetensors) and optimizer state (torch.load, weights_only); return the state dict."""
    from safetensors.torch import load_file

    unet.load_state_dict(load_file(path / "unet.safetensors"))
    ema.load_state_dict(load_file(path / "ema_unet.safetensors"))
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    return state


def append_log(out: Path, rows: list[dict], truncate_after: int | None = None) -> None:
    """Append rows to log.csv; on resume, first drop rows past the checkpoint (they will be trained again)."""
    path, fields = out / "log.csv", ["step", "loss", "lr", "images_per_s"]
    kept = []
    if path.is_file():
        kept = list(csv.DictReader(path.open()))
        if truncate_after is not None:
            kept = [r for r in kept if int(r["step"]) <= truncate_after]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept + rows)
