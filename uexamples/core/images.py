"""Image I/O: from any stored image to a float working array and back, losslessly.

Every method sees an image as ``color``: a float32 array (C, H, W) in [0, 1] with C = 1 (grey modes)
or 3 (colour modes), at the image's own size. :class:`NativeImage` remembers everything needed to
write the result back in the *same* mode and size: the alpha channel (never touched), the palette of
a ``P`` image, the K channel of a ``CMYK`` image, the bit depth of ``I;16``.

Writing back quantises at the image's own bit depth and, for additive methods, clips to the bound
``round(maxval * epsilon)`` levels, so the L-inf guarantee holds on the stored pixels. The returned
image is a *fresh* PIL image whose ``format`` attribute asks ``datasets`` for PNG (TIFF for CMYK,
which PNG cannot hold), so the protection survives storage.

PNGs are deflated with zlib's run-length strategy (:data:`PNG_SAVE_OPTIONS`), not Pillow's default: on
the shared datasets it encodes 2x (noisy images) to 4.7x (CUDA's blurred photos) faster, and the files
are at most 4 % larger (benchmarks/README.md, "Model-free map against a PNG pass"). The pixels are the
same whatever the setting: PNG is lossless.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps

SUPPORTED_MODES = ("L", "LA", "RGB", "RGBA", "P", "I;16", "CMYK")
# Modes PNG cannot store; everything else goes to PNG.
_TIFF_MODES = ("CMYK",)


class ImageDecodeError(ValueError):
    """An image could not be read; the message names the row."""


# zlib's RLE strategy: the encode time of PNG's default (level 6, lazy matching) varies with the content and
# dominates a model-free map; RLE costs the same on every content, at 0-4 % more bytes (measured, see above).
PNG_SAVE_OPTIONS: dict[str, Any] = {"compress_type": zlib.Z_RLE}


def save_options(format: str) -> dict[str, Any]:
    """Pillow ``save`` options for a protected image stored as ``format``."""
    return dict(PNG_SAVE_OPTIONS) if format == "PNG" else {}


def storage_format(mode: str) -> str:
    """The lossless container for a mode: PNG, or TIFF where PNG cannot hold the mode."""
    return "TIFF" if mode in _TIFF_MODES else "PNG"


def bound_levels(epsilon: float, maxval: int) -> int:
    """The L-inf bound in stored levels: round(maxval * epsilon)."""
    return int(round(maxval * epsilon))


ORIENTATION = 0x0112  # the EXIF tag phones set instead of rotating the pixels


def upright(img: PIL.Image.Image) -> PIL.Image.Image:
    """Apply an EXIF orientation tag to the pixels, as ``datasets`` does when it decodes.

    One policy on every path (``ds.map`` on decoded images, ``apply`` and the CLI on raw bytes): the
    pixels people see are protected and stored upright, with no orientation tag left to re-rotate them.
    """
    try:
        orientation = img.getexif().get(ORIENTATION, 1)
    except Exception:  # an unreadable EXIF block: nothing to apply
        return img
    if orientation in (None, 1):
        return img
    return PIL.ImageOps.exif_transpose(img)


def _still(img: PIL.Image.Image, where: str) -> PIL.Image.Image:
    """Refuse animated images: protecting the first frame only would silently drop the others."""
    frames = getattr(img, "n_frames", 1)
    if frames > 1:
        raise ImageDecodeError(
            f"the image at {where} is animated ({frames} frames, {img.format}); uexamples protects still images "
            "only and would lose every frame but the first: split the frames into rows, or drop the row"
        )
    return img


def load_pil(value: Any, row: int | None = None) -> PIL.Image.Image:
    """Turn a datasets image cell (PIL image, {"bytes", "path"} dict, path or array) into a loaded, upright
    PIL image; animated images are refused."""
    where = f"row {row}" if row is not None else "an image"
    img = _decode(value, where)
    return upright(_still(img, where))


def upright_size(value: Any, row: int | None = None) -> tuple[int, int]:
    """(width, height) of an image cell as :func:`load_pil` would return it (EXIF orientation applied),
    read from the file header: no pixel is decoded. A cell that cannot be opened raises as ``load_pil`` does."""
    img = _open(value, f"row {row}" if row is not None else "an image")
    try:
        orientation = img.getexif().get(ORIENTATION, 1)
    except Exception:  # an unreadable EXIF block: upright() applies nothing either
        orientation = 1
    w, h = img.size
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)  # the orientations that turn the image a quarter


def _open(value: Any, where: str) -> PIL.Image.Image:
    """A datasets image cell as a PIL image whose pixels are not read yet (files: the header only)."""
    try:
        if isinstance(value, PIL.Image.Image):
            return value
        if isinstance(value, dict):
            if value.get("bytes") is not None:
                return PIL.Image.open(io.BytesIO(value["bytes"]))
            if value.get("path"):
                return PIL.Image.open(value["path"])
            raise ValueError("the cell has neither bytes nor a path")
        if isinstance(value, str):
            return PIL.Image.open(value)
        if isinstance(value, np.ndarray):
            return PIL.Image.fromarray(value)
    except Exception as exc:  # PIL raises many types for bad bytes
        raise ImageDecodeError(f"cannot decode the image at {where}: {type(exc).__name__}: {exc}") from exc
    if value is None:
        raise ImageDecodeError(f"the image at {where} is missing (None)")
    raise ImageDecodeError(f"the image at {where} has an unsupported type {type(value).__name__}")


def _decode(value: Any, where: str) -> PIL.Image.Image:
    img = _open(value, where)
    try:
        img.load()
    except Exception as exc:  # truncated or corrupt pixel data behind a readable header
        raise ImageDecodeError(f"cannot decode the image at {where}: {type(exc).__name__}: {exc}") from exc
    return img


@dataclass
class NativeImage:
    """One decoded image: float colour channels plus what is needed to restore its exact format."""

    color: np.ndarray  # float32 (C, H, W) in [0, 1], C in {1, 3}
    mode: str
    maxval: int
    levels: np.ndarray  # the original colour levels (C, H, W), integer dtype; the reference for the bound
    alpha: np.ndarray | None = None  # (H, W), kept verbatim
    extra: dict = field(default_factory=dict)  # palette indices / CMYK K channel / PIL info to carry over

    @property
    def size(self) -> tuple[int, int]:
        return self.color.shape[2], self.color.shape[1]

    @property
    def is_grey(self) -> bool:
        return self.color.shape[0] == 1

    # ------------------------------------------------------------------ decode
    @classmethod
    def from_pil(cls, img: PIL.Image.Image, row: int | None = None) -> "NativeImage":
        mode = img.mode
        if mode not in SUPPORTED_MODES:
            where = f" at row {row}" if row is not None else ""
            raise ImageDecodeError(
                f"image mode {mode!r}{where} is not supported; supported modes: {', '.join(SUPPORTED_MODES)}"
            )
        info = {k: img.info[k] for k in ("transparency", "icc_profile", "dpi") if k in img.info}
        arr = np.asarray(img)
        alpha = None
        extra: dict = {"info": info}
        if mode in ("L", "I;16"):
            levels = arr[None].copy()
            maxval = 65535 if mode == "I;16" else 255
        elif mode == "LA":
            levels, alpha, maxval = arr[None, :, :, 0].copy(), arr[:, :, 1].copy(), 255
        elif mode == "RGB":
            levels, maxval = arr.transpose(2, 0, 1).copy(), 255
        elif mode == "RGBA":
            levels, alpha, maxval = arr[:, :, :3].transpose(2, 0, 1).copy(), arr[:, :, 3].copy(), 255
        elif mode == "CMYK":
            # Work in RGB = 255 - (C + K), Pillow's own CMYK->RGB rule; K is kept and CMY absorb the change.
            cmy = arr[:, :, :3].transpose(2, 0, 1).astype(np.int32)
            k = arr[:, :, 3].astype(np.int32)
            extra["cmyk"] = arr.copy()
            levels, maxval = np.clip(255 - (cmy + k[None]), 0, 255).astype(np.uint8), 255
        else:  # "P": work on the palette colours; the index map is kept
            pal_mode = img.palette.mode if img.palette is not None else "RGB"
            nch = len(pal_mode)
            palette = np.asarray(img.getpalette(rawmode=pal_mode) or [], dtype=np.uint8).reshape(-1, nch)
            index = arr.astype(np.int64)
            if palette.shape[0] <= index.max(initial=0):  # short palettes: pad with black like Pillow does
                palette = np.concatenate([palette, np.zeros((index.max() + 1 - palette.shape[0], nch), np.uint8)])
            extra.update(palette=palette, palette_mode=pal_mode, index=arr.copy())
            levels, maxval = palette[index][:, :, :3].transpose(2, 0, 1).copy(), 255
        color = levels.astype(np.float32)
        color /= maxval  # in place: the same values as levels / maxval, one full-size array fewer
        return cls(color=color, mode=mode, maxval=maxval, levels=levels, alpha=alpha, extra=extra)

    # ------------------------------------------------------------------ encode
    def quantize(self, new_color: np.ndarray, bound: int | None) -> np.ndarray:
        """Round new colours to this image's levels; clip to +-bound levels around the original."""
        # int32 holds every level (<= 65535) at half the memory of int64: a 24-Mpixel photo is 288 MB per array
        scaled = np.clip(new_color, 0.0, 1.0)  # the same operations as rint(clip(x) * maxval), in place
        scaled *= self.maxval
        new = np.rint(scaled, out=scaled).astype(np.int32)
        if bound is not None:
            ref = self.levels.astype(np.int32)
            np.clip(new, ref - bound, ref + bound, out=new)
        return np.clip(new, 0, self.maxval, out=new)

    def to_pil(self, new_color: np.ndarray, bound: int | None) -> PIL.Image.Image:
        """A fresh image in the original mode and size carrying ``new_color``.

        ``bound``: the L-inf bound in levels (None for methods without one, such as CUDA).
        """
        if new_color.shape != self.color.shape:
            raise ValueError(f"protected colour has shape {new_color.shape}, expected {self.color.shape}")
        mode = self.mode
        if mode == "P":
            out = self._palette_image(new_color, bound)
        elif mode == "CMYK":
            q = self.quantize(new_color, bound)
            cmyk = self.extra["cmyk"].astype(np.int32)
            # RGB went up by d levels -> C, M, Y go down by d; the bound therefore holds on CMY too.
            cmy = np.clip(cmyk[:, :, :3] - (q - self.levels.astype(np.int32)).transpose(1, 2, 0), 0, 255)
            cmyk[:, :, :3] = cmy
            out = PIL.Image.fromarray(cmyk.astype(np.uint8), mode="CMYK")
        else:
            q = self.quantize(new_color, bound)
            if mode == "I;16":
                out = PIL.Image.fromarray(q[0].astype(np.uint16))  # uint16 -> "I;16"
            elif mode == "L":
                out = PIL.Image.fromarray(q[0].astype(np.uint8), mode="L")
            elif mode == "LA":
                out = PIL.Image.fromarray(np.stack([q[0], self.alpha], -1).astype(np.uint8), mode="LA")
            elif mode == "RGB":
                # one pass to interleaved uint8 (astype alone keeps the planar strides and Pillow copies again)
                out = PIL.Image.fromarray(np.ascontiguousarray(q.transpose(1, 2, 0), dtype=np.uint8), mode="RGB")
            else:  # RGBA
                rgba = np.concatenate([q.transpose(1, 2, 0), self.alpha[:, :, None]], -1)
                out = PIL.Image.fromarray(rgba.astype(np.uint8), mode="RGBA")
        out.info.update(self.extra.get("info", {}))
        out.format = storage_format(mode)  # datasets honours image.format when it encodes
        # ... and Pillow >= 12 keeps an encoderinfo set beforehand when datasets calls save(buffer, format=...) (an older
        # Pillow stores the same pixels with its default deflate: only the speed differs)
        out.encoderinfo = save_options(out.format)
        return out

    def _palette_image(self, new_color: np.ndarray, bound: int | None) -> PIL.Image.Image:
        """A palette image keeps its index map; each used palette colour moves by the mean change of its pixels.

        This is the L2 projection of the per-pixel change onto what a palette can express, so
        the protection of P images is weaker than that of true-colour images (documented).
        """
        index = self.extra["index"].astype(np.int64)
        palette = self.extra["palette"].astype(np.int64).copy()
        change = (np.clip(new_color, 0, 1) - self.color).reshape(3, -1)  # float, in [0,1] units
        flat = index.reshape(-1)
        counts = np.bincount(flat, minlength=palette.shape[0]).astype(np.float64)
        used = counts > 0
        for c in range(3):
            mean = np.bincount(flat, weights=change[c], minlength=palette.shape[0]) / np.maximum(counts, 1)
            step = np.rint(mean * 255).astype(np.int64)
            if bound is not None:
                step = np.clip(step, -bound, bound)
            palette[used, c] = np.clip(palette[used, c] + step[used], 0, 255)
        out = PIL.Image.fromarray(self.extra["index"].astype(np.uint8), mode="P")
        pal_mode = self.extra["palette_mode"]
        out.putpalette(palette.astype(np.uint8).reshape(-1).tobytes(), rawmode=pal_mode)
        return out


def restore_cell(original_cell: Any, image: PIL.Image.Image) -> Any:
    """Return the protected image in the same kind of cell the dataset gave us (PIL image or bytes dict)."""
    if isinstance(original_cell, dict):
        buf = io.BytesIO()
        image.save(buf, format=image.format, **save_options(image.format))
        return {"bytes": buf.getvalue(), "path": None}
    return image


def color_of_pil(img: PIL.Image.Image) -> np.ndarray:
    """The float colour array a method sees for a stored image (convenience for metrics and tests)."""
    return NativeImage.from_pil(img).color
