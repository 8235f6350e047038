"""The run directory of `clsp diffusion train`: its record, atomic checkpoints and log.

Refusing, resuming and overwriting the folder follow clsp.run_dir (GENERATOR_RUN): train_config.json is the record,
and a run is resumed only with the same training fields. Checkpoints are written to a temp dir and renamed into place,
so a listed checkpoint is always complete, and one that runs out of room leaves nothing behind.
"""
from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from clsp.accelerator import broadcast_int
from clsp.file_checks import IS_PNG, IS_TORCH_SAVE, is_safetensors, is_temp_of, json_with, owned_files, starts_with
from clsp.file_io import partial_removed, read_json, refused_if_not_ours, torch_save, write_atomic
from clsp.run_dir import RunDir, RunKind
from clsp.synth.models import CARD_NAME, INDEX_NAME  # INDEX_NAME is written last: a finished generator
from clsp.vocabulary import SOURCE_CHANGED

if TYPE_CHECKING:
    from clsp.synth.diffusion_train import DiffusionTrainConfig

CONFIG_NAME = "train_config.json"
STEP_PREFIX = "step-"
LOG_FIELDS = ("step", "loss", "lr", "images_per_s")


def checkpoint_dirs(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed into place only when fully written), oldest first."""
    found = []
    for path in (out / "checkpoints").glob(f"{STEP_PREFIX}*"):
        number = path.name[len(STEP_PREFIX):]
        if path.is_dir() and number.isdigit():
            found.append((int(number), path))
    return sorted(found)


def _finished(out: Path, steps: int) -> bool:
    return (out / INDEX_NAME).is_file() and bool(checkpoint_dirs(out)) and checkpoint_dirs(out)[-1][0] >= steps


def describe_run(out: Path) -> str:
    if _finished(out, read_json(out / CONFIG_NAME)["steps"]):  # called on a folder that holds our record
        return "a finished generator"
    last = checkpoint_dirs(out)[-1][0] if checkpoint_dirs(out) else 0
    return f"an unfinished run ({f'checkpoint at step {last}' if last else 'no checkpoint yet'})"


# The files a generator run writes (also synth.models.save_generator's), recognised by name pattern and content.
_OWNED = {
    CONFIG_NAME: json_with("clsp_run"), "log.csv": starts_with(",".join(LOG_FIELDS).encode()),
    "checkpoints/*step-*/*.safetensors": is_safetensors, "checkpoints/*step-*/state.pt": IS_TORCH_SAVE,  # + .tmp-step-N
    "samples/step-*.png": IS_PNG, "samples/.step-*.png.tmp-*": lambda p: p.name.rsplit("-", 1)[1].isdigit(),
    "unet/config.json": json_with("_class_name"), "unet/diffusion_pytorch_model.safetensors": is_safetensors,
    "scheduler/scheduler_config.json": json_with("_class_name"), CARD_NAME: json_with("weights_sha256"),
    "README.md": starts_with(b"# Generator "), INDEX_NAME: json_with("_class_name"),
    **{f".{name}.tmp-*": is_temp_of(name) for name in (CONFIG_NAME, "log.csv", CARD_NAME, "README.md", INDEX_NAME)},
}
GENERATOR_RUN = RunKind("generator", CONFIG_NAME, "clsp diffusion train", owned=lambda out: owned_files(out, _OWNED),
                        describe=describe_run, legacy_keys=("channels", "train_timesteps", "ema_decay"),
                        # disk retention only: the weights do not depend on it; the source as spelt (the same images
                        # at another path: source_fingerprint pins them)
                        operational=("keep_checkpoints", "source"),
                        hints={"source_fingerprint": SOURCE_CHANGED})


def resume_step(cfg: DiffusionTrainConfig, claim: RunDir, procs) -> int:
    """The step to train from in a claimed folder: 0 fresh, the newest checkpoint's step, or -1 (finished: nothing to
    do). All processes call this; the main one decides."""
    start = 0
    if claim.resumed and procs.is_main_process:
        if _finished(cfg.out, cfg.steps):
            start = -1
        else:
            (cfg.out / INDEX_NAME).unlink(missing_ok=True)  # about to change: must not look complete
            tidy_checkpoints(cfg.out, cfg.keep_checkpoints)  # a resume at its last step saves none that would
            start = checkpoint_dirs(cfg.out)[-1][0] if checkpoint_dirs(cfg.out) else 0
    return broadcast_int(procs, start)


def save_checkpoint(out: Path, step: int, unet, ema, optimizer, extra: dict, keep: int) -> Path:
    """Write checkpoints/step-N/ via a temp dir + rename; keep the newest `keep`."""
    from safetensors.torch import save_file

    final = out / "checkpoints" / f"{STEP_PREFIX}{step:06d}"
    tmp = final.with_name(f".tmp-{final.name}")
    tidy_checkpoints(out, keep)
    with partial_removed(tmp, f"while writing a checkpoint in {out}", " with --resume (the last complete checkpoint "
                         "is kept)"):
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}, tmp / "unet.safetensors")
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()},
                  tmp / "ema_unet.safetensors")
        torch_save({"optimizer": optimizer.state_dict(), "step": step, **extra}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    tidy_checkpoints(out, keep)
    return final


def tidy_checkpoints(out: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints. One goes out of the list (renamed to .tmp-step-N) before it is deleted, so
    a kill mid-delete leaves no partial checkpoint listed; the .tmp-step-N folders such kills, or a kill while one was
    written, left are deleted here."""
    for stale in (out / "checkpoints").glob(f".tmp-{STEP_PREFIX}*"):
        shutil.rmtree(stale)
    for _, old in checkpoint_dirs(out)[:-keep]:
        gone = old.with_name(f".tmp-{old.name}")
        old.rename(gone)
        shutil.rmtree(gone)


def rng_states(procs) -> dict:
    """Every process's state of torch's global RNGs, which dropout draws from (the step generator holds the rest):
    {"cpu": (world, n) uint8, "cuda": (world, m) uint8 on a GPU}. All processes call this. Tensors only, so state.pt
    stays loadable with torch.load(weights_only=True)."""
    states = {"cpu": torch.get_rng_state()}
    if procs.device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(procs.device)
    return {name: procs.gather(state.to(procs.device)[None]).cpu() for name, state in states.items()}


def restore_rng(states: dict | None, procs) -> bool:
    """Set this process's global RNGs from rng_states' result; False (nothing set) when it lacks a state this run
    draws from: a checkpoint of an older clsp, or one written on another kind of device or number of processes."""
    names = ("cpu", "cuda") if procs.device.type == "cuda" else ("cpu",)
    if not states or any(len(states.get(name, ())) != procs.num_processes for name in names):
        return False
    torch.set_rng_state(states["cpu"][procs.process_index].clone())
    if "cuda" in names:
        torch.cuda.set_rng_state(states["cuda"][procs.process_index].clone(), procs.device)
    return True


def load_checkpoint(path: Path, unet, ema, optimizer) -> dict:
    """Restore weights (safetensors) and optimizer state (torch.load, weights_only); return the state dict."""
    from safetensors.torch import load_file

    fix = f"delete {path} to resume from the checkpoint before it, or start again with --overwrite"
    for name, model in (("unet.safetensors", unet), ("ema_unet.safetensors", ema)):
        with refused_if_not_ours(path / name, fix):
            model.load_state_dict(load_file(path / name))
    with refused_if_not_ours(path / "state.pt", fix):
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
    return state


def append_log(out: Path, rows: list[dict], truncate_after: int | None = None) -> None:
    """Add rows to log.csv (rewritten atomically); on resume, first drop rows past the checkpoint (they will be
    trained again)."""
    path = out / "log.csv"
    kept = []
    if path.is_file():
        kept = [r for r in csv.DictReader(io.StringIO(path.read_text())) if str(r.get("step")).isdigit()]
        if truncate_after is not None:
            kept = [r for r in kept if int(r["step"]) <= truncate_after]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(kept + rows)
    write_atomic(path, buffer.getvalue())
