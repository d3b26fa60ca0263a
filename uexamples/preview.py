"""Preview picture: clean | protected | amplified noise, one row per sample image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import numpy as np
import PIL.Image
import PIL.ImageDraw

from .core.images import NativeImage, load_pil


def _rgb(levels: np.ndarray, maxval: int) -> np.ndarray:
    x = levels.astype(np.float64) / maxval
    if x.shape[0] == 1:
        x = np.repeat(x, 3, axis=0)
    return x.transpose(1, 2, 0)


PHOTO_CELL = 160  # thumbnail size when the images are photos (larger than two default cells)


def _tile(img: np.ndarray) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.clip(np.rint(img * 255), 0, 255).astype(np.uint8), "RGB")


def _centre_crop(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return img[top : top + size, left : left + size]


def preview_grid(pairs: list[tuple[NativeImage, NativeImage]], cell: int = 96, gap: int = 4) -> PIL.Image.Image:
    """A white sheet with one row per (original, protected) pair; the noise is scaled to fill [0, 255].

    Thumbnails hide what a viewer would see at full size: when the images are photos (a side above two
    cells), the cells grow to 160 px and two more columns show the centre of the clean and the protected
    image at 1:1, pixel for pixel, to judge the visibility of the change.
    """
    photos = any(max(orig.size) > 2 * cell for orig, _ in pairs)
    if photos:
        cell = max(cell, PHOTO_CELL)
    titles = ["clean", "protected", "noise (x amp)"] + (["clean 1:1 (centre)", "protected 1:1"] if photos else [])
    rows = []
    for orig, prot in pairs:
        a, b = _rgb(orig.levels, orig.maxval), _rgb(prot.levels, prot.maxval)
        diff = b - a
        scale = np.abs(diff).max()
        noise = 0.5 + 0.5 * diff / scale if scale > 0 else np.full_like(diff, 0.5)
        tiles = []
        for img in (a, b, noise):
            tile = _tile(img)
            w, h = tile.size
            s = cell / max(w, h)
            tiles.append(tile.resize((max(1, round(w * s)), max(1, round(h * s))), PIL.Image.NEAREST))
        if photos:  # the stored pixels, not resampled
            tiles += [_tile(_centre_crop(a, cell)), _tile(_centre_crop(b, cell))]
        rows.append(tiles)
    width = len(titles) * cell + (len(titles) + 1) * gap
    header = 16
    sheet = PIL.Image.new("RGB", (width, header + len(rows) * (cell + gap) + gap), "white")
    draw = PIL.ImageDraw.Draw(sheet)
    for c, title in enumerate(titles):
        draw.text((gap + c * (cell + gap) + 2, 2), title, fill="black")
    for r, tiles in enumerate(rows):
        for c, tile in enumerate(tiles):
            sheet.paste(tile, (gap + c * (cell + gap), header + gap + r * (cell + gap)))
    return sheet


def save_preview(
    original: datasets.Dataset, protected: datasets.Dataset, image_column: str, path: str | Path, n: int = 6
) -> Path:
    """Save the preview of the first ``n`` images (columns: clean | protected | amplified noise)."""
    n = min(n, len(original))
    raw_o = original.cast_column(image_column, datasets.Image(decode=False))[:n][image_column]
    raw_p = protected.cast_column(image_column, datasets.Image(decode=False))[:n][image_column]
    return save_preview_cells(list(zip(raw_o, raw_p)), path)


def save_preview_cells(pairs: list[tuple[Any, Any]], path: str | Path) -> Path:
    """Save the preview of (original, protected) image cells (PIL images or ``{"bytes": ...}`` dicts)."""
    natives = [(NativeImage.from_pil(load_pil(o)), NativeImage.from_pil(load_pil(p))) for o, p in pairs]
    path = Path(path)
    preview_grid(natives).save(path, format="PNG")
    return path
