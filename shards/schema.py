"""Schema versions 2 and 3: one WebDataset sample per anchor, key = anchor id.

Members of a sample, in this order (the file extension picks the codec, shards.codecs):
    {id}.anchor.EXT       the anchor image, (H, W, 3) uint8 of the manifest's image size
    {id}.cls.txt          the label as decimal text, -1 when unknown, else below the manifest's class count
    {id}.meta.json        {"anchor_id", "seeds": [K ints]}: seeds[j] made positive j
    {id}.pos{j}.EXT       positive j = 0..K-1, like the anchor
Nothing else. A reader decodes only these keys, with the codecs of shards.codecs. EXT is the run's image codec's, the
same for every image of every sample: `png` (lossless 8-bit RGB PNG; the default) or, from version 3, `npy` (codec
`raw`: NPY format 1.0 of the (H, W, 3) uint8 array, C order, as `np.save` writes it; faster to load, larger).

Version 2 keeps version 1's members byte for byte and adds per-positive scores to the manifest's index.parquet (one
list of K float32 per anchor, see shards.manifest): `positive_distance`, the RMS pixel distance of each positive to its
anchor (`positive_distances`), and, when the synth job scored with a reference classifier, `positive_agreement`, that
classifier's probability of the anchor's class. Version-1 directories (no scores) are still read.

Version 3 adds the codec: the manifest's run.codec is "raw" (or "png"; absent means png) and a raw run's images are
.npy members. A run is written with the oldest version that describes it (`schema_version`): a PNG run still writes
version 2, its manifest without run.codec, byte for byte as before, so a clsp that reads only version 2 reads it.
Scores are computed on decoded pixels, so a PNG and a raw run of the same input differ only in member bytes and
checksums.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import numpy as np

from clsp.shards.codecs import BY_EXTENSION, CODECS, DEFAULT_CODEC, SchemaError, get_codec

SCHEMA_VERSION = 3  # the newest version written (a raw run's)
CODEC_VERSIONS = {"png": 2, "raw": 3}  # the oldest version that holds each codec: what a run of it is written with
READ_VERSIONS = (1, 2, 3)  # version 1: the same members as 2, an index without scores
SCORES = ("distance", "agreement")  # per-positive scores: index column positive_{metric}
MAX_ID_CHARS = 80  # member names stay under tar's 100 characters (shards/writer.py)
ID_PATTERN = re.compile(rf"^[A-Za-z0-9_-]{{1,{MAX_ID_CHARS}}}$")  # no dots: a WebDataset key ends at the first dot
LABEL, META = "cls.txt", "meta.json"
_EXTENSIONS = "|".join(BY_EXTENSION)  # png|npy
_POSITIVE_STEM = r"pos(0|[1-9][0-9]{0,2})"  # pos0 .. pos999, no leading zeros
IMAGE = re.compile(rf"^(anchor|{_POSITIVE_STEM})\.({_EXTENSIONS})$")  # an image member of either codec
POSITIVE = re.compile(rf"^{_POSITIVE_STEM}\.({_EXTENSIONS})$")
MAX_TEXT_BYTES = 1 << 16  # cls.txt / meta.json larger than this are not ours
MAX_K = 1000  # positives pos0..pos999: the member name allows three digits
# The manifest's run.sampler.noise names the generator of noise (clsp.synth.noise); shards made before it was recorded
# were made with this one, and their manifests read as naming it.
LEGACY_NOISE = "cpu-generator"
NOISE_KINDS = ("counter", LEGACY_NOISE)  # every generator of noise a manifest may name


def schema_version(codec: str) -> int:
    """The version a run with this image codec is written with."""
    get_codec(codec)  # ValueError naming the codecs
    return CODEC_VERSIONS[codec]


def anchor_key(codec: str = DEFAULT_CODEC) -> str:
    return f"anchor.{get_codec(codec).extension}"


def positive_key(j: int, codec: str = DEFAULT_CODEC) -> str:
    return f"pos{j}.{get_codec(codec).extension}"


def image_keys(stem: str) -> list[str]:
    """"anchor" or "pos3" -> its member key in each codec: ["anchor.png", "anchor.npy"]."""
    return [f"{stem}.{c.extension}" for c in CODECS.values()]


def member_keys(k: int, codec: str = DEFAULT_CODEC) -> list[str]:
    """The keys of a sample with K positives in this codec, in the order they are written."""
    return [anchor_key(codec), LABEL, META] + [positive_key(j, codec) for j in range(k)]


def is_image_key(key: str) -> bool:
    return IMAGE.fullmatch(key) is not None


def is_schema_key(key: str) -> bool:
    return key in (LABEL, META) or is_image_key(key)


@dataclass(frozen=True)
class ShardSample:
    anchor_id: str
    anchor: np.ndarray  # (H, W, 3) uint8
    positives: np.ndarray  # (K, H, W, 3) uint8
    label: int  # -1 when unknown
    seeds: list[int]  # (K,) the seed that made each positive


def check_id(anchor_id: str) -> str:
    if not isinstance(anchor_id, str) or not ID_PATTERN.fullmatch(anchor_id):
        raise SchemaError(f"anchor id {anchor_id!r} is not allowed: use 1-80 letters, digits, '_' or '-' (no dots)")
    return anchor_id


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


def encode_sample(sample: ShardSample, k: int, image_size: int, codec: str = DEFAULT_CODEC) \
        -> list[tuple[str, bytes]]:
    """Check a sample against the schema and encode it, images with `codec`: [(member name, bytes)] in schema
    order."""
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
    encode = get_codec(codec).encode
    meta = json.dumps({"anchor_id": sample.anchor_id, "seeds": list(sample.seeds)}, sort_keys=True)
    members = [(anchor_key(codec), encode(sample.anchor)), (LABEL, str(int(sample.label)).encode()),
               (META, meta.encode())]
    members += [(positive_key(j, codec), encode(p)) for j, p in enumerate(sample.positives)]
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
