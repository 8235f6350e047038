"""Schema version 1: one WebDataset sample per anchor, key = anchor id.

Members of a sample, in this order (the file extension picks the codec):
    {id}.anchor.png       the anchor image, (H, W, 3) uint8, lossless PNG
    {id}.cls.txt          the label as decimal text, -1 when unknown
    {id}.meta.json        {"anchor_id", "seeds": [K ints]}: seeds[j] made positive j
    {id}.pos{j}.png       positive j = 0..K-1, (H, W, 3) uint8, lossless PNG
Nothing else. A reader decodes only these keys, with the codecs below.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

SCHEMA_VERSION = 1
ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,80}$")  # no dots: a WebDataset key ends at the first dot
ANCHOR, LABEL, META = "anchor.png", "cls.txt", "meta.json"
POSITIVE = re.compile(r"^pos(0|[1-9][0-9]{0,2})\.png$")
MAX_TEXT_BYTES = 1 << 16  # cls.txt / meta.json larger than this are not ours
MAX_IMAGE_SIDE = 1024
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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


def decode_png(data: bytes, what: str = "image") -> np.ndarray:
    """PNG bytes -> (H, W, 3) uint8. Refuses anything that is not a PNG of a sane size (no other codec is tried)."""
    if not data.startswith(PNG_SIGNATURE):
        raise SchemaError(f"{what} is not a PNG")
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            if max(image.size) > MAX_IMAGE_SIDE:
                raise SchemaError(f"{what} is {image.size[0]}x{image.size[1]}, above the {MAX_IMAGE_SIDE} px limit")
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except SchemaError:
        raise
    except Exception as error:  # PIL raises many types for broken data
        raise SchemaError(f"{what} is a broken PNG ({error})") from None


def decode_label(data: bytes) -> int:
    text = data.decode("ascii", errors="strict").strip() if len(data) <= 32 else ""
    if not re.fullmatch(r"-?[0-9]{1,9}", text):
        raise SchemaError(f"label {data[:32]!r} is not a decimal integer")
    return int(text)


def decode_meta(data: bytes) -> dict:
    if len(data) > MAX_TEXT_BYTES:
        raise SchemaError(f"meta.json is {len(data)} bytes, above the {MAX_TEXT_BYTES} limit")
    meta = json.loads(data.decode("utf-8"))
    if not isinstance(meta, dict) or not isinstance(meta.get("seeds"), list):
        raise SchemaError("meta.json must be an object with a 'seeds' list")
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


def sample_sha256(members: list[tuple[str, bytes]]) -> str:
    """Checksum of one sample: its member names and bytes, in order."""
    digest = hashlib.sha256()
    for name, data in members:
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()
