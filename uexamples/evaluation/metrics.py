"""Image-quality metrics of a protected image against its original, at the stored pixels."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def psnr(a: np.ndarray, b: np.ndarray, maxval: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical images)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(maxval**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a: np.ndarray, b: np.ndarray, maxval: float = 1.0) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1=0.01, K2=0.03) over channels.

    a, b: (C, H, W) arrays in [0, maxval]. Images smaller than the window use a window of their size.
    """
    x = torch.as_tensor(np.asarray(a, np.float64))[:, None]
    y = torch.as_tensor(np.asarray(b, np.float64))[:, None]
    size = min(11, x.shape[-1], x.shape[-2])
    win = _gaussian_window(size)
    c1, c2 = (0.01 * maxval) ** 2, (0.03 * maxval) ** 2
    mu_x, mu_y = F.conv2d(x, win), F.conv2d(y, win)
    sxx = F.conv2d(x * x, win) - mu_x**2
    syy = F.conv2d(y * y, win) - mu_y**2
    sxy = F.conv2d(x * y, win) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return float(s.mean())


def image_quality(original: np.ndarray, protected: np.ndarray, maxval: int = 255) -> dict[str, float]:
    """L-inf (in levels), PSNR, SSIM and the fraction of changed values of two integer level arrays (C, H, W)."""
    o = np.asarray(original, np.int64)
    p = np.asarray(protected, np.int64)
    diff = np.abs(p - o)
    return {
        "linf": int(diff.max(initial=0)),
        "psnr": psnr(o / maxval, p / maxval),
        "ssim": ssim(o / maxval, p / maxval),
        "changed": float((diff > 0).mean()),
    }
