"""The two image codecs of a shard sample: `png` (lossless 8-bit RGB PNG, members `*.png`, the default: smaller) and
`raw` (schema 3: the pixels as a NumPy .npy file, members `*.npy`: no decompression when training reads them).

Each codec has `encode(image) -> bytes`, `check(data, what, size)` (headers only, cheap: what the manifest's contract
runs for every sample) and `decode(data, what, size) -> (H, W, 3) uint8` (check, then decode). Nothing is tried but
the codec a member's extension names, and nothing is ever unpickled: a .npy member is parsed here, never `np.load`ed.
"""
from __future__ import annotations

import io
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

MAX_IMAGE_SIDE = 1024


class SchemaError(ValueError):
    """A sample or member that does not follow the schema; the message names the sample and what is wrong."""


def _check_side(what: str, width: int, height: int, size: int | None) -> None:
    """Shared by both codecs: the manifest's size when it is known, else within 1..MAX_IMAGE_SIDE."""
    if size is not None and (width, height) != (size, size):
        raise SchemaError(f"{what} is {width}x{height}; the manifest says {size}x{size}: regenerate the shard")
    if not (1 <= width <= MAX_IMAGE_SIDE and 1 <= height <= MAX_IMAGE_SIDE):
        raise SchemaError(f"{what} is {width}x{height}, outside 1..{MAX_IMAGE_SIDE} px")


# --- png -----------------------------------------------------------------------------------------------------------
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOUR_TYPES = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale+alpha", 6: "RGBA"}


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes; deterministic (fixed compression, no timestamps or text chunks)."""
    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def check_png(data: bytes, what: str = "image", size: int | None = None) -> tuple[int, int]:
    """Refuse anything but an intact 8-bit RGB PNG (of `size` x `size` when given), reading only its chunk headers;
    returns (H, W) for `decode_png`.

    Every chunk's CRC is checked and the file must run from IHDR to IEND, so a truncated or bit-flipped image is found
    without decompressing it; grayscale, palette, alpha and 16-bit PNGs are refused rather than silently converted.
    Exactly one IHDR, the first chunk: PIL decodes by the first, so a later one could pass this check with a colour
    type the pixels do not have.
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
    if kinds.count(b"IHDR") != 1:
        raise SchemaError(f"{what} is a malformed PNG ({kinds.count(b'IHDR')} IHDR chunks; a PNG has exactly one): "
                          f"regenerate the shard")
    width, height, depth, colour = struct.unpack(">IIBB", header[:10])
    if (depth, colour) != (8, 2):
        kind = PNG_COLOUR_TYPES.get(colour, f"colour type {colour}")
        raise SchemaError(f"{what} is a {kind} PNG ({depth}-bit); the schema stores 8-bit RGB: regenerate the shard")
    _check_side(what, width, height, size)
    return height, width


def decode_png(data: bytes, what: str = "image", size: int | None = None) -> np.ndarray:
    """PNG bytes -> (H, W, 3) uint8 (read-only), after `check_png` (no other codec is tried)."""
    height, width = check_png(data, what, size)
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            mode, pixels = image.mode, np.asarray(image)  # no conversion: anything but RGB is refused below
    except Exception as error:  # PIL raises many types for broken data
        raise SchemaError(f"{what} is a broken PNG ({error})") from None
    # What PIL decoded, checked too: the header check reads chunks as this module parses them, PIL may read otherwise.
    if mode != "RGB" or pixels.dtype != np.uint8 or pixels.shape != (height, width, 3):
        raise SchemaError(f"{what} decodes to PIL mode {mode} ({pixels.dtype}, shape {pixels.shape}); the schema "
                          f"stores {height}x{width} 8-bit RGB, shape ({height}, {width}, 3): regenerate the shard")
    return pixels


# --- raw (.npy) ----------------------------------------------------------------------------------------------------
# NPY format 1.0 as numpy writes a C-order uint8 array: magic, version, little-endian uint16 length of the header text,
# then the header text, padded with spaces and a final newline so that the pixels start at a multiple of 64 bytes.
NPY_MAGIC = b"\x93NUMPY\x01\x00"  # version 1.0
NPY_PREFIX = len(NPY_MAGIC) + 2  # magic, version, uint16 header length
NPY_ALIGN = 64
NPY_GROWTH_DIGITS = 21  # numpy leaves room for the first axis to grow to 21 digits in place
NPY_DICT = "{{'descr': '|u1', 'fortran_order': False, 'shape': ({}, {}, 3), }}"
NPY_HEADER = re.compile(r"\{'descr': '\|u1', 'fortran_order': False, 'shape': \(([1-9][0-9]{0,3}), ([1-9][0-9]{0,3}), "
                        r"3\), \}")  # the only header accepted: exactly (H, W, 3) uint8 in C order, no leading zeros


def encode_npy(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> .npy bytes, byte for byte what `np.save` writes (format 1.0, dtype '|u1', C order)."""
    height, width = image.shape[:2]
    text = NPY_DICT.format(height, width) + " " * (NPY_GROWTH_DIGITS - len(str(height)))
    padding = NPY_ALIGN - (NPY_PREFIX + len(text) + 1) % NPY_ALIGN  # numpy pads a whole 64 when already aligned
    text += " " * padding + "\n"
    return NPY_MAGIC + struct.pack("<H", len(text)) + text.encode("ascii") + np.ascontiguousarray(image).tobytes()


def _npy_layout(data: bytes, what: str) -> tuple[int, int, int]:
    """(height, width, offset of the pixels) from a .npy header that is exactly the one `encode_npy` writes for some
    size; SchemaError for anything else (other dtypes or orders, object arrays, other versions or paddings)."""
    if not data.startswith(NPY_MAGIC[:6]):
        raise SchemaError(f"{what} is not a .npy file")
    offset = NPY_PREFIX + int.from_bytes(data[8:10], "little")  # where the pixels start
    if len(data) >= 8 and data[6:8] != NPY_MAGIC[6:]:
        raise SchemaError(f"{what} is .npy version {data[6]}.{data[7]}; the schema stores version 1.0")
    if len(data) < NPY_PREFIX or offset > len(data):
        raise SchemaError(f"{what} is a broken .npy file (truncated inside its header)")
    text = data[NPY_PREFIX:offset].decode("latin-1")  # format 1.0's header encoding: every byte maps to a character
    match = NPY_HEADER.match(text)
    if match is None:
        raise SchemaError(f"{what} has the .npy header {text[:100].rstrip()!r}; the schema stores only "
                          f"{NPY_DICT.format('H', 'W')} (uint8 RGB in C order): regenerate the shard")
    if re.fullmatch(" *\n", text[match.end():]) is None or offset % NPY_ALIGN:
        raise SchemaError(f"{what} is a broken .npy file (its header must be padded with spaces and one newline to a "
                          f"multiple of {NPY_ALIGN} bytes)")
    return int(match[1]), int(match[2]), offset


def check_npy(data: bytes, what: str = "image", size: int | None = None) -> tuple[int, int, int]:
    """Refuse anything but a .npy file of one (H, W, 3) uint8 image (`size` x `size` when given) whose pixels are all
    there and nothing after them, reading only its header; returns (H, W, offset of the pixels) for `decode_npy`."""
    height, width, offset = _npy_layout(data, what)
    _check_side(what, width, height, size)
    if len(data) - offset != height * width * 3:
        raise SchemaError(f"{what} holds {len(data) - offset} bytes of pixels; a {height}x{width} RGB image is "
                          f"{height * width * 3}: the member is truncated or has bytes appended")
    return height, width, offset


def decode_npy(data: bytes, what: str = "image", size: int | None = None) -> np.ndarray:
    """.npy bytes -> (H, W, 3) uint8 (a read-only view of `data`, as decode_png's arrays are read-only), after
    `check_npy`."""
    height, width, offset = check_npy(data, what, size)
    return np.frombuffer(data, np.uint8, height * width * 3, offset).reshape(height, width, 3)


# --- the codecs by name and by member extension --------------------------------------------------------------------
@dataclass(frozen=True)
class Codec:
    name: str  # what the manifest's run.codec records
    extension: str  # of its image members: anchor.EXT, pos{j}.EXT
    encode: Callable[[np.ndarray], bytes]
    check: Callable[..., object]  # (data, what, size): headers only
    decode: Callable[..., np.ndarray]  # (data, what, size) -> (H, W, 3) uint8


CODECS = {"png": Codec("png", "png", encode_png, check_png, decode_png),
          "raw": Codec("raw", "npy", encode_npy, check_npy, decode_npy)}
DEFAULT_CODEC = "png"  # what a manifest without run.codec holds
BY_EXTENSION = {codec.extension: codec for codec in CODECS.values()}


def get_codec(name: str) -> Codec:
    if name not in CODECS:
        raise ValueError(f"unknown image codec {name!r}: use {' or '.join(CODECS)}")
    return CODECS[name]


def codec_of(key: str) -> Codec:
    """The codec of an image member key ("anchor.npy", "pos3.png") by its extension."""
    found = BY_EXTENSION.get(key.rsplit(".", 1)[-1])
    if found is None:
        raise SchemaError(f"{key} is not an image member: image members end in "
                          f"{' or '.join('.' + e for e in BY_EXTENSION)}")
    return found
