"""The per-format sources behind `open_source` (clsp/sources.py): the embedded digits, HF-layout Parquet, image folders,
torchvision's CIFAR folders and STL-10's binary folder. Each fills the `Source` base's `_items()` and `_load(item)`;
Parquet and folders find their splits by the one rule of `pick_split`.
"""
from __future__ import annotations

import glob
import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from clsp.errors import UserError
from clsp.shards.schema import MAX_ID_CHARS
from clsp.sources import PIL_FORMATS, Record, Source, pick_split, safe_id, split_named, splits_note, \
    to_rgb_square

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


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
    folder is named (train/0000.parquet); see pick_split for files that name none. Id = file stem + row number (the stem
    prefixed with its folder's name when two files share a stem, as train/0000 and test/0000 do under split "all").
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
        other = next((f for f, pf in zip(files, self._files) if self._image_col not in pf.schema_arrow.names), None)
        if other is not None:
            raise UserError(f"{other} has no `{self._image_col}` column, which {files[0]} holds images in: the files "
                            f"of a source must be parts of one table; pass only its files (a narrower glob or folder)")
        self._check_image_type(files)
        # a column any file has: a file without it is then refused, not the whole source read as unlabelled
        self._label_col = next((c for c in self.LABEL_COLUMNS if any(c in pf.schema_arrow.names for pf in self._files)),
                               None)
        self.classes = self._class_names(schema)
        if self._label_col:
            self._check_labels(files)
        stems = [safe_id(Path(f).name.split(".")[0], MAX_ID_CHARS - 12) for f in files]  # room for "-ROW" (11 digits)
        if len(set(stems)) != len(stems):  # e.g. train/0000.parquet + test/0000.parquet read as --split all
            stems = [safe_id(f"{Path(f).parent.name}-{Path(f).name.split('.')[0]}", MAX_ID_CHARS - 12) for f in files]
        if len(set(stems)) != len(stems):
            raise UserError(f"two Parquet files under {path} share a name and a folder name: ids would collide; "
                            f"pass one folder's files")
        # (file number, row group, row in group): cheap handles from the footers, so slicing reads only what it needs
        self._handles = [
            (f, g, r)
            for f, pf in enumerate(self._files)
            for g in range(pf.num_row_groups)
            for r in range(pf.metadata.row_group(g).num_rows)
        ]
        self._stems = stems
        # first row number of each row group of each file, from the footers once: a row's number is then one lookup,
        # not a walk over the groups before it (Hugging Face writes image Parquet in row groups of 100 rows)
        self._group_starts = [np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
                              .tolist() for pf in self._files]
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

    def _check_image_type(self, files: list[str]) -> None:
        """The image column must hold encoded images: {bytes, path} structs or bytes, not file paths or pixel arrays."""
        import pyarrow as pa

        for path, parquet in zip(files, self._files):
            kind = parquet.schema_arrow.field(self._image_col).type
            struct = pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0
            if not (struct or pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_null(kind)):
                raise UserError(f"{path}: the image column `{self._image_col}` holds {kind}, not encoded images: "
                                f"store each image's file bytes (PNG, JPEG, ...) in it, as {{bytes, path}} structs (a "
                                f"datasets Image feature) or plain bytes; file paths are never followed")

    def _check_labels(self, files: list[str]) -> None:
        """Labels must be class numbers in every file: a float 0.5 would be read as class 0, a string not at all; and
        -1 (unknown) or a class the names list, found now rather than by the manifest after the shards are made."""
        import pyarrow as pa
        import pyarrow.compute as pc

        for path, parquet in zip(files, self._files):
            schema = parquet.schema_arrow
            kind = schema.field(self._label_col).type if self._label_col in schema.names else None
            if kind is None:
                holder = next(f for f, pf in zip(files, self._files) if self._label_col in pf.schema_arrow.names)
                raise UserError(f"{path} has no `{self._label_col}` column, which {holder} has: add one to it (-1 "
                                f"where a label is unknown), or leave that file out of the source")
            if not (pa.types.is_integer(kind) or pa.types.is_null(kind)):  # null: unknown
                raise UserError(f"{path}: the label column `{self._label_col}` holds {kind}, not class numbers: store "
                                f"integers 0, 1, ... in it (a datasets ClassLabel, or pandas' "
                                f"`df['{self._label_col}'].astype('category').cat.codes`), in every file of the source")
            if pa.types.is_null(kind):
                continue
            low, high = pc.min_max(parquet.read(columns=[self._label_col]).column(0)).values()
            bound = f"0..{len(self.classes) - 1} (the {len(self.classes)} class names of its metadata)" \
                if self.classes else "0, 1, ..."
            if (low.as_py() is not None and low.as_py() < -1) or (self.classes and high.as_py() is not None
                                                                  and high.as_py() >= len(self.classes)):
                raise UserError(f"{path}: the label column `{self._label_col}` holds labels from {low.as_py()} to "
                                f"{high.as_py()}: a label must be -1 (unknown) or a class {bound}; mend the file")

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
        return self._group_starts[f][g] + r

    def _raw(self, item) -> tuple[str, int, bytes]:
        f, g, r = item
        rows = self._row_group(f, g)
        cell = rows[self._image_col][r]
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if not data:
            only_path = isinstance(cell, dict) and cell.get("path")
            raise UserError(f"row {self._row_number(f, g, r)} of {self._paths[f]} has no image bytes"
                            + (" (only a path, which is never followed)" if only_path else "")
                            + ": store each image's file bytes in the image column (a datasets Image feature "
                              "with the files embedded) or leave the row out")
        value = rows[self._label_col][r] if self._label_col else None
        label = -1 if value is None else int(value)  # a null label: unknown, as with no label column
        return f"{self._stems[f]}-{self._row_number(f, g, r):07d}", label, data

    def _load(self, item) -> Record:
        anchor_id, label, data = self._raw(item)
        try:
            image = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
            return Record(anchor_id, to_rgb_square(image, self._size), label)
        except (OSError, ValueError) as error:  # PIL: unidentified, truncated or unsupported image
            raise UserError(f"{self._paths[item[0]]}: the image of row {anchor_id} cannot be read ({error}): "
                            f"replace the file or leave it out of the source") from None

    encoded = True

    def _content_digest(self, item) -> tuple[str, int, bytes]:
        return self._raw(item)


def _subfolders(directory: Path) -> list[Path]:
    return sorted(d for d in directory.iterdir() if d.is_dir() and not d.name.startswith("."))


def _has_image(directory: Path) -> bool:
    """Whether DIRECTORY (missing is fine) has an image anywhere below it; stops at the first."""
    return directory.is_dir() and any(f.suffix.lower() in IMAGE_EXTENSIONS for f in directory.rglob("*"))


def _holds_images(directory: Path) -> bool:
    return any(f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file() for f in directory.iterdir())


class FolderSource(Source):
    """An image-folder tree: DIR/CLASS/IMAGE, or DIR/SPLIT/CLASS/IMAGE with SPLIT folders named train, test, val or
    validation (val and validation are the test split; see pick_split); a folder that holds images itself is a class
    folder, also when it bears a split's name. The classes are the class folders of every split folder together, so
    a label names the same class in each split even when one split lacks a class.
    """

    kind = "folder"

    def __init__(self, spec: str, split: str, image_size: int | None, path: str):
        super().__init__(spec, split, image_size)
        root = Path(path)
        if not root.is_dir():
            raise UserError(f"image folder {path} does not exist: give DIR with one sub-folder per class")
        parts: dict[str | None, list[Path]] = {}
        for folder in _subfolders(root):  # one holding images itself is a class, whatever its name (CIFAR-100's train)
            word = None if _holds_images(folder) else split_named(folder.name, prefix=False)
            parts.setdefault(word, []).append(folder)
        # no split folders (or no folders at all): DIR is one split, or the one its own name says
        if not parts or (None in parts and len(parts) == 1):
            parts = {split_named(root.resolve().name, prefix=False): [root]}
        self.splits = splits_note(parts)
        tops = pick_split(parts, split, spec, "folder:DIR/{}")
        # name order, as torchvision's ImageFolder: numbered folders read 0, 1, 10, 2, ... A label is a position in
        # this list, and shards and fingerprints record labels, so the order never changes; a source that numbers the
        # classes otherwise is other data (the sweep and eval compare fingerprints)
        self.classes = sorted({c.name for top in (t for ts in parts.values() for t in ts) for c in _subfolders(top)})
        if not self.classes:
            raise UserError(f"{root} has no class sub-folders: expected DIR/CLASS/IMAGE.png or "
                            f"DIR/SPLIT/CLASS/IMAGE.png")
        # a class folder without images in any split (a stray or half-copied folder) would still take a label and a
        # probe output, and torchvision's ImageFolder refuses it too
        empty = [c for c in self.classes if not any(_has_image(t / c) for ts in parts.values() for t in ts)]
        if empty:
            raise UserError(f"class folder(s) {', '.join(empty)} under {root} hold no images "
                            f"({', '.join(IMAGE_EXTENSIONS)}) in any split: add images or move the folder(s) out")
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
        try:
            with Image.open(file, formats=PIL_FORMATS) as image:
                return Record(anchor_id, to_rgb_square(image, self._size), label)
        except (OSError, ValueError) as error:  # PIL: unidentified, truncated (an interrupted copy) or unsupported
            raise UserError(f"{file} cannot be read as an image ({error}): replace it or move it out of the "
                            f"source") from None

    encoded = True
    parallel_loads = True  # one file each

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
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR batch never does")
        return super().find_class(module, name)


def _not_cifar(file: Path, why: str) -> UserError:
    return UserError(f"{file} is not a CIFAR file of torchvision's python version ({why}): it is damaged or another "
                     f"file; download the dataset again (torchvision.datasets.CIFAR10 or CIFAR100(DIR, download=True))")


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
        self.splits = ", ".join(part for part, names in (("train", train), ("test", test))
                                if all((root / name).is_file() for name in names))  # what `data info` says is there
        images, labels = [], []
        self._prefix = f"{kind}-{split}"
        for name in files:
            batch = self._read(root / name, b"data", label_key)
            data, batch_labels = np.asarray(batch[b"data"]), np.asarray(batch[label_key])
            if data.dtype != np.uint8 or data.shape[1:] != (3072,) or batch_labels.shape != data.shape[:1] or not \
                    np.issubdtype(batch_labels.dtype, np.integer):
                raise _not_cifar(root / name, f"{data.dtype} data {data.shape} with {batch_labels.size} labels, not "
                                              f"uint8 (N, 3072) with N integer labels")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(batch_labels.astype(np.int64))
        self._images, self._labels = np.concatenate(images), np.concatenate(labels)
        meta = root / meta_name
        self.classes = [n.decode() for n in self._read(meta, names_key)[names_key]] if meta.is_file() else []

    @staticmethod
    def _read(file: Path, *keys: bytes) -> dict:
        """The dict a batch or meta file holds, with `keys`; a UserError naming the file when it is no such file."""
        try:
            with open(file, "rb") as handle:
                content = _NumpyOnlyUnpickler(handle, encoding="bytes").load()
        except OSError:
            raise  # a disk problem, which the CLI words (clsp.errors.OS_PROBLEMS)
        except Exception as error:  # other bytes fail to unpickle every way: EOFError, UnpicklingError, ValueError...
            raise _not_cifar(file, str(error) or type(error).__name__) from None
        missing = [key.decode() for key in keys if not (isinstance(content, dict) and key in content)]
        if missing:
            raise _not_cifar(file, f"it holds no {', '.join(missing)}")
        return content

    def _items(self) -> list:
        return list(range(len(self._labels)))

    def _load(self, i: int) -> Record:
        image = self._images[i]
        if self._size is not None and self._size != 32:
            image = to_rgb_square(Image.fromarray(image), self._size)
        return Record(f"{self._prefix}-{i:05d}", image, int(self._labels[i]))


class Stl10Source(Source):
    """STL-10 in its official binary form: the `stl10_binary` folder that stl10_binary.tar.gz (and torchvision's
    STL10(DIR, download=True)) makes, given as that folder or its parent. Read through read-only memory maps, so
    opening it reads no pixels (unlabeled_X.bin is 2.7 GB).

    Each X file holds uint8 images of 3x96x96, each channel stored column-major; each y file one label 1..10 per image
    of its X file (read as 0..9); class_names.txt one name a line. Splits: train = the 5,000 labelled train images,
    then the 100,000 of unlabeled_X.bin (label -1; absent file: none), the usual self-supervised pre-training set;
    test = the 8,000 test images; all = train, then test. Ids name the part and the row, the same under every split:
    stl10-train-00000, stl10-unlabeled-000000, stl10-test-00000. fold_indices.txt is not read.
    """

    kind = "stl10"
    FOLDER = "stl10_binary"
    SIDE = 96
    IMAGE_BYTES = 3 * SIDE * SIDE  # 27,648
    # part: (X file, y file or None, id digits)
    PARTS = {"train": ("train_X.bin", "train_y.bin", 5), "unlabeled": ("unlabeled_X.bin", None, 6),
             "test": ("test_X.bin", "test_y.bin", 5)}

    def __init__(self, spec: str, split: str, image_size: int | None, path: str):
        super().__init__(spec, split, self.SIDE if image_size is None else image_size)
        root = Path(path)
        root = root / self.FOLDER if (root / self.FOLDER).is_dir() else root
        self._root = root
        wanted = {"train": ["train"], "test": ["test"], "all": ["train", "test"]}[split]
        needed = [name for part in wanted for name in self.PARTS[part][:2]]
        missing = [name for name in needed if not (root / name).is_file()]
        if missing:
            raise UserError(f"{root} lacks {', '.join(missing)}: point to the {self.FOLDER} folder (or its parent) "
                            f"that the official stl10_binary.tar.gz or torchvision.datasets.STL10(DIR, download=True) "
                            f"makes")
        unlabelled = (root / self.PARTS["unlabeled"][0]).is_file()
        parts = [p for part in wanted for p in ((part, "unlabeled") if part == "train" and unlabelled else (part,))]
        self.splits = self._splits_note(unlabelled)
        self._parts: list[tuple[str, np.ndarray, np.ndarray | None]] = []  # (part, (n, 3, 96, 96) memmap, labels)
        for part in parts:
            x_name, y_name, _ = self.PARTS[part]
            pixels = self._pixels(root / x_name)
            self._parts.append((part, pixels, None if y_name is None else self._labels_of(root / y_name, len(pixels))))
        self._starts = np.cumsum([0] + [len(pixels) for _, pixels, _ in self._parts])  # part i: [starts[i], [i+1])
        self.classes = self._class_names(root / "class_names.txt")

    @classmethod
    def _damaged(cls, file: Path, why: str) -> UserError:
        return UserError(f"{file} is not a file of STL-10's binary version ({why}): it is damaged or another file; "
                         f"download the binary version again (the official stl10_binary.tar.gz, or "
                         f"torchvision.datasets.STL10(DIR, download=True), makes the {cls.FOLDER} folder)")

    def _pixels(self, file: Path) -> np.ndarray:
        size = file.stat().st_size
        if size == 0 or size % self.IMAGE_BYTES:
            raise self._damaged(file, f"{size:,} bytes, not a positive multiple of {self.IMAGE_BYTES:,}, the bytes of "
                                      f"one 3x{self.SIDE}x{self.SIDE} image")
        return np.memmap(file, dtype=np.uint8, mode="r").reshape(-1, 3, self.SIDE, self.SIDE)

    def _labels_of(self, file: Path, count: int) -> np.ndarray:
        labels = np.fromfile(file, dtype=np.uint8)
        x_name = file.name.replace("_y", "_X")
        if len(labels) != count:
            raise self._damaged(file, f"{len(labels):,} labels for the {count:,} images of {x_name}")
        bad = np.flatnonzero((labels < 1) | (labels > 10))
        if bad.size:
            raise self._damaged(file, f"label {labels[bad[0]]} at row {bad[0]}, where labels are 1..10")
        return labels.astype(np.int64) - 1

    def _class_names(self, file: Path) -> list[str]:
        if not file.is_file():
            return []
        names = [line.strip() for line in file.read_text(errors="replace").splitlines() if line.strip()]
        if len(names) != 10:
            raise self._damaged(file, f"{len(names)} class names, not 10")
        return names

    def _splits_note(self, unlabelled: bool) -> str:
        """What `data info` says: the parts present and how many images each holds (from the file sizes)."""
        def count(name: str) -> str:
            file = self._root / name
            return f"{file.stat().st_size // self.IMAGE_BYTES:,}" if file.is_file() else "?"

        notes = []
        if (self._root / "train_X.bin").is_file():
            extra = (f", then {count('unlabeled_X.bin')} unlabelled from unlabeled_X.bin" if unlabelled else
                     "; no unlabeled_X.bin, so no unlabelled images")
            notes.append(f"train ({count('train_X.bin')} labelled{extra})")
        if (self._root / "test_X.bin").is_file():
            notes.append(f"test ({count('test_X.bin')} labelled)")
        return ", ".join(notes)

    def _items(self) -> range:
        return range(int(self._starts[-1]))

    def _locate(self, i: int) -> tuple[str, np.ndarray, np.ndarray | None, int]:
        index = int(np.searchsorted(self._starts, i, side="right")) - 1
        part, pixels, labels = self._parts[index]
        return part, pixels, labels, int(i - self._starts[index])

    def _raw(self, i: int) -> tuple[str, int, np.ndarray]:
        """(id, label, the image's (3, 96, 96) bytes as stored: channel, column, row)."""
        part, pixels, labels, row = self._locate(i)
        label = -1 if labels is None else int(labels[row])
        return f"stl10-{part}-{row:0{self.PARTS[part][2]}d}", label, pixels[row]

    def _load(self, i: int) -> Record:
        anchor_id, label, stored = self._raw(i)
        image = np.ascontiguousarray(stored.transpose(2, 1, 0))  # (row, column, channel)
        if self._size != self.SIDE:
            image = to_rgb_square(Image.fromarray(image), self._size)
        return Record(anchor_id, image, label)

    def _content_digest(self, i: int) -> tuple[str, int, bytes]:
        anchor_id, label, stored = self._raw(i)
        return anchor_id, label, stored.tobytes()

    def labels(self) -> np.ndarray:
        return np.concatenate([np.full(len(pixels), -1, np.int64) if labels is None else labels
                               for _, pixels, labels in self._parts])
