"""Schema version 2: one WebDataset sample per anchor, key = anchor id.

Members of a sample, in this order (the file extension picks the codec):
    {id}.anchor.png       the anchor image, (H, W, 3) uint8, lossless 8-bit RGB PNG of the manifest's image size
    {id}.cls.txt          the label as decimal text, -1 when unknown, else below the manifest's class count
    {id}.meta.json        {"anchor_id", "seeds": [K ints]}: seeds[j] made positive j
    {id}.pos{j}.png       positive j = 0..K-1, like the anchor
Nothing else. A reader decodes only these keys, with the codecs below.

Version 2 keeps these members byte for byte and adds per-positive scores to the manifest's index.parquet (one list of K
float32 per anchor, see shards.manifest): `positive_distance`, the RMS pixel distance of each positive to its anchor
(`positive_distances`), and, when the synth job scored with a reference classifier, `positive_agreement`, that
classifier's probability of the anchor's class. Version-1 directories (no scores) are still read.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

SCHEMA_VERSION = 2
READ_VERSIONS = (1, 2)  # version 1: the same members, an index without scores
SCORES = ("distance", "agreement")  # per-positive scores: index column positive_{metric}
ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,80}$")  # no dots: a WebDataset key ends at the first dot
ANCHOR, LABEL, META = "anchor.png", "cls.txt", "meta.json"
POSITIVE = re.compile(r"^pos(0|[1-9][0-9]{0,2})\.png$")
MAX_TEXT_BYTES = 1 << 16  # cls.txt / meta.json larger than this are not ours
MAX_IMAGE_SIDE = 1024
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOUR_TYPES = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale+alpha", 6: "RGBA"}
MAX_K = 1000  # positives pos0..pos999: the member name allows three digits
# The manifest's run.sampler.noise names the generator of noise (clsp.synth.noise); shards made before it was recorded
# were made with this one, and their manifests read as naming it.
LEGACY_NOISE = "cpu-generator"


class SchemaError(ValueError):
    """A sample or member that does not follow the schema; the message names the sample and what is wrong."""


def positive_key(j: int) -> str:
    return f"pos{j}.png"


def member_keys(k: int) -> list[str]:
    """The keys of a sample with K positives, in the order they are written."""
    return [ANCHOR, LABEL, META] + [positive_key(j) for j in range(k)]


def is_schema_key(key: str) -> bool:
    return key in (ANCHOR, LABEL, META) or POSITIVE.match(key) is not None


@dataclass(frozen=True)
class ShardSample:
    anchor_id: str
    anchor: np.ndarray  # (H, W, 3) uint8
    positives: np.ndarray  # (K, H, W, 3) uint8
    label: int  # -1 when unknown
    seeds: list[int]  # (K,) the seed that made each positive


def check_id(anchor_id: str) -> str:
    if not isinstance(anchor_id, str) or not ID_PATTERN.match(anchor_id):
        raise SchemaError(f"anchor id {anchor_id!r} is not allowed: use 1-80 letters, digits, '_' or '-' (no dots)")
    return anchor_id


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes; deterministic (fixed compression, no timestamps or text chunks)."""
    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def check_png(data: bytes, what: str = "image", size: int | None = None) -> None:
    """Refuse anything but an intact 8-bit RGB PNG (of `size` x `size` when given), reading only its chunk headers.

    Every chunk's CRC is checked and the file must run from IHDR to IEND, so a truncated or bit-flipped image is found
    without decompressing it; grayscale, palette, alpha and 16-bit PNGs are refused rather than silently converted.
    """
    if not data.startswith(PNG_SIGNATURE):
        raise SchemaError(f"{what} is not a PNG")
    pos, kinds, header = len(PNG_SIGNATURE), [], b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8]) if pos + 8 <= len(data) else (0, b"")
        end = pos + 12 + length  # length, type, data, CRC
        if not kind or end > len(data) or zlib.crc32(data[pos + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            raise SchemaError(f"{what} is a broken PNG (truncated, or a chunk fails its CRC)")
        header = data[pos + 8:end - 4] if kind == b"IHDR" else header
        kinds.append(kind)
        pos = end
    if kinds[:1] != [b"IHDR"] or kinds[-1:] != [b"IEND"] or len(header) != 13:
        raise SchemaError(f"{what} is a broken PNG (it must run from an IHDR chunk to an IEND chunk)")
    width, height, depth, colour = struct.unpack(">IIBB", header[:10])
    if (depth, colour) != (8, 2):
        kind = PNG_COLOUR_TYPES.get(colour, f"colour type {colour}")
        raise SchemaError(f"{what} is a {kind} PNG ({depth}-bit); the schema stores 8-bit RGB: regenerate the shard")
    if size is not None and (width, height) != (size, size):
        raise SchemaError(f"{what} is {width}x{height}; the manifest says {size}x{size}: regenerate the shard")
    if not (1 <= width <= MAX_IMAGE_SIDE and 1 <= height <= MAX_IMAGE_SIDE):
        raise SchemaError(f"{what} is {width}x{height}, outside 1..{MAX_IMAGE_SIDE} px")


def decode_png(data: bytes, what: str = "image", size: int | None = None) -> np.ndarray:
    """PNG bytes -> (H, W, 3) uint8, after `check_png` (no other codec is tried)."""
    check_png(data, what, size)
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            return np.asarray(image, dtype=np.uint8)  # 8-bit RGB by check_png: (H, W, 3), no conversion
    except Exception as error:  # PIL raises many types for broken data
        raise SchemaError(f"{what} is a broken PNG ({error})") from None


def decode_label(data: bytes) -> int:
    """-1 (unknown) or a class number; the manifest's index bounds it by the class count."""
    text = data.decode("ascii", errors="strict").strip() if len(data) <= 32 and data.isascii() else ""
    if not re.fullmatch(r"-?[0-9]{1,9}", text) or int(text) < -1:
        raise SchemaError(f"label {data[:32]!r} is not -1 (unknown) or a class number")
    return int(text)


def parse_json(data: bytes, what: str):
    """JSON bytes -> value; any failure (bad UTF-8 or syntax, nesting too deep for Python) is a SchemaError."""
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError; "[[[[..." -> RecursionError
        raise SchemaError(f"{what} is not valid JSON ({type(error).__name__}: {str(error)[:120]})") from None


def decode_meta(data: bytes, what: str = META) -> dict:
    """{"anchor_id": str, "seeds": [int, ...]}."""
    if len(data) > MAX_TEXT_BYTES:
        raise SchemaError(f"{what} is {len(data)} bytes, above the {MAX_TEXT_BYTES} limit")
    meta = parse_json(data, what)
    seeds = meta.get("seeds") if isinstance(meta, dict) else None
    if not isinstance(seeds, list) or not all(type(s) is int for s in seeds) or \
            not isinstance(meta.get("anchor_id"), str):
        raise SchemaError(f"{what} must be an object with 'anchor_id' (text) and 'seeds' (a list of integers)")
    return meta


def encode_sample(sample: ShardSample, k: int, image_size: int) -> list[tuple[str, bytes]]:
    """Check a sample against the schema and encode it: [(member name, bytes)] in schema order."""
    check_id(sample.anchor_id)
    shape = (image_size, image_size, 3)
    if sample.anchor.dtype != np.uint8 or sample.anchor.shape != shape:
        raise SchemaError(f"{sample.anchor_id}: anchor must be uint8 {shape}, got {sample.anchor.dtype} "
                          f"{sample.anchor.shape}")
    if sample.positives.dtype != np.uint8 or sample.positives.shape != (k, *shape):
        raise SchemaError(f"{sample.anchor_id}: positives must be uint8 {(k, *shape)}, got "
                          f"{sample.positives.dtype} {sample.positives.shape}")
    if len(sample.seeds) != k or not all(isinstance(s, int) for s in sample.seeds):
        raise SchemaError(f"{sample.anchor_id}: need {k} integer seeds, got {sample.seeds!r}")
    if not isinstance(sample.label, (int, np.integer)) or sample.label < -1:
        raise SchemaError(f"{sample.anchor_id}: label must be an integer >= -1, got {sample.label!r}")
    meta = json.dumps({"anchor_id": sample.anchor_id, "seeds": list(sample.seeds)}, sort_keys=True)
    members = [(ANCHOR, encode_png(sample.anchor)), (LABEL, str(int(sample.label)).encode()),
               (META, meta.encode())]
    members += [(positive_key(j), encode_png(p)) for j, p in enumerate(sample.positives)]
    return [(f"{sample.anchor_id}.{key}", data) for key, data in members]


def positive_distances(anchor: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 anchor, (K, H, W, 3) uint8 positives -> (K,) float32 RMS pixel distances in [0, 1] units.

    Squared differences are summed as exact integers, so the value depends only on the pixels (no float order)."""
    diff = positives.reshape(len(positives), -1).astype(np.int64) - anchor.reshape(1, -1).astype(np.int64)  # (K, P)
    mean_square = (diff * diff).sum(axis=1) / diff.shape[1]  # (K,) in 0..255^2
    return (np.sqrt(mean_square) / 255.0).astype(np.float32)


def sample_sha256(members: list[tuple[str, bytes]]) -> str:
    """Checksum of one sample: its member names and bytes, in order."""
    digest = hashlib.sha256()
    for name, data in members:
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()
