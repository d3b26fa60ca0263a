"""Regions of an image that several parts of the package need to agree on.

>>> import torch
>>> x = torch.zeros(1, 1, 5, 5); x[..., 1:4, 1:4] = 0.5   # a bright square in a black frame
>>> dark_frame(x, 20 / 255)[0].int().tolist()
[[1, 1, 1, 1, 1], [1, 0, 0, 0, 1], [1, 0, 0, 0, 1], [1, 0, 0, 0, 1], [1, 1, 1, 1, 1]]
>>> x[..., 4, :2] = 0.5; dark_frame(x, 20 / 255).any().item()   # a bright corner: no frame
False
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dark_frame(x: torch.Tensor, level: float) -> torch.Tensor:
    """(B, H, W) True on an image's dark frame: the pixels of mean grey level at most ``level`` joined to
    the border through dark pixels, in images whose four corners all belong to it (the black field
    around the round aperture of a fundus camera, an endoscope or a microscope, possibly cut into corner
    pieces where the disc touches the edge; a letterbox on every side). Dark structures inside the
    image, and dark regions at part of the border only (the acoustic shadow at the edge of an
    ultrasound scan) are not a frame. A flood fill by repeated 3x3 dilation from the border."""
    b, _, h, w = x.shape
    dark = x.mean(1, keepdim=True) <= level
    corners = dark[:, 0, 0, 0] & dark[:, 0, 0, -1] & dark[:, 0, -1, 0] & dark[:, 0, -1, -1]
    if level <= 0 or not bool(corners.any()):
        return torch.zeros(b, h, w, dtype=torch.bool, device=x.device)
    border = torch.zeros_like(dark)
    border[..., 0, :] = border[..., -1, :] = True
    border[..., :, 0] = border[..., :, -1] = True
    region = (dark & border & corners.view(-1, 1, 1, 1)).float()
    dark_f = dark.float()
    for _ in range(h * w):  # at most one pixel added per round; stops when nothing grows
        grown = F.max_pool2d(region, 3, stride=1, padding=1) * dark_f
        if torch.equal(grown, region):
            break
        region = grown
    return region[:, 0] > 0
