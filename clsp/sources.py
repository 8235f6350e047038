"""Where anchor images come from: one interface over the embedded digits, Parquet, image folders and CIFAR.

Every source yields `Record(anchor_id, image (H, W, 3) uint8, label or -1)` in a fixed order, with ids that are stable
across runs and machines (derived from file names and row positions, never from paths of this machine) and contain no
dots (a WebDataset key ends at the first dot). `fingerprint()` hashes the content (ids, labels, encoded bytes or pixels)
and the image size, so a shard directory can prove which data it was made from.

Splits mean the same for every kind: a file or folder named for a split (`train...`, `test...`, `val...`,
`validation...`; val and validation are the test split) holds that split; a location holding such parts (DIR/train +
DIR/val, train-*.parquet + test-*.parquet) holds those splits; a location whose names say no split is one split, read
as train, and `--split test` on it is refused (OneSplitError) rather than silently scoring the training images.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from clsp.errors import UserError

SPLITS = ("train", "test", "all")
TEST_NAMES = ("test", "val", "validation")  # a folder or file named for one of these holds the test split
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_SPLIT_NAME = re.compile(r"(train|test|validation|val)(?![a-z])")  # "train-0000" and "val_x" yes, "values" no


class OneSplitError(UserError):
    """`--split test` asked of a location whose names say no split: it is one split, read as train."""


@dataclass(frozen=True)
class Record:
    anchor_id: str
    image: np.ndarray  # (H, W, 3) uint8
    label: int  # -1 when unknown


def safe_id(text: str) -> str:
    """Map a file name or relative path to an id of letters, digits, '_' and '-' only."""
    return _UNSAFE_ID_CHARS.sub("_", text).strip("_") or "x"


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
            raise OneSplitError(f"{where} names no split (no train/test/val/validation in its file or folder names), "
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
    """PIL image -> (size, size, 3) uint8: RGB, centre-cropped to a square, resized (bicubic) when size differs."""
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

    classes: list[str] = []
    splits = "train, test"  # what `data info` says about the splits (see splits_note)

    # --- shared -------------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return f"{self.spec}[{self.split}]"

    @property
    def image_size(self) -> int:
        if self._size is None:  # native size: read it off the first image
            self._size = int(next(iter(self)).image.shape[0])
        return self._size

    def __len__(self) -> int:
        return len(self._items())

    def __iter__(self) -> Iterator[Record]:
        return self.records(0, len(self))

    def records(self, start: int, stop: int) -> Iterator[Record]:
        """Records at positions [start, stop) of the id order."""
        for item in self._items()[start:stop]:
            record = self._load(item)
            if self._size is not None and record.image.shape != (self._size, self._size, 3):
                raise UserError(
                    f"{self.name}: image {record.anchor_id} is {record.image.shape[1]}x{record.image.shape[0]}, "
                    f"the others {self._size}x{self._size}: pass --image-size to resize them all"
                )
            yield record

    def ids(self) -> list[str]:
        return [r.anchor_id for r in self]

    def fingerprint(self) -> str:
        """sha256 over (kind, split, image size, then id, label and content digest of every image, in order)."""
        if self._fingerprint is None:
            digest = hashlib.sha256(f"{self.kind}|{self.split}|{self.image_size}".encode())
            for item in self._items():
                anchor_id, label, content = self._content_digest(item)
                digest.update(f"|{anchor_id}|{label}|".encode())
                digest.update(hashlib.sha256(content).digest())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def describe(self) -> dict:
        labels = [r.label for r in self]
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


class DigitsSource(Source):
    """scikit-learn's handwritten digits (1,797 real 8x8 images, 10 classes), as RGB at `image_size` (default 16).

    Split: test = every fifth image (index % 5 == 0, 360 images), train = the other 1,437. Ids keep the index.
    """

    kind = "digits"
    classes = [str(d) for d in range(10)]

    def __init__(self, spec: str, split: str, image_size: int | None):
        super().__init__(spec, split, 16 if image_size is None else image_size)
        from sklearn.datasets import load_digits

        digits = load_digits()
        self._pixels = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # (1797, 8, 8)
        self._labels = digits.target.astype(np.int64)
        keep = {"train": lambda i: i % 5 != 0, "test": lambda i: i % 5 == 0, "all": lambda i: True}[split]
        self._index = [i for i in range(len(self._labels)) if keep(i)]

    def _items(self) -> list:
        return self._index

    def _load(self, i: int) -> Record:
        image = to_rgb_square(Image.fromarray(self._pixels[i], mode="L"), self._size)
        return Record(f"digits-{i:04d}", image, int(self._labels[i]))


class ParquetSource(Source):
    """Parquet in the Hugging Face datasets image layout: an image column of {bytes, path} structs and a label column.

    Read in record batches with pyarrow (never whole). PATH is a file, a glob, or a directory (searched for *.parquet).
    A file's split is the one its name starts with (train-*.parquet, test-*, validation-*), else the one its nearest
    folder is named (train/0000.parquet); see pick_split for files that name none. Id = file stem + row number.
    """

    kind = "parquet"
    IMAGE_COLUMNS = ("img", "image", "images", "pixel_values")
    LABEL_COLUMNS = ("label", "labels", "fine_label", "coarse_label")

    def __init__(self, spec: str, split: str, image_size: int | None, path: str):
        super().__init__(spec, split, image_size)
        import pyarrow.parquet as pq

        parts: dict[str | None, list[str]] = {}
        for file in self._find(path):
            parts.setdefault(self._split_word(path, file), []).append(file)
        self.splits = splits_note(parts)
        files = pick_split(parts, split, spec, "parquet:DIR/{}-*.parquet")
        self._paths = files
        self._files = [pq.ParquetFile(f) for f in files]
        schema = self._files[0].schema_arrow
        self._image_col = next((c for c in self.IMAGE_COLUMNS if c in schema.names), None)
        if self._image_col is None:
            raise UserError(f"{files[0]} has no image column (looked for {', '.join(self.IMAGE_COLUMNS)}); "
                            f"columns are {', '.join(schema.names)}")
        self._label_col = next((c for c in self.LABEL_COLUMNS if c in schema.names), None)
        self.classes = self._class_names(schema)
        stems = [safe_id(Path(f).name.split(".")[0]) for f in files]
        if len(set(stems)) != len(stems):
            raise UserError(f"two Parquet files share a name under {path}: ids would collide; pass one split's files")
        # (file number, row group, row in group): cheap handles from the footers, so slicing reads only what it needs
        self._handles = [
            (f, g, r)
            for f, pf in enumerate(self._files)
            for g in range(pf.num_row_groups)
            for r in range(pf.metadata.row_group(g).num_rows)
        ]
        self._stems = stems
        self._cache: tuple[tuple[int, int], dict] | None = None

    @staticmethod
    def _find(path: str) -> list[str]:
        """The Parquet files of a file, glob or directory (searched recursively), in name order."""
        pattern = os.path.join(path, "**", "*.parquet") if os.path.isdir(path) else path
        files = sorted(glob.glob(pattern, recursive=os.path.isdir(path)))
        if not files:
            raise UserError(f"no Parquet files at {path}: give a file, a glob or a directory holding *.parquet")
        return files

    @staticmethod
    def _split_word(path: str, file: str) -> str | None:
        """The split a file's name starts with, else the one its nearest folder is named (up to the directory given,
        itself included; for a file or glob only its own folder)."""
        folders = (Path(file).parent.name,)
        if os.path.isdir(path):
            folders = (Path(path).resolve().name, *Path(file).relative_to(path).parent.parts)
        words = [split_named(Path(file).name, prefix=True)] + [split_named(f, prefix=False) for f in reversed(folders)]
        return next((w for w in words if w), None)

    def _class_names(self, schema) -> list[str]:
        meta = (schema.metadata or {}).get(b"huggingface")
        if not meta or self._label_col is None:
            return []
        features = json.loads(meta).get("info", {}).get("features", {})
        return list(features.get(self._label_col, {}).get("names", []))

    def _items(self) -> list:
        return self._handles

    def _row_group(self, f: int, g: int) -> dict:
        """One row group's image and label columns (a record batch), cached while rows of it are read in order."""
        if self._cache is None or self._cache[0] != (f, g):
            columns = [self._image_col] + ([self._label_col] if self._label_col else [])
            table = self._files[f].read_row_group(g, columns=columns)
            self._cache = ((f, g), {c: table.column(c).to_pylist() for c in columns})
        return self._cache[1]

    def _row_number(self, f: int, g: int, r: int) -> int:
        meta = self._files[f].metadata
        return sum(meta.row_group(i).num_rows for i in range(g)) + r

    def _raw(self, item) -> tuple[str, int, bytes]:
        f, g, r = item
        rows = self._row_group(f, g)
        cell = rows[self._image_col][r]
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if not data:
            raise UserError(f"row {r} of {self._paths[f]} has no image bytes: the image column must hold "
                            f"encoded images ({{bytes, path}} structs)")
        label = int(rows[self._label_col][r]) if self._label_col else -1
        return f"{self._stems[f]}-{self._row_number(f, g, r):07d}", label, data

    def _load(self, item) -> Record:
        anchor_id, label, data = self._raw(item)
        return Record(anchor_id, to_rgb_square(Image.open(io.BytesIO(data)), self._size), label)

    def _content_digest(self, item) -> tuple[str, int, bytes]:
        return self._raw(item)


def _subfolders(directory: Path) -> list[Path]:
    return sorted(d for d in directory.iterdir() if d.is_dir() and not d.name.startswith("."))


class FolderSource(Source):
    """An image-folder tree: DIR/CLASS/IMAGE, or DIR/SPLIT/CLASS/IMAGE with SPLIT folders named train, test, val or
    validation (val and validation are the test split; see pick_split). The classes are the class folders of every
    split folder together, so a label names the same class in each split even when one split lacks a class.
    """

    kind = "folder"

    def __init__(self, spec: str, split: str, image_size: int | None, path: str):
        super().__init__(spec, split, image_size)
        root = Path(path)
        if not root.is_dir():
            raise UserError(f"image folder {path} does not exist: give DIR with one sub-folder per class")
        parts: dict[str | None, list[Path]] = {}
        for folder in _subfolders(root):
            parts.setdefault(split_named(folder.name, prefix=False), []).append(folder)
        if None in parts and len(parts) == 1:  # no split folders: DIR is one split, or the one its own name says
            parts = {split_named(root.resolve().name, prefix=False): [root]}
        self.splits = splits_note(parts)
        tops = pick_split(parts, split, spec, "folder:DIR/{}")
        self.classes = sorted({c.name for top in (t for ts in parts.values() for t in ts) for c in _subfolders(top)})
        if not self.classes:
            raise UserError(f"{root} has no class sub-folders: expected DIR/CLASS/IMAGE.png or "
                            f"DIR/SPLIT/CLASS/IMAGE.png")
        self._files: list[tuple[str, Path, int]] = []
        seen: dict[str, Path] = {}
        for top in tops:  # several only for split "all": ids then start with the split folder's name
            prefix = f"{top.name}-" if len(tops) > 1 else ""
            for label, name in enumerate(self.classes):
                for file in sorted((top / name).rglob("*")):
                    if file.suffix.lower() not in IMAGE_EXTENSIONS:
                        continue
                    anchor_id = safe_id(f"{prefix}{name}-{file.relative_to(top / name).with_suffix('').as_posix()}")
                    if anchor_id in seen:
                        raise UserError(f"{file} and {seen[anchor_id]} map to the same id {anchor_id!r}: rename one")
                    seen[anchor_id] = file
                    self._files.append((anchor_id, file, label))
        if not self._files:
            raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {', '.join(map(str, tops))}")

    def _items(self) -> list:
        return self._files

    def _load(self, item) -> Record:
        anchor_id, file, label = item
        with Image.open(file) as image:
            return Record(anchor_id, to_rgb_square(image, self._size), label)

    def _content_digest(self, item) -> tuple[str, int, bytes]:
        anchor_id, file, label = item
        return anchor_id, label, file.read_bytes()


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR's python batches are pickles of dicts of numpy arrays: allow exactly the numpy rebuild functions."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise UserError(f"CIFAR batch file refers to {module}.{name}, which a CIFAR batch never does: "
                            f"the file is not a CIFAR batch (re-download it)")
        return super().find_class(module, name)


class CifarSource(Source):
    """torchvision's CIFAR-10 (`cifar-10-batches-py`) and CIFAR-100 (`cifar-100-python`) folders, read safely."""

    LAYOUT = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels",
                    "batches.meta", b"label_names"),
        "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", "meta", b"fine_label_names"),
    }

    def __init__(self, spec: str, split: str, image_size: int | None, path: str, kind: str):
        super().__init__(spec, split, image_size)
        self.kind = kind
        folder, train, test, label_key, meta_name, names_key = self.LAYOUT[kind]
        root = Path(path)
        root = root / folder if (root / folder).is_dir() else root
        files = {"train": train, "test": test, "all": train + test}[split]
        missing = [f for f in files if not (root / f).is_file()]
        if missing:
            raise UserError(f"{root} lacks {', '.join(missing)}: point to the folder torchvision's {kind.upper()} "
                            f"download makes ({folder})")
        images, labels = [], []
        self._prefix = f"{kind}-{split}"
        for name in files:
            batch = self._read(root / name)
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch[label_key], dtype=np.int64))
        self._images, self._labels = np.concatenate(images), np.concatenate(labels)
        meta = root / meta_name
        self.classes = [n.decode() for n in self._read(meta)[names_key]] if meta.is_file() else []

    @staticmethod
    def _read(file: Path) -> dict:
        with open(file, "rb") as handle:
            return _NumpyOnlyUnpickler(handle, encoding="bytes").load()

    def _items(self) -> list:
        return list(range(len(self._labels)))

    def _load(self, i: int) -> Record:
        image = self._images[i]
        if self._size is not None and self._size != 32:
            image = to_rgb_square(Image.fromarray(image), self._size)
        return Record(f"{self._prefix}-{i:05d}", image, int(self._labels[i]))


SPEC_HELP = "digits | parquet:PATH_OR_GLOB | folder:DIR | cifar10:DIR | cifar100:DIR"
SPLIT_HELP = ("train | test | all. Test reads folders and files named test, val or validation; a file, glob or folder "
              "whose names say no split is one split (train), and test on it is refused")


def open_source(spec: str, split: str = "train", image_size: int | None = None) -> Source:
    """Open a source by spec (see SPEC_HELP). Raises UserError naming the problem for anything it cannot read."""
    kind, _, path = spec.partition(":")
    if kind == "digits" and not path:
        return DigitsSource(spec, split, image_size)
    if not path:
        raise UserError(f"unknown source {spec!r}: use {SPEC_HELP}")
    if kind == "parquet":
        return ParquetSource(spec, split, image_size, path)
    if kind == "folder":
        return FolderSource(spec, split, image_size, path)
    if kind in CifarSource.LAYOUT:
        return CifarSource(spec, split, image_size, path, kind)
    raise UserError(f"unknown source kind {kind!r} in {spec!r}: use {SPEC_HELP}")


def load_arrays(source: Source, limit: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The whole source (or its first `limit` images) in memory: images (N, H, W, 3) uint8, labels (N,), ids."""
    records = list(source.records(0, len(source) if limit is None else min(limit, len(source))))
    if not records:
        raise UserError(f"{source.name} holds no images")
    images = np.stack([r.image for r in records])
    return images, np.array([r.label for r in records], dtype=np.int64), [r.anchor_id for r in records]
