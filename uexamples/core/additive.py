"""Base for methods that add bounded noise computed at a fixed working resolution.

Images of any size and mode are brought to an RGB batch at the working resolution (an image
already at that size passes untouched), the method computes noise there, and the noise is
resized back to each image's own size and added to its own channels. Grey images get the same
noise on the three channels (a constraint the engine keeps at every step), so the noise
transfers to their single channel exactly.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .images import NativeImage
from .protector import Protector, sample_key


def to_working(images: list[NativeImage], resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack images into (B, 3, R, R) in [0, 1]; also return the (B,) grey mask."""
    out = []
    for img in images:
        x = torch.from_numpy(img.color)[None]
        if x.shape[1] == 1:
            x = x.expand(1, 3, *x.shape[2:])
        if tuple(x.shape[2:]) != (resolution, resolution):
            x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
        out.append(x.clamp(0, 1))
    grey = torch.tensor([img.is_grey for img in images], dtype=torch.bool)
    return torch.cat(out), grey


def to_native(delta: torch.Tensor, image: NativeImage, epsilon: float) -> np.ndarray:
    """Resize one working-resolution noise (3, R, R) to the image's size and channels."""
    c, h, w = image.color.shape
    d = delta[None].float().cpu()
    if tuple(d.shape[2:]) != (h, w):
        d = F.interpolate(d, size=(h, w), mode="bilinear", align_corners=False)
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
    """A protector whose output is ``image + noise`` with ``|noise| <= epsilon``."""

    def working_resolution(self) -> int:
        return int(getattr(self.config, "resolution", None) or 32)

    def perturbation(
        self, x: torch.Tensor, labels: torch.Tensor | None, keys: list[int], grey: torch.Tensor
    ) -> torch.Tensor:
        """Noise (B, 3, R, R) for the working batch ``x``; ``keys`` seed per-sample randomness."""
        raise NotImplementedError

    def protect_colors(self, images: list[NativeImage], labels: list[int] | None) -> list[np.ndarray]:
        x, grey = to_working(images, self.working_resolution())
        keys = [sample_key(img, self.config.seed) for img in images]
        y = torch.tensor(labels, dtype=torch.long) if labels is not None else None
        delta = self.perturbation(x, y, keys, grey)
        eps = float(self.config.epsilon)
        return [img.color + to_native(d, img, eps) for img, d in zip(images, delta)]
