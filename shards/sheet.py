"""Contact sheets: anchors in the first column, their positives to the right."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from shards.manifest import read_manifest


def image_grid(rows: list[list[np.ndarray]], min_side: int = 48, gap: int = 2, anchor_gap: int = 6) -> Image.Image:
    """rows of (H, W, 3) uint8 images -> one PIL image; small images are enlarged (nearest) to `min_side`.

    The first image of each row is set apart by a wider gap (it is the anchor).
    """
    side = max(im.shape[0] for row in rows for im in row)
    scale = max(1, -(-min_side // side))  # ceil: small images become legible
    cell = side * scale
    columns = max(len(row) for row in rows)
    width = columns * (cell + gap) + anchor_gap
    sheet = Image.new("RGB", (width, len(rows) * (cell + gap)), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            tile = Image.fromarray(image).resize((cell, cell), Image.NEAREST)
            sheet.paste(tile, (c * (cell + gap) + (anchor_gap if c else 0), r * (cell + gap)))
    return sheet


def contact_sheet(directory: str, out: str | Path, anchors: int = 8) -> Path:
    """Write a PNG of the first `anchors` anchors of a shard directory and all their positives."""
    rows = []
    for sample in read_manifest(directory).samples():  # each checked: a malformed sample stops with its name
        rows.append([sample.anchor()] + [sample.positive(j) for j in range(sample.k)])
        if len(rows) == anchors:
            break
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows).save(out)
    return out
