"""Where anchor images come from: one interface over the embedded digits, Parquet, image folders, CIFAR and STL-10.

Every source yields `Record(anchor_id, image (H, W, 3) uint8, label or -1)` in a fixed order, with ids that are stable
across runs and machines (derived from file names and row positions, never from paths of this machine) and contain no
dots (a WebDataset key ends at the first dot). `fingerprint()` hashes the content (ids, labels, encoded bytes or pixels)
and the image size, so a shard directory can prove which data it was made from.

Splits mean the same for every kind: a file or folder named for a split (`train...`, `test...`, `val...`,
`validation...`; val and validation are the test split) holds that split; a location holding such parts (DIR/train +
DIR/val, train-*.parquet + test-*.parquet) holds those splits; a location whose names say no split is one split, read
as train, and `--split test` on it is refused (OneSplitError) rather than silently scoring the training images.

This module holds the `Source` base, the split rule and `open_source`; the per-format subclasses are in
clsp/source_formats.py.
"""
from __future__ import annotations

import fnmatch
import hashlib
import io
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from clsp.errors import UserError
from clsp.shards.schema import MAX_ID_CHARS
from clsp.vocabulary import SPEC_HELP

# the PIL formats a source image may be in (those of IMAGE_EXTENSIONS): PIL would open others too, by their content,
# and loading some runs an external program on the file (EPS: Ghostscript)
PIL_FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "GIF", "TIFF")

SPLITS = ("train", "test", "all")
TEST_NAMES = ("test", "val", "validation")  # a folder or file named for one of these holds the test split
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_SPLIT_NAME = re.compile(r"(train|test|validation|val)(?![a-z])")  # "train-0000" and "val_x" yes, "values" no


class OneSplitError(UserError):
    """`--split test` asked of a location whose names say no split: it is one split, read as train."""


class NoLabelsError(UserError):
    """`load_arrays(..., labelled=True)` on a source none of whose images has a label."""


@dataclass(frozen=True)
class Record:
    anchor_id: str
    image: np.ndarray  # (H, W, 3) uint8
    label: int  # -1 when unknown


def safe_id(text: str, max_chars: int = MAX_ID_CHARS) -> str:
    """Map a file name or relative path to an id of letters, digits, '_' and '-' only, at most `max_chars` long: a
    longer one keeps its head and ends with 12 hex digits of the text's sha256, so it stays unique and the same on
    every machine (the shard schema allows 80 characters; a source that appends a row number asks for fewer)."""
    anchor_id = _UNSAFE_ID_CHARS.sub("_", text).strip("_") or "x"
    if len(anchor_id) <= max_chars:
        return anchor_id
    return f"{anchor_id[:max_chars - 13]}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def split_named(name: str, prefix: bool) -> str | None:
    """The split word (train, test, val, validation) that a file name starts with (`prefix`) or a folder name is."""
    match = _SPLIT_NAME.match(name.lower())
    return match.group(1) if match and (prefix or match.end() == len(name)) else None


def pick_split(parts: dict, split: str, where: str, example: str) -> list:
    """The items of `split` among `parts` ({split word or None: items}), by the one rule of every source kind.

    No word: one split, read as train and all; test is refused (OneSplitError). Words: train -> the train part, test ->
    the test, val or validation part (refused when two of them exist), all -> every part. `example` shows how to name
    one split's images as their own source, with {} for the split, e.g. "folder:DIR/{}".
    """
    named = sorted(w for w in parts if w)
    if named and None in parts:
        others = ", ".join(sorted(Path(p).name for p in parts[None])[:3])
        raise UserError(f"{where} mixes parts named for a split ({', '.join(named)}) with others ({others}): move the "
                        f"others out, or name one split's files or folder as the source")
    if not named:
        if split == "test":
            raise OneSplitError(f"{where} names no split (no file or folder name starts with the word train, test, "
                                f"val or validation followed by a non-letter: train-0.parquet is named, "
                                f"training.parquet is not), "
                                f"so it is one split, read as train: name the test images as their own source "
                                f"(e.g. {example.format('test')}; `clsp eval` takes it as --test-source)")
        return parts[None]
    if split == "all":
        return sorted(item for w in named for item in parts[w])
    present = [w for w in named if w in (("train",) if split == "train" else TEST_NAMES)]
    if len(present) != 1:
        problem = f"both {' and '.join(present)}" if present else f"no {split} split (only {', '.join(named)})"
        eval_hint = "; `clsp eval` takes it as --test-source" if split == "test" else ""
        raise UserError(f"{where} holds {problem}: name the {split} images as their own source (e.g. "
                        f"{example.format(split)}{eval_hint})")
    return parts[present[0]]


def splits_note(parts: dict) -> str:
    """What `data info` says about a location's splits, e.g. "train (train), test (val)"."""
    named = sorted(w for w in parts if w)
    if not named:
        return "one split (its names say no train/test/val): read as train and all; --split test is refused"
    return ", ".join(f"{'test' if w in TEST_NAMES else w} ({w})" for w in named)


def to_rgb_square(image: Image.Image, size: int | None) -> np.ndarray:
    """PIL image -> (size, size, 3) uint8: RGB, centre-cropped to a square, resized (bicubic) when size differs.
    16-bit grayscale (PIL modes I;16*, I) keeps its top 8 bits; PIL's own RGB conversion would clip it to 0 or 255."""
    if image.mode.startswith("I;16") or image.mode == "I":
        levels = np.asarray(image).astype(np.int64)  # (H, W) in 0..65535
        image = Image.fromarray(np.clip(levels >> 8, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        raise ValueError("a floating-point image (PIL mode F) has no fixed range to read as 8-bit levels: "
                         "save it as 8- or 16-bit PNG")
    image = image.convert("RGB")
    w, h = image.size
    if w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if size is not None and image.size[0] != size:
        image = image.resize((size, size), Image.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


class Source:
    """Base class: subclasses fill `_items()` (cheap per-item handles in id order) and `_load(item)`."""

    kind = "source"

    def __init__(self, spec: str, split: str, image_size: int | None):
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}: use one of {', '.join(SPLITS)} (test reads the folders and "
                            f"files named {', '.join(TEST_NAMES)})")
        if image_size is not None and not 4 <= image_size <= 1024:
            raise UserError(f"image size {image_size} is out of range: use 4..1024 pixels")
        self.spec, self.split, self._size = spec, split, image_size
        self._native = image_size is None  # every image must then crop to the first one's size
        self._fingerprint: str | None = None

    # --- to implement -------------------------------------------------------------------------------------------
    def _items(self) -> list:  # one small handle per image, in id order
        raise NotImplementedError

    def _load(self, item) -> Record:
        raise NotImplementedError

    def _content_digest(self, item) -> tuple[str, int, bytes]:
        """(id, label, bytes that identify the image) for the fingerprint; default: the decoded pixels."""
        record = self._load(item)
        return record.anchor_id, record.label, record.image.tobytes()

    def labels(self) -> np.ndarray | None:
        """Labels (N,) int64 in id order (-1: none) when known without reading the images; None: read them to see."""
        return None

    classes: list[str] = []
    splits = "train, test"  # what `data info` says about the splits (see splits_note)
    encoded = False  # whether _content_digest gives each image's encoded file (PNG, JPEG...): its header says its size

    # --- shared -------------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return f"{self.spec}[{self.split}]"

    @property
    def image_size(self) -> int:
        if self._size is None:  # native size: read it off the first image
            if len(self) == 0:
                raise UserError(f"{self.name} holds no images: check the source spec and split")
            self._size = int(next(iter(self)).image.shape[0])
        return self._size

    def __len__(self) -> int:
        return len(self._items())

    def __iter__(self) -> Iterator[Record]:
        return self.records(0, len(self))

    def records(self, start: int, stop: int) -> Iterator[Record]:
        """Records at positions [start, stop) of the id order."""
        return self.records_at(range(start, min(stop, len(self))))

    def records_at(self, positions) -> Iterator[Record]:
        """Records at these positions of the id order."""
        items = self._items()
        for position in positions:
            yield self._sized(self._load(items[position]))

    def _sized(self, record: Record) -> Record:
        if self._size is not None and record.image.shape != (self._size, self._size, 3):
            raise self._other_size(record.anchor_id, record.image.shape[1], record.image.shape[0])
        return record

    parallel_loads = False  # whether _load may run in several threads at once (it keeps no state between calls)

    def check_readable(self, positions, threads: int = 1, progress=None) -> None:
        """Decode the images at these positions and drop them: raises the UserError that names the first unreadable
        (damaged, truncated) or odd-sized one. Threads where `parallel_loads` (PIL decodes without the GIL)."""
        from concurrent.futures import ThreadPoolExecutor

        items = self._items()

        def check(position: int) -> None:
            self._sized(self._load(items[position]))

        pool = ThreadPoolExecutor(threads if self.parallel_loads else 1)
        try:
            for _ in pool.map(check, positions):  # in order: the first bad image in id order is the one named
                if progress is not None:
                    progress.update()
        finally:  # on the first bad image, the checks not begun are dropped rather than waited for
            pool.shutdown(wait=True, cancel_futures=True)

    def _other_size(self, anchor_id: str, width: int, height: int) -> UserError:
        return UserError(f"{self.name}: image {anchor_id} is {width}x{height}, the others {self._size}x{self._size}: "
                         f"pass --image-size to resize them all")

    def fingerprint(self) -> str:
        """sha256 over (kind, split, image size, then id, label and content digest of every image, in order)."""
        if self._fingerprint is None:
            digest = hashlib.sha256(f"{self.kind}|{self.split}|{self.image_size}".encode())
            for item in self._items():
                anchor_id, label, content = self._content_digest(item)
                if self._native and self.encoded:  # here (a header read) rather than when sampling gets to it
                    self._check_side(anchor_id, content)
                digest.update(f"|{anchor_id}|{label}|".encode())
                digest.update(hashlib.sha256(content).digest())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def _check_side(self, anchor_id: str, encoded: bytes) -> None:
        """An encoded image whose centre square (to_rgb_square) is not the source's native size: refused."""
        try:
            with Image.open(io.BytesIO(encoded), formats=PIL_FORMATS) as image:
                width, height = image.size
        except (OSError, ValueError):  # unreadable: its _load names it
            return
        if min(width, height) != self._size:
            raise self._other_size(anchor_id, width, height)

    def describe(self) -> dict:
        from tqdm.auto import tqdm

        known = self.labels()
        labels = known.tolist() if known is not None else [
            r.label for r in tqdm(self, total=len(self), desc=f"reading {self.name}", unit="img", leave=False,
                                  position=0, file=sys.stderr)]
        return {
            "source": self.spec,
            "split": self.split,
            "count": len(labels),
            "image_size": self.image_size,
            "splits": self.splits,
            "classes": len(self.classes) or len({l for l in labels if l >= 0}),
            "labelled": sum(l >= 0 for l in labels),
            "fingerprint": self.fingerprint(),
        }


SPLIT_HELP = ("train | test | all. Test reads folders and files named test, val or validation; a file, glob or folder "
              "whose names say no split is one split (train), and test on it is refused")


def open_source(spec: str, split: str = "train", image_size: int | None = None) -> Source:
    """Open a source by spec (see clsp.vocabulary.SPEC_HELP). Raises UserError naming the problem for anything it
    cannot read."""
    from clsp.source_formats import (  # here: they import sources
        CifarSource, DigitsSource, FolderSource, ParquetSource, Stl10Source)

    kind, _, path = spec.partition(":")
    if kind == "digits" and not path:
        return DigitsSource(spec, split, image_size)
    if not path:
        raise UserError(f"unknown source {spec!r}: use {SPEC_HELP}")
    path = path if "://" in path else os.path.expanduser(path)  # the shell leaves a ~ after `folder:` as it is
    if kind == "parquet":
        return ParquetSource(spec, split, image_size, path)
    if kind == "folder":
        return FolderSource(spec, split, image_size, path)
    if kind in CifarSource.LAYOUT:
        return CifarSource(spec, split, image_size, path, kind)
    if kind == "stl10":
        return Stl10Source(spec, split, image_size, path)
    raise UserError(f"unknown source kind {kind!r} in {spec!r}: use {SPEC_HELP}")


def refuse_out_inside(spec: str, out: str | Path) -> None:
    """An output folder inside the folder a `folder:` or `parquet:` source reads (recursively) would add what the stage
    writes there (sample grids, report pictures, index.parquet) to that source as data: refused before anything is
    written."""
    kind, _, location = spec.partition(":")
    glob = any(c in location for c in "*?[")
    if kind not in ("folder", "parquet") or "://" in location or (location.endswith(".parquet") and not glob):
        return  # one file: nothing written beside it is read
    target = Path(out).expanduser().resolve()
    if glob:  # it reads what matches it: the index files synth writes, say
        pattern = Path(os.path.abspath(os.path.expanduser(location))).parts
        inside = any(len(pattern) == len(written.parts) and all(map(fnmatch.fnmatchcase, written.parts, pattern))
                     for written in (target / "index.parquet", target / "index-0123456789ab.parquet"))
    else:
        root = Path(location).expanduser().resolve()
        inside = target == root or root in target.parents
    if inside:
        raise UserError(f"--out {out} lies inside {location}, which the source {spec} reads: what this command writes "
                        f"would become part of the source; choose an --out outside {location}")


def refuse_out_in_sources(out: str | Path, given=(), recorded=()) -> None:
    """refuse_out_inside for every source a command is `given` and those its inputs were made from (`recorded`: in
    their records). A recorded spec is checked only where it names an absolute path that exists: a relative one was
    relative to wherever that stage ran, not to here."""
    def checkable(spec: str) -> bool:
        location = spec.partition(":")[2]
        return os.path.isabs(location) and os.path.exists(location)

    for spec in sorted({*filter(None, given), *filter(checkable, filter(None, recorded))}):
        refuse_out_inside(spec, out)


def load_arrays(source: Source, limit: int | None = None,
                labelled: bool = False) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The whole source in memory: images (N, H, W, 3) uint8, labels (N,), ids. With `limit`, at most that many,
    evenly spaced over the id order: a folder source lists its images class by class, and its first `limit` images
    would be its first classes only. With `labelled`, only the images that have a label (then `limit` spaces them
    over the labelled ones where the source knows its labels without reading images: Source.labels): an unlabelled
    image is read past, never kept (STL-10's 100,000), and NoLabelsError when none has a label."""
    from tqdm.auto import tqdm

    known = source.labels() if labelled else None
    positions = np.arange(len(source)) if known is None else np.flatnonzero(known >= 0)
    if limit is not None and limit < len(positions):
        positions = positions[np.unique(np.linspace(0, len(positions) - 1, max(limit, 1)).round().astype(int))]
    if not len(positions) and not (labelled and len(source)):
        raise UserError(f"{source.name} holds no images")
    size = source.image_size
    images = np.empty((len(positions), size, size, 3), dtype=np.uint8)  # filled in place: no second copy
    labels, ids = np.empty(len(positions), dtype=np.int64), []
    records = source.records_at(positions)
    # position 0 (also under a running bar, e.g. training's): drawn on that bar's line, not below it with cursor moves
    # that a log file keeps as escape codes
    for record in tqdm(records, total=len(positions), desc=f"reading {source.name}", unit="img", leave=False,
                       position=0, file=sys.stderr, disable=os.environ.get("RANK", "0") != "0"):  # one launch, one bar
        if record.label >= 0 or not labelled:
            images[len(ids)], labels[len(ids)] = record.image, record.label
            ids.append(record.anchor_id)
    if not ids:
        raise NoLabelsError(f"{source.name} has no labelled image (all {len(source)} are unlabelled)")
    if len(ids) < len(positions):  # unlabelled images left out of a source that knows its labels only by reading
        images.resize((len(ids), size, size, 3), refcheck=False)  # in place: `images` is the only reference
        labels = labels[:len(ids)]
    return images, labels, ids
