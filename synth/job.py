"""The synth job: a data source -> shards of (anchor, K synthetic positives) + a manifest, on one CPU, one GPU or many
processes under `accelerate launch` / `torchrun`.

Work is divided by shard, never by rank: shard i holds anchors [i * aps, (i + 1) * aps) in id order; the shards still
to make are dealt out to the ranks in turn (my_shards), and every world size writes the same files. Every random draw
is keyed on (seed, anchor id, candidate) (synth/noise.py: counter-based Philox noise by default, one CPU
torch.Generator per row with --noise cpu-generator), so the draws depend on neither batch size nor world size. The
UNet's float sums do depend on how many rows a forward pass holds (on the CPU too: the convolutions block the batch
differently), which can move a pixel by one level: run.json records the forward batch, and a rerun continues with it. A
shard appears under its final name only when complete (ShardWriter), so a killed job is resumed by running the same
command again; the manifest is written last.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field, fields, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from clsp.accelerator import available_cores, resolve_device
from clsp.errors import UserError
from clsp.file_checks import json_with, owned_files
from clsp.file_io import partial_removed
from clsp.presets import preset_values
from clsp.run_dir import RunKind, prepare_run_dir, read_record, remove_files
from clsp.sources import Record, refuse_out_inside
from clsp.shards.manifest import FORMAT, INDEX, MANIFEST, PENDING_INDEX, SYNTH_RECORD, Manifest, read_manifest
from clsp.shards.manifest_checks import looks_like_index
from clsp.shards.manifest_writer import expected_shards, file_sha256, manifest_run, settle_index, write_manifest
from clsp.shards.reader import ShardError, looks_like_shard
from clsp.shards.codecs import CODECS, DEFAULT_CODEC
from clsp.shards.schema import ShardSample
from clsp.shards.writer import SHARD_PATTERN, TEMP_PREFIX, ShardWriter, shard_name
from clsp.synth.noise import LEGACY_NOISE, candidate_seed, row_noise
from clsp.synth.job_setup import GENERATOR_CONFIGS, compute_record, image_library, load_job_generator, \
    compiled_as_the_job_runs, open_matching_source, prepare_unet, reference_scorer, run_metadata, sample_size
from clsp.synth.models import HUB_ID
from clsp.synth.sampler import SamplerConfig, sample_positives
from clsp.vocabulary import CPU_COMPILE_REFUSED, SOURCE_CHANGED

RUN_FILE = SYNTH_RECORD  # run.json: the intended run, written before any shard (a rerun is compared with it)
CPU_BATCH_ROWS = 256  # rows (anchors x K) per forward on the CPU when --forward-batch is not given
GPU_BATCH_ROWS = 2048  # first try on a GPU; halved on out-of-memory until it fits
# How long a process may wait in a collective. The processes meet when their shards are made (the manifest needs them
# all), so one with a shard fewer waits as long as the busiest one's last shard takes: 1,000 anchors x K at 96 px can
# outlast the backend's default (NCCL: 10 minutes), which aborted the waiting processes, and a rerun then aborted
# again. A process that fails still ends the job at once (its launcher stops the rest); this bounds a stuck one.
PROCESS_GROUP_TIMEOUT = timedelta(hours=24)


@dataclass(frozen=True)
class SynthConfig:
    source: str  # a clsp.sources spec (clsp.vocabulary.SPEC_HELP)
    model: str  # generator dir (diffusers layout: unet/, scheduler/) or hub id
    out: Path  # shard directory
    split: str = "train"
    image_size: int | None = None  # size the source is read at; None: its native size
    resize: bool = False  # resize anchors to the generator's sample size (else a size mismatch is an error)
    k: int = 8  # positives per anchor
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    seed: int = 0
    anchors_per_shard: int = 1000
    batch_size: int | None = None  # rows (anchors x K) per forward; None: CPU_BATCH_ROWS, or fill the GPU
    limit: int | None = None  # only the first N anchors (quick runs, tests)
    device: str | None = None  # "cpu" | "cuda"; None or "auto": cuda when available
    bf16: bool = True  # bf16 autocast on a GPU (ignored on the CPU)
    compile: bool = False  # torch.compile the UNet's blocks
    overwrite: bool = False  # clear shards made with other settings instead of refusing
    score_reference: bool = False  # also score each positive's class agreement with a reference classifier (labels)
    codec: str = "png"  # image members: png (smaller, for sharing) | raw (.npy, schema 3: no decoding when training)

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))
        problems = []
        if self.k < 1:
            problems.append(f"K = {self.k}: need at least 1 positive per anchor (--k 8 is the paper's)")
        if self.anchors_per_shard < 1:
            problems.append(f"anchors per shard = {self.anchors_per_shard}: use 1 or more (e.g. 1000)")
        if self.batch_size is not None and self.batch_size < 1:
            problems.append(f"batch size = {self.batch_size}: use 1 or more rows, or leave it out")
        if self.limit is not None and self.limit < 1:
            problems.append(f"limit = {self.limit}: use 1 or more anchors, or leave it out for all")
        if self.seed < 0:
            problems.append(f"seed = {self.seed}: use a seed >= 0")
        try:
            device = resolve_device(self.device)
            if device.index is not None:  # one GPU per process: PartialState picks it
                problems.append(f"--device {self.device}: use cuda (CUDA_VISIBLE_DEVICES picks the GPU)")
            if self.compile and device.type != "cuda":
                problems.append(CPU_COMPILE_REFUSED)
        except UserError as error:
            problems.append(str(error))
        if self.codec not in CODECS:
            problems.append(f"--codec {self.codec}: use {' or '.join(CODECS)} (png: smaller files, for sharing; raw: "
                            f".npy images that training reads without decoding)")
        try:
            refuse_out_inside(self.source, self.out)  # shards and index.parquet inside the source read
        except UserError as error:
            problems.append(str(error))
        if self.resize and self.image_size is not None:
            problems.append("--resize and --image-size both set the anchor size: keep one")
        if not Path(self.model).expanduser().exists() and not HUB_ID.fullmatch(self.model):  # a missing path: an error
            problems.append(f"model {self.model} does not exist: train one with `clsp diffusion train SOURCE "
                            f"--out {self.model}` or give a hub id such as google/ddpm-cifar10-32")
        if problems:
            raise UserError("; ".join(problems))


# The embedded default: 1,437 digits anchors (16 px) x K=4, 32 steps (16 lose 3 points of class agreement).
PRESETS: dict[str, dict] = {
    # w 0.2 rather than the paper's 0.1: on the shipped generator `clsp eval sweep` measured (256 anchors, 32 steps)
    # class agreement 86.5 / 86.1 / 84.9 % and distance to the anchor 1.47x / 1.50x / 1.53x the nearest real
    # neighbour's at w 0.1 / 0.2 / 0.25: 0.2 is the setting that keeps the class and is as hard as asked (README)
    # noise cpu-generator: those figures (and the shipped audit, 86.1 % / 1.50x) were measured with it; the same shards
    # with the counter noise audit at 86.4 % / 1.47x, within draw-to-draw noise but under the 1.5x hardness bar
    # sampler options flat, as on the command line (config_from_options puts them into the SamplerConfig), so that
    # `--help` can show what the preset changes
    "embedded": dict(source="digits", split="train", k=4, anchors_per_shard=240,
                     w=0.2, steps=32, noise="cpu-generator"),
}

SAMPLER_OPTIONS = {f.name for f in fields(SamplerConfig)}


def config_from_options(preset: str | None = None, **options) -> SynthConfig:
    """Preset values, then every option that is not None. Sampler options (the SamplerConfig fields) go into
    the SamplerConfig. Invalid values raise UserError."""
    values = preset_values(PRESETS, preset, options)
    sampler_given = {name: values.pop(name) for name in list(values) if name in SAMPLER_OPTIONS}
    try:
        values["sampler"] = replace(values.get("sampler", SamplerConfig()), **sampler_given)
    except ValueError as error:  # SamplerConfig validates w, steps, eta
        raise UserError(str(error)) from None
    return SynthConfig(**values)


def run_synth(cfg: SynthConfig):
    """Make every missing shard of `cfg.out`, then (main process) write the manifest. Returns the Manifest on the main
    process, None on the others. Run under torchrun/accelerate for several processes; works as a single process."""
    from accelerate import PartialState  # imported here: `import synth.job` stays cheap

    state = PartialState(cpu=resolve_device(cfg.device).type != "cuda",  # cpu: torchrun on a CPU forms a gloo group
                         timeout=PROCESS_GROUP_TIMEOUT)
    threads = torch.get_num_threads()
    try:
        return _run(*_continue_as_recorded(cfg, state), state)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: SynthConfig, continued: str | None, state):
    unet, scheduler, info = load_job_generator(cfg)
    source = open_matching_source(cfg, sample_size(unet))
    count = len(source) if cfg.limit is None else min(cfg.limit, len(source))
    if count == 0:
        raise UserError(f"{source.name} holds no images: check the source spec and split")
    compute = compute_record(cfg, state.device, forward_rows(cfg, state.device))
    run = {**run_metadata(cfg, source, count, info), "compute": compute}
    agreement = reference_scorer(cfg.source, source.image_size) if cfg.score_reference and state.is_main_process \
        else None  # fitted before the folder is claimed: a source without labels is refused with nothing written
    # a folder begun before the forward batch or the generator's config digests were recorded: which ones made its
    # shards cannot be known, so it reads as made with this run's and resumes as it did before (its run.json then
    # records them, and later resumes compare them)
    kind = replace(SYNTH_RUN, absent_means={**SYNTH_RUN.absent_means, "compute.forward_batch": compute["forward_batch"],
                                            **{f"generator.{key}": info[key] for key in GENERATOR_CONFIGS}})
    if cfg.out.is_dir():  # before --overwrite deletes the finished run: this refusal would leave nothing of it
        _refuse_foreign_shards(cfg.out)
    _check_anchors_decode(cfg, source, count, state)
    with prepare_run_dir(cfg.out, run, kind, resume=True, overwrite=cfg.overwrite, procs=state) as claim:
        if continued and state.is_main_process:  # only now: the record may have refused this run
            tqdm.write(continued, file=sys.stderr)
        if claim.resumed and state.is_main_process:  # a killed run's temp files; the manifest is dealt with at the end
            remove_files(cfg.out, [p for p in SYNTH_RUN.owned(cfg.out) if _TEMP_NAME.match(p.name)])
            settle_index(cfg.out)  # and the index a killed manifest write left under its pending name
        _refuse_foreign_shards(cfg.out)  # again, under the claim: one may have come meanwhile
        num_shards = math.ceil(count / cfg.anchors_per_shard)
        todo = _shards_to_make(cfg, count)
        mine = my_shards(todo, state.process_index, state.num_processes)
        state.wait_for_everyone()  # all ranks listed the dir before any new shard appears
        _write_shards(cfg, state, unet, scheduler, source, count, num_shards, todo, mine)
        state.wait_for_everyone()
        if not state.is_main_process:
            return None
        # A rerun leaves a manifest (and its index) that already describes this run and exactly these shards as it is,
        # unless new scores were asked for: it may hold agreement scores that this command was not asked to make.
        # Otherwise both are rewritten, the pair replaced so that they match at every moment (an interrupted rewrite
        # leaves the old pair, or the new one: write_manifest), and agreement scores that the old manifest recorded
        # are made again, so no rewrite drops them.
        manifest = None if todo or agreement is not None else _current_manifest(cfg.out, run)
        done = "manifest written" if manifest is None else "manifest kept (it describes these shards)"
        if manifest is None:
            if agreement is None and _scored_agreement(cfg.out):
                tqdm.write(f"note: {cfg.out}/{MANIFEST} scored class agreement: scoring it again for the new manifest",
                           file=sys.stderr)
                agreement = reference_scorer(cfg.source, source.image_size)
            manifest = write_manifest(cfg.out, run, agreement, complete=True)  # refuses a missing shard
    tqdm.write(f"{cfg.out}: {num_shards} shards, {count} anchors x {cfg.k} positives; {done}", file=sys.stderr)
    return manifest


def my_shards(todo: list[int], rank: int, world: int) -> list[int]:
    """The shards of `todo` (ascending) that process `rank` of `world` makes: every world-th from its rank's place, so
    a rerun's remaining shards are dealt out evenly too (by shard number, a rerun after a crash could leave them all to
    one process). Which process makes a shard never changes its bytes."""
    return todo[rank::world]


def _shards_to_make(cfg: SynthConfig, count: int) -> list[int]:
    """Numbers of the run's shards not yet under their final name in cfg.out."""
    return [i for i in range(math.ceil(count / cfg.anchors_per_shard)) if not (cfg.out / shard_name(i)).exists()]


def _check_anchors_decode(cfg: SynthConfig, source, count: int, state) -> None:
    """Decode every anchor of the shards still to make before anything is written: a damaged image met while sampling
    would stop the job after the shards before it, and replacing or removing it changes the source's fingerprint, so
    those shards could then only be deleted (--overwrite), not continued. Every process checks them all (the same
    verdict everywhere, so none waits for a failed one), on its share of the cores."""
    per = cfg.anchors_per_shard
    positions = [p for i in _shards_to_make(cfg, count) for p in range(i * per, min((i + 1) * per, count))]
    threads = max(1, min(16, available_cores() // state.num_processes))
    with tqdm(total=len(positions), desc="checking anchors", unit="img", leave=False, position=0, dynamic_ncols=True,
              disable=not state.is_main_process or not positions, file=sys.stderr) as bar:
        source.check_readable(positions, threads, bar)


def _current_manifest(out: Path, run: dict) -> Manifest | None:
    """The folder's manifest when it records this run and lists exactly its shards as they are on disk, else None."""
    try:
        manifest = read_manifest(out)
    except ShardError:  # none, damaged, or an index that was being replaced: rewritten
        return None
    recorded, today = ({k: v for k, v in r.items() if k != "scores"} for r in (manifest.run, manifest_run(run)))
    if recorded != json.loads(json.dumps(today)) or [s["name"] for s in manifest.shards] != expected_shards(run) \
            or manifest.count != run["source"]["count"]:
        return None  # another clsp or record (e.g. schema version 1, without scores), or other shards
    same = all((out / s["name"]).stat().st_size == s["bytes"] and file_sha256(out / s["name"]) == s["sha256"]
               for s in manifest.shards)
    return manifest if same else None


def _scored_agreement(out: Path) -> bool:
    """Whether the folder's manifest.json records agreement scores (its JSON alone: also while its index is changed)."""
    try:
        return "agreement" in json.loads((out / MANIFEST).read_bytes())["run"]["scores"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write_shards(cfg, state, unet, scheduler, source, count, num_shards, todo, mine) -> None:
    unet = prepare_unet(unet, state.device, cfg.compile)
    batch_rows = forward_rows(cfg, state.device) or GPU_BATCH_ROWS
    progress = _progress_bar(cfg, todo, mine, count, num_shards, state)
    # --compile: a graph per batch shape, each compiled (past dynamo's default limit a block would run eagerly), and
    # no kernel chosen by timing it
    try:
        with compiled_as_the_job_runs() if cfg.compile else contextlib.nullcontext():
            for index in mine:
                start, stop = index * cfg.anchors_per_shard, min((index + 1) * cfg.anchors_per_shard, count)
                records = list(source.records(start, stop))
                began = time.perf_counter()
                batch_rows = _write_shard(cfg, index, records, unet, scheduler, state, batch_rows, progress)
                rate = len(records) * cfg.k / (time.perf_counter() - began)
                if state.is_main_process:  # the others' lines would land inside its bar's line, which they cannot see
                    tqdm.write(f"[rank {state.process_index}] wrote {shard_name(index)}: {len(records)} anchors x "
                               f"{cfg.k} positives ({rate:.1f} images/s)", file=sys.stderr)
    finally:
        progress.close()  # before any error message, so that it starts on its own line


# --- setup ---------------------------------------------------------------------------------------------------------


def forward_rows(cfg: SynthConfig, device: torch.device) -> int | None:
    """Rows (anchors x K) per forward pass: --forward-batch, else CPU_BATCH_ROWS on the CPU; None on a GPU, where the
    job starts at GPU_BATCH_ROWS and halves on out-of-memory."""
    return cfg.batch_size or (None if device.type == "cuda" else CPU_BATCH_ROWS)


def _continue_as_recorded(cfg: SynthConfig, state) -> tuple[SynthConfig, str | None]:
    """Continue a folder with what its shard bytes depend on that the command line may leave out, so that its shards
    match: on the CPU the thread count it was begun with (torchrun sets 1 per process), and the forward batch when
    --forward-batch is not given. Returns the config and a note saying so, if anything was taken over; a
    --forward-batch given otherwise is refused by the record."""
    record = None if cfg.overwrite else read_record(cfg.out, SYNTH_RUN)
    compute = (record or {}).get("compute") or {}
    notes = []
    threads = compute.get("threads")
    if state.device.type == "cpu" and isinstance(threads, int) and threads >= 1 and threads != torch.get_num_threads():
        notes.append(f"{threads} CPU thread(s) per process (this process has {torch.get_num_threads()})")
        torch.set_num_threads(threads)
    rows = compute.get("forward_batch")
    if cfg.batch_size is None and isinstance(rows, int) and rows >= 1 and rows != forward_rows(cfg, state.device):
        notes.append(f"--forward-batch {rows}")
        cfg = replace(cfg, batch_size=rows)
    note = f"note: {cfg.out} was begun with {' and '.join(notes)}: continuing so, so that its shards match"
    return cfg, note if notes else None


def _refuse_foreign_shards(out: Path) -> None:
    """Before any sampling: a file under a shard's name that is not a shard (a user's tar) would count as done and
    then be refused at the manifest, after the GPU-hours."""
    foreign = [p.name for p in sorted(out.glob("shard-*.tar")) if SHARD_PATTERN.fullmatch(p.name)
               and not looks_like_shard(p)]
    if foreign:
        raise UserError(f"{out} holds {', '.join(foreign[:5])} under shard names, but not shards clsp wrote: move "
                        f"them out of {out} (--overwrite deletes only the shards clsp wrote); nothing was sampled")


# The files a synth run writes, recognised by name pattern and content: what --overwrite deletes.
_TEMP_NAME = re.compile(rf"^{re.escape(TEMP_PREFIX)}(shard-[0-9]{{6}}\.tar|{re.escape(MANIFEST)}|{re.escape(INDEX)}|"
                        rf"{PENDING_INDEX.pattern})\.[0-9]+$")  # what a killed writer leaves: ShardWriter's and the
# manifest's temp files (the index's under its pending name; under index.parquet's from an older clsp)
_OWNED = {
    "shard-*.tar": lambda p: bool(SHARD_PATTERN.fullmatch(p.name)) and looks_like_shard(p),
    f"{TEMP_PREFIX}*": lambda p: bool(_TEMP_NAME.match(p.name)),
    MANIFEST: json_with(format=FORMAT),
    INDEX: looks_like_index,
    "index-*.parquet": lambda p: bool(PENDING_INDEX.fullmatch(p.name)) and looks_like_index(p),  # write_manifest's
    RUN_FILE: json_with("clsp_run"),
}


def _describe(out: Path) -> str:
    return f"a synth run ({len(list(out.glob('shard-*.tar')))} shards finished)"


# Every run.json field must match to continue a folder, except these (the spec's wording, the hub name, clsp's version).
SYNTH_RUN = RunKind("synth", RUN_FILE, "clsp synth run", owned=lambda out: owned_files(out, _OWNED),
                    describe=_describe, operational=("source.spec", "generator.model_id", "package_version",
                                                      "schema_version"),  # 1 -> 2: same shards, scored index;
                    # 2 or 3 follows the codec, which is compared itself ("codec: 'png' there, 'raw' now")
                    legacy_keys=("schema_version", "generator", "sampler", "anchors_per_shard"),
                    absent_means={"sampler.noise": LEGACY_NOISE,  # runs begun before the counter noise
                                  "codec": DEFAULT_CODEC,  # runs begun before the raw codec
                                  # runs begun before Pillow was recorded: which one made their shards cannot be
                                  # known, so they read as made with today's and resume as they did before
                                  **{f"compute.{key}": value for key, value in image_library().items()}},
                    hints={f"compute.{key}": "its shards' bytes depend on the device and software that run.json "
                                             "records under compute, which no option changes: continue it where they "
                                             "are the same (install the versions it names)"
                           for key in ("device", "gpu", "machine", "torch", "diffusers", "pillow", "zlib", "zlib_ng")}
                    # not source.count: --limit, recorded only there, changes it too (the options are the fix)
                    | {"source.fingerprint": SOURCE_CHANGED})


def _progress_bar(cfg: SynthConfig, todo: list[int], mine: list[int], count: int, num_shards: int, state):
    """One bar, on the main process, over the images of its own shards (`mine`): it sees only its own work. Shards are
    dealt out in turn, so it has the most; the others finish about when it does."""
    images = sum(min((i + 1) * cfg.anchors_per_shard, count) - i * cfg.anchors_per_shard for i in mine) * cfg.k
    world = state.num_processes
    skipped = num_shards - len(todo)
    desc = "synth" + (f" (rank 0 of {world}: {len(mine)} of {len(todo)} shards)" if world > 1 else "")
    if state.is_main_process and skipped:
        tqdm.write(f"{cfg.out}: {skipped} of {num_shards} shards already finished, skipped", file=sys.stderr)
    return tqdm(total=images, desc=desc, unit="img", disable=not state.is_main_process, dynamic_ncols=True)


# --- one shard -----------------------------------------------------------------------------------------------------
def _write_shard(cfg, index, records, unet, scheduler, state, batch_rows, progress) -> int:
    """Sample and write shard `index`; returns the batch size (rows) that fitted, for the next shard."""
    path = cfg.out / shard_name(index)
    writer = ShardWriter(path, k=cfg.k, image_size=records[0].image.shape[0], codec=cfg.codec)
    # the writer removes its temp file too, but not always when its final flush fails on a full disk
    with partial_removed(writer.temp, f"while writing {path.name} in {cfg.out}", f" (finished shards are kept; "
                         f"{path.name} was not written)"):
        with writer:
            done = 0
            while done < len(records):
                per_batch = max(1, batch_rows // cfg.k)  # whole anchors: shared anchor noise needs all K rows
                batch = records[done:done + per_batch]
                try:
                    positives, seeds = sample_batch(cfg, batch, unet, scheduler, state.device)
                except torch.cuda.OutOfMemoryError:
                    if per_batch == 1:
                        raise UserError(f"one anchor x K={cfg.k} does not fit on the GPU: lower --k") from None
                    torch.cuda.empty_cache()
                    # Each row keeps its seeds, but a smaller batch may pick kernels that round differently: the
                    # positives can differ in their last bit from a run that fitted at the first size (README).
                    # run.json records the forward batch asked for (None: the GPU's default), not the halved one.
                    batch_rows = max(cfg.k, batch_rows // 2)
                    continue
                for record, images, row_seeds in zip(batch, positives, seeds):
                    writer.write(ShardSample(anchor_id=record.anchor_id, anchor=record.image, positives=images,
                                             label=record.label, seeds=row_seeds))
                done += len(batch)
                progress.update(len(batch) * cfg.k)
    return batch_rows


def sample_batch(cfg: SynthConfig, batch: list[Record], unet, scheduler, device: torch.device):
    """K positives for each anchor of `batch` -> (uint8 (A, K, H, W, 3), seeds [[K ints]] per anchor).

    Row a * K + j is candidate j of anchor a. Its x_T and its per-step noise are keyed on
    candidate_seed(seed, anchor_id, j) (synth/noise.py), except that with share_anchor_noise the per-step draws that
    re-noise the anchor are keyed on candidate_seed(seed, anchor_id, "anchor"), shared by the anchor's K rows. So a
    row's output depends only on its anchor, j and the seed (on a GPU, up to the last bit, also on the batch size).
    """
    k = cfg.k
    seeds = [[candidate_seed(cfg.seed, r.anchor_id, j) for j in range(k)] for r in batch]
    size = batch[0].image.shape[0]
    noise = row_noise(cfg.sampler.noise, cfg.seed, [r.anchor_id for r in batch], k, cfg.sampler.share_anchor_noise,
                      "inductor" if cfg.compile else None)  # --compile: GPU only (SynthConfig)
    pixels = torch.from_numpy(np.stack([r.image for r in batch]))  # (A, H, W, 3) uint8
    anchors = pixels.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # (A, 3, H, W) in [-1, 1]
    anchors = anchors.repeat_interleave(k, dim=0)  # (A*K, 3, H, W)
    fast = device.type == "cuda" and cfg.bf16  # bf16 autocast + channels_last inside the sampler
    x0 = sample_positives(unet, scheduler, anchors, noise, cfg.sampler, fast=fast)
    images = ((x0.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (A*K, 3, H, W)
    images = images.permute(0, 2, 3, 1).reshape(len(batch), k, size, size, 3).cpu().numpy()  # (A, K, H, W, 3)
    return images, seeds
