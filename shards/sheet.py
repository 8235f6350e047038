"""Contact sheets: anchors in the first column, their positives to the right."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from clsp.shards.atomic import write_atomic
from clsp.shards.manifest import Manifest, read_manifest

SHEET_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}  # --out extension -> PIL format


def _fit(draw, text: str, width: int, font) -> str:
    """`text` cut (with an ellipsis) to fit `width` pixels."""
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if len(text) > 1 else ""
    return text


def image_grid(rows: list[list[np.ndarray]], min_side: int = 48, gap: int = 2, anchor_gap: int = 6,
               captions: list[list[str]] | None = None, title: str | None = None) -> Image.Image:
    """rows of (H, W, 3) uint8 images -> one PIL image; small images are enlarged (nearest) to `min_side`.

    The first image of each row is set apart by `anchor_gap` (it is the anchor). `captions[r][c]`: a short line under
    tile (r, c) (an id, a class, "pos 3"), cut to the tile's width; `title`: lines above the grid (what the sheet shows:
    source, generator, sampler settings).
    """
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=11)
    side = max(im.shape[0] for row in rows for im in row)
    scale = max(1, -(-min_side // side))  # ceil: small images become legible
    cell = side * scale
    caption_h = 14 if captions else 0
    title_lines = title.splitlines() if title else []
    top = 15 * len(title_lines) + (4 if title_lines else 0)
    columns = max(len(row) for row in rows)
    width = columns * (cell + gap) + anchor_gap
    sheet = Image.new("RGB", (width, top + len(rows) * (cell + caption_h + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, line in enumerate(title_lines):
        draw.text((2, 2 + 15 * i), _fit(draw, line, width - 4, font), fill=(0, 0, 0), font=font)
    for r, row in enumerate(rows):
        y = top + r * (cell + caption_h + gap)
        for c, image in enumerate(row):
            x = c * (cell + gap) + (anchor_gap if c else 0)
            sheet.paste(Image.fromarray(image).resize((cell, cell), Image.NEAREST), (x, y))
            if captions and c < len(captions[r]):
                draw.text((x + 1, y + cell), _fit(draw, captions[r][c], cell - 2, font), fill=(60, 60, 60), font=font)
    return sheet


def check_sheet_out(out: str | Path, overwrite: bool = False) -> str:
    """The PIL format `out` names by its extension; ValueError (before any work) for another extension, or for an
    existing file unless `overwrite`: a sheet never replaces a file nobody asked it to."""
    found = SHEET_FORMATS.get(Path(out).suffix.lower())
    if found is None:
        raise ValueError(f"{out} does not end in an image extension: end it in {', '.join(SHEET_FORMATS)}")
    if Path(out).exists() and not overwrite:
        raise ValueError(f"{out} exists: pass --overwrite to replace it, or choose another --out")
    return found


def save_sheet(image: Image.Image, out: str | Path, overwrite: bool = False) -> Path:
    """Write `image` to `out` in the format its extension names, atomically (a failure leaves no half image)."""
    image_format = check_sheet_out(out, overwrite)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(out, lambda temp: image.save(temp, format=image_format))


def contact_sheet(directory: str, out: str | Path, anchors: int = 8, overwrite: bool = False,
                  manifest: Manifest | None = None) -> Path:
    """Write `sheet_image` to `out` (its format by the extension, see SHEET_FORMATS); an existing `out` is replaced
    only with `overwrite`. `manifest`: the directory's, when the caller has read it already."""
    check_sheet_out(out, overwrite)  # a bad --out is refused before any shard is read
    return save_sheet(sheet_image(directory, anchors, manifest), out, overwrite)


def sheet_image(directory: str, anchors: int = 8, manifest: Manifest | None = None) -> Image.Image:
    """The first `anchors` anchors of a shard directory and all their positives, each anchor captioned with its label
    and id, under a title with the generator and the sampler settings the manifest records."""
    manifest = manifest or read_manifest(directory)
    rows, captions = [], []
    for sample in manifest.samples():  # each checked: a malformed sample stops with its name
        rows.append([sample.anchor()] + [sample.positive(j) for j in range(sample.k)])
        captions.append([f"{sample.label} · {sample.key}"] + [f"pos {j}" for j in range(sample.k)])
        if len(rows) == anchors:
            break
    run, sampler = manifest.run, manifest.run.get("sampler", {})
    generator = run.get("generator", {})
    title = "\n".join([f"{Path(str(directory).rstrip('/')).name}: {run.get('source', {}).get('spec')} anchors (left:",
                       f"label · id), K = {manifest.k} positives each", f"generator {generator.get('model_id')}",
                       f"weights {str(generator.get('weights_sha256'))[:12]}, seed {run.get('seed')}",
                       f"w = {sampler.get('w')}, {sampler.get('steps')} DDIM steps, eta = {sampler.get('eta')}"])
    return image_grid(rows, min_side=64, captions=captions, title=title)
