"""Base for methods whose output is ``image + noise`` with ``|noise| <= epsilon``.

The noise is computed at a *working resolution* and brought to each image's own size:

- ``resolution=N`` (or the method's default, e.g. a surrogate's input size): images of any size are
  resized to an RGB batch of N x N (an image already at that size passes untouched), and the noise
  is resized back to each image with ``resample`` (bilinear by default). Cheap for big images, but
  per-pixel structure is smeared when N is far from the image size.
- ``resolution="native"``: no resizing at all; images are grouped by size and each group is one
  batch, so the noise lands on the pixels it was computed for (large or sparse images, medical scans).

Grey images get the same noise on the three working channels (a constraint kept at every step by
:func:`project_grey`), so the noise transfers to their single channel exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .batch import ProtectBatch
from .images import NativeImage
from .options import option
from .protector import Protector, ProtectorConfig

NATIVE = "native"
RESAMPLE_MODES = ("bilinear", "bicubic", "nearest", "area")


def parse_resolution(value: Any) -> int | str | None:
    """``None`` (the method's default), a positive int, or ``"native"``."""
    if value is None or value == NATIVE:
        return value
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"resolution must be a positive number of pixels or 'native', got {value!r}")
    return int(value)


@dataclasses.dataclass
class AdditiveConfig(ProtectorConfig):
    """Where the noise is computed (see the module docstring)."""

    resolution: int | str | None = option(
        None, "working resolution of the noise: N pixels, or 'native' (default: the method's, e.g. the "
        "surrogate's input size, 32 for built-in nets)", parse=parse_resolution)  # fmt: skip
    resample: str = option("bilinear", "how noise computed at the working resolution is resized to each image",
                           choices=RESAMPLE_MODES)  # fmt: skip


def to_working(images: list[NativeImage], resolution: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack images into (B, 3, R, R) in [0, 1] (``None``: at their own, common size); also the (B,) grey mask."""
    sizes = sorted({img.color.shape[1:] for img in images}) if resolution is None else []
    if len(sizes) > 1:
        raise ValueError(f"native resolution needs images of one size here, got {sizes[:4]}; set resolution=N")
    out = []
    for img in images:
        x = torch.from_numpy(img.color)[None]
        if x.shape[1] == 1:
            x = x.expand(1, 3, *x.shape[2:])
        if resolution is not None and tuple(x.shape[2:]) != (resolution, resolution):
            x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
        out.append(x.clamp(0, 1))
    grey = torch.tensor([img.is_grey for img in images], dtype=torch.bool)
    return torch.cat(out), grey


def to_native(delta: torch.Tensor, image: NativeImage, epsilon: float, resample: str = "bilinear") -> np.ndarray:
    """Bring one working noise (3, r, r) to the image's size and channels, within the bound."""
    return resize_noise(delta, image.color.shape, epsilon, resample)


def resize_noise(delta: torch.Tensor, shape: tuple[int, int, int], epsilon: float, resample: str = "bilinear") -> np.ndarray:
    """One working noise (3, r, r) as (C, H, W) float32 for ``shape`` = (C, H, W), within the bound (C = 1:
    the mean of the three channels, which :func:`project_grey` kept equal)."""
    c, h, w = shape
    d = delta[None].float().cpu()
    if tuple(d.shape[2:]) != (h, w):
        corners = {"align_corners": False} if resample in ("bilinear", "bicubic") else {}
        d = F.interpolate(d, size=(h, w), mode=resample, **corners)
    d = d[0].clamp(-epsilon, epsilon)
    if c == 1:
        d = d.mean(0, keepdim=True)
    return d.numpy()


def project_grey(delta: torch.Tensor, grey: torch.Tensor) -> torch.Tensor:
    """Keep the noise of grey images equal on R, G and B."""
    if not bool(grey.any()):
        return delta
    mean = delta.mean(1, keepdim=True).expand_as(delta)
    return torch.where(grey.to(delta.device)[:, None, None, None], mean, delta)


class AdditiveProtector(Protector):
    """A protector whose output is ``image + noise`` with ``|noise| <= epsilon``.

    Subclasses implement :meth:`perturbation` on a working batch; this class does the resizing,
    the grouping of native-resolution images and the bound.
    """

    config_class = AdditiveConfig
    default_resolution: int = 32

    def validate_config(self) -> None:
        super().validate_config()
        self.config.resolution = parse_resolution(self.config.resolution)

    def working_resolution(self) -> int | None:
        """Pixels of the working grid; ``None`` at native resolution."""
        res = self.config.resolution
        if res == NATIVE:
            return None
        return int(res or self.default_resolution)

    def perturbation(self, x: torch.Tensor, batch: ProtectBatch, grey: torch.Tensor) -> torch.Tensor:
        """Noise (B, 3, r, r) for the working batch ``x`` of ``batch`` (``batch.keys`` seed per-sample randomness)."""
        raise NotImplementedError

    def native_limit(self) -> int | None:
        """At native resolution, the largest image side worked natively (larger images go to the grid of
        ``default_resolution``); None: every image natively (``resolution="native"`` set explicitly)."""
        return None

    def working_batches(self, batch: ProtectBatch) -> list[tuple[list[int], ProtectBatch, torch.Tensor, torch.Tensor]]:
        """``batch`` as working batches: (its rows, the sub-batch, x, grey); one per image size at native
        resolution (images above :meth:`native_limit` together on the grid), else the whole batch at the
        working resolution."""
        res = self.working_resolution()
        if res is None:  # one working batch per image size
            limit = self.native_limit()
            groups: dict[tuple, list[int]] = {}
            for i, img in enumerate(batch.images):
                h, w = img.color.shape[1:]
                groups.setdefault((h, w) if limit is None or max(h, w) <= limit else "grid", []).append(i)
            parts = [(idx, batch.select(idx), self.default_resolution if key == "grid" else None)
                     for key, idx in groups.items()]  # fmt: skip
        else:
            parts = [(list(range(len(batch))), batch, res)]
        return [(idx, part, *to_working(part.images, r)) for idx, part, r in parts]

    def protect_batch(self, batch: ProtectBatch) -> list[np.ndarray]:
        eps, resample = float(self.config.epsilon), self.config.resample
        out: list[np.ndarray | None] = [None] * len(batch)
        for idx, part, x, grey in self.working_batches(batch):
            delta = self.perturbation(x, part, grey)
            for i, img, d in zip(idx, part.images, delta):
                out[i] = img.color + to_native(d, img, eps, resample)
        return out  # type: ignore[return-value]
