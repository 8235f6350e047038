"""Training state on disk: checkpoints that survive a kill, the run's config and the backbone for evaluation.

A run directory holds:
    config.json             what the run is (training options, data, backbone, normalisation); written at the start
    checkpoint/             the last complete checkpoint: model.safetensors (weights, incl. the momentum encoders
                            and the queues' buffers), optimizer.pt, scheduler.pt, rng-rank{R}.pt (torch, numpy, python,
                            cuda RNG of each process) and position.json (next epoch, step in epoch, global step)
    backbone.safetensors    the encoder evaluated downstream (`load_backbone`)
    log.csv, summary.json   per-step log; summary.json appears when the run finished
A checkpoint is written to a temporary directory and renamed into place, so a kill or a full disk leaves the previous
one intact. Non-weight state is read back with `torch.load(weights_only=True)`: nothing is executed, and a file that is
not ours is refused with a clear error. The folder itself (refusing, resuming, --overwrite) is clsp.run_dir's.
"""
from __future__ import annotations

import csv
import io
import random
import shutil
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from clsp.errors import UserError
from clsp.file_checks import IS_TORCH_SAVE, contains, is_safetensors, is_temp_of, json_with, owned_files, starts_with
from clsp.file_io import partial_removed, read_json, refused_if_not_ours, torch_save, write_atomic, write_json
from clsp.run_dir import run_here, stage_output

CHECKPOINT, BACKBONE, CONFIG, LOG, SUMMARY = ("checkpoint", "backbone.safetensors", "config.json", "log.csv",
                                              "summary.json")
LOG_COLUMNS = ("step", "epoch", "lr", "loss", "loss_base", "loss_clsp", "images_per_s", "knn_top1_pct")
_LOG_COLUMNS_V1 = (*LOG_COLUMNS[:-1], "knn_top1")  # logs before the monitor was in percent (a fraction): still ours
_TEMP, _OLD = ".checkpoint.tmp", ".checkpoint.old"


class Processes(Protocol):  # an accelerate Accelerator or PartialState
    process_index: int
    is_main_process: bool

    def wait_for_everyone(self) -> None: ...


# The files a training run writes, recognised by name pattern and content: what --overwrite deletes.
TRACKER_DIR = "tracker"  # --log-with: the tracker's files (tensorboard: event files) under OUT/tracker/


_OWNED = {
    CONFIG: json_with("clsp_run"), f".{CONFIG}.tmp-*": is_temp_of(CONFIG),
    SUMMARY: json_with("finished"), f".{SUMMARY}.tmp-*": is_temp_of(SUMMARY),
    BACKBONE: is_safetensors, f".{BACKBONE}.tmp-*": is_temp_of(BACKBONE),
    f"{TRACKER_DIR}/events.out.tfevents.*": contains(b"brain.Event:", 64),  # tensorboard's first record
    LOG: lambda path: any(starts_with(",".join(columns).encode())(path) for columns in (LOG_COLUMNS, _LOG_COLUMNS_V1)),
    f".{LOG}.tmp-*": is_temp_of(LOG),  # RunLog's rewrite on resume
    **{f"{folder}/{name}": check for folder in (CHECKPOINT, _TEMP, _OLD) for name, check in {
        "model.safetensors": is_safetensors, "*.pt": IS_TORCH_SAVE, "position.json": json_with("global_step"),
        ".position.json.tmp-*": is_temp_of("position.json")}.items()},
}


def run_files(out: Path) -> list[Path]:
    """The files of a training run in `out` (clsp.file_checks.owned_files), the markers "finished" and "a complete
    checkpoint" first: --overwrite deletes in this order, so a kill midway never leaves a run that reads as finished
    without its backbone, or a checkpoint that reads as complete without its weights."""
    return sorted(owned_files(out, _OWNED), key=lambda path: path.name not in (SUMMARY, "position.json"))


def describe_run(out: Path) -> str:
    if (out / SUMMARY).exists():
        return "a finished training run"
    found = find_checkpoint(out)
    readable = found is not None and json_with("global_step")(found / "position.json")
    where = read_json(found / "position.json") if readable else None
    return (f"a training run (checkpoint after step {where['global_step']})" if where else
            "a training run (no checkpoint yet)")


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain numbers (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": [version, torch.tensor(internal, dtype=torch.int64), gauss_next]}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        # one state per GPU the saving process could see: set those visible now (a one-GPU run begun with two GPUs
        # visible goes on under CUDA_VISIBLE_DEVICES=0, say), where set_rng_state_all would fail on the missing one
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(int(v) for v in internal.tolist()), gauss_next))


def find_checkpoint(out: Path) -> Path | None:
    """The last complete checkpoint, also when a kill fell between the two renames of `save_checkpoint`."""
    for name in (CHECKPOINT, _OLD):
        if (out / name / "position.json").exists():
            return out / name
    return None


def settle_checkpoint(out: Path) -> None:
    """Finish the swap of `save_checkpoint` that a kill cut short: the last complete checkpoint under its own name,
    and no previous one beside it (a kill between the two renames, or during the delete)."""
    final, old = out / CHECKPOINT, out / _OLD
    if not (final / "position.json").exists() and (old / "position.json").exists():
        old.rename(final)  # `final` is only ever made by a rename of a whole checkpoint: absent here
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(out: Path, procs: Processes, model: nn.Module, optimizer, scheduler, position: dict,
                    backbone: nn.Module) -> Path:
    """Every process calls this (it synchronises them). `model` and `backbone` are unwrapped (no DDP)."""
    temp, final, old = out / _TEMP, out / CHECKPOINT, out / _OLD
    if procs.is_main_process:
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir(parents=True)
    procs.wait_for_everyone()
    with partial_removed(temp, f"while writing a checkpoint in {out}", " with --resume (the last complete checkpoint "
                         "is kept)"):
        torch_save(rng_state(), temp / f"rng-rank{procs.process_index}.pt")
        if procs.is_main_process:
            save_model(model, str(temp / "model.safetensors"))
            torch_save(optimizer.state_dict(), temp / "optimizer.pt")
            torch_save(scheduler.state_dict(), temp / "scheduler.pt")
            write_json(temp / "position.json", position)
            save_backbone(out, backbone)
    procs.wait_for_everyone()
    if procs.is_main_process:  # swap in the new checkpoint; `find_checkpoint` copes with a kill between the renames
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        temp.rename(final)
        settle_checkpoint(out)
    procs.wait_for_everyone()
    return final


def load_checkpoint(checkpoint: Path, process_index: int, model: nn.Module, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and this process's RNG; returns the position to continue from."""
    rng_file = checkpoint / f"rng-rank{process_index}.pt"
    fix = f"restore {checkpoint} or start again with --overwrite"
    if not rng_file.exists():
        raise UserError(f"{rng_file} is missing: the checkpoint was written by fewer processes; resume with as many "
                        f"processes as before, or start again with --overwrite")
    with refused_if_not_ours(checkpoint / "model.safetensors", fix):
        load_model(model, str(checkpoint / "model.safetensors"))
    for name, target in (("optimizer.pt", optimizer), ("scheduler.pt", scheduler)):
        with refused_if_not_ours(checkpoint / name, fix):
            target.load_state_dict(torch.load(checkpoint / name, map_location="cpu", weights_only=True))
    with refused_if_not_ours(rng_file, fix):
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    with refused_if_not_ours(checkpoint / "position.json", fix):
        return read_json(checkpoint / "position.json")


def save_backbone(out: Path, backbone: nn.Module) -> None:
    write_atomic(out / BACKBONE, lambda temp: save_model(backbone, str(temp)))


def load_backbone(run_dir: str | Path) -> tuple[nn.Module, dict]:
    """(backbone in eval mode on the CPU, run config dict) from a run directory's backbone.safetensors + config.json.

    The config has `image_size` and `normalize` {mean, std}: feed the backbone (B, 3, image_size, image_size) floats
    normalised with them, as the training augmentation did."""
    from clsp.train.backbones import RESNET_LAYOUTS, build_backbone

    run_dir = Path(run_dir)
    for name in (CONFIG, BACKBONE):
        if not (run_dir / name).exists():
            if (run_here(run_dir) or ("",))[0] == "train":  # its record is there: it has not saved a checkpoint yet
                raise UserError(f"{run_dir} has no {BACKBONE} yet: its training is still running, or stopped before "
                                f"its first checkpoint; finish it with `clsp train run SHARDS --out {run_dir} "
                                f"--resume` (the same options), then evaluate")
            held = stage_output(run_dir)
            if held:
                raise UserError(f"{run_dir} holds {held}, not a training run: pass the folder `clsp train run` wrote "
                                f"(its --out)")
            raise FileNotFoundError(f"{run_dir / name} does not exist: train a model there first "
                                    "(`clsp train run SHARDS --out DIR`)")
    fix = "point to a run directory written by `clsp train run`, or train it again there"
    with refused_if_not_ours(run_dir / CONFIG, fix):
        config = read_json(run_dir / CONFIG)
        spec = config["backbone"]
        name = spec["name"]
    if isinstance(name, str) and name not in RESNET_LAYOUTS:  # a backbone added to the code that trained it
        raise UserError(f"{run_dir} was trained with backbone {name!r}, which this clsp does not have "
                        f"({', '.join(sorted(RESNET_LAYOUTS))}): evaluate it where the code that trained it is "
                        f"installed")
    with refused_if_not_ours(run_dir / CONFIG, fix):
        with torch.device("meta"):  # shapes only: config.json's width must not size an allocation before it is checked
            skeleton, _ = build_backbone(spec["name"], width=spec["width"], small_stem=spec["small_stem"])
    with refused_if_not_ours(run_dir / BACKBONE, fix):
        with safe_open(str(run_dir / BACKBONE), "pt") as weights:
            stored = {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}
    if stored != {key: tuple(value.shape) for key, value in skeleton.state_dict().items()}:
        raise UserError(f"{run_dir / BACKBONE} does not hold the weights of the {spec['name']} of width "
                        f"{spec['width']} that {run_dir / CONFIG} names (other tensors or shapes): the two files are "
                        f"not of one run; {fix}")
    backbone, _ = build_backbone(spec["name"], width=spec["width"], small_stem=spec["small_stem"])
    with refused_if_not_ours(run_dir / BACKBONE, fix):
        load_model(backbone, str(run_dir / BACKBONE))
    return backbone.eval(), config


class RunLog:
    """log.csv rows, appended at flush (the main process writes); rows past the resumed checkpoint are dropped."""

    def __init__(self, path: Path, writer: bool, keep_steps: int):
        self.path, self.writer, self.rows, self.last = path, writer, [], None
        if writer and path.exists():
            with open(path, newline="") as handle:  # a row cut short by a full disk is dropped with the rest
                kept = [r for r in csv.DictReader(handle)
                        if str(r.get("step")).isdigit() and int(r["step"]) <= keep_steps]
            for row in kept:  # a log begun before the monitor was logged in percent held a fraction in knn_top1
                if row.get("knn_top1") not in (None, ""):
                    row["knn_top1_pct"] = f"{float(row.pop('knn_top1')) * 100:.6g}"
            write_atomic(path, _csv_text(kept, header=True))
            if kept:  # the summary's figures, for a run stopped after its last checkpoint and before its summary
                self.last = {**kept[-1], **{key: float(kept[-1][key]) for key in ("loss", "knn_top1_pct")
                                            if kept[-1].get(key) not in (None, "")}}

    def add(self, **row) -> None:
        self.last = {"knn_top1_pct": "", **row}
        self.rows.append(self.last)

    def set_last(self, **values) -> None:
        if self.last is not None:
            self.last.update(values)

    def flush(self) -> None:
        if self.writer and self.rows:
            text = _csv_text(self.rows, header=not self.path.exists())
            with open(self.path, "a", newline="") as handle:
                handle.write(text)
        self.rows = []


def _csv_text(rows: list[dict], header: bool) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, LOG_COLUMNS, extrasaction="ignore")
    if header:
        writer.writeheader()
    writer.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    return buffer.getvalue()
