"""Image-quality metrics of a protected image against its original, at the stored pixels."""

from __future__ import annotations

from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from ..core.images import NativeImage, load_pil
from ..core.progress import progress_bar


def psnr(a: np.ndarray, b: np.ndarray, maxval: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical images)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(maxval**2 / mse)


def _gaussian_1d(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    return g / g.sum()


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The 2-D Gaussian window as two 1-D passes ('valid'): 2k taps instead of k^2 (a 12-Mpixel photo in
    seconds rather than minutes)."""
    k = g.numel()
    x = F.conv2d(x, g.view(1, 1, 1, k))
    return F.conv2d(x, g.view(1, 1, k, 1))


def ssim(a: np.ndarray, b: np.ndarray, maxval: float = 1.0) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1=0.01, K2=0.03) over channels.

    a, b: (C, H, W) arrays in [0, maxval]. Images smaller than the window use a window of their size.
    """
    x = torch.as_tensor(np.asarray(a, np.float64))[:, None]
    y = torch.as_tensor(np.asarray(b, np.float64))[:, None]
    size = min(11, x.shape[-1], x.shape[-2])
    win = _gaussian_1d(size)
    c1, c2 = (0.01 * maxval) ** 2, (0.03 * maxval) ** 2
    mu_x, mu_y = _blur(x, win), _blur(y, win)
    sxx = _blur(x * x, win) - mu_x**2
    syy = _blur(y * y, win) - mu_y**2
    sxy = _blur(x * y, win) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return float(s.mean())


def recall_per_class(y_true: np.ndarray, y_pred: np.ndarray, classes) -> list[float | None]:
    """For each class of ``classes`` the share of its images predicted as it; None for a class with no image in
    ``y_true``.

    >>> recall_per_class(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), range(3))
    [0.5, 1.0, None]
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return [float((y_pred[y_true == c] == c).mean()) if (y_true == c).any() else None for c in classes]


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true``: 1/C for a constant guess whatever the class
    balance (plain accuracy gives the majority rate, 73 % on BreastMNIST, to a victim that learnt nothing).

    >>> balanced_accuracy(np.array([0, 0, 0, 1]), np.array([0, 0, 0, 0]))
    0.5
    """
    recalls = recall_per_class(y_true, y_pred, np.unique(y_true))  # every class present: no None
    return float(np.mean(recalls)) if recalls else float("nan")


def macro_auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Area under the ROC curve, one-vs-rest and macro-averaged over the classes present in ``y_true``
    (two classes: the AUC of the positive class). 0.5 for scores unrelated to the label. NaN with one class.

    >>> round(macro_auc(np.array([0, 1, 1, 0]), np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.3, 0.7]])), 3)
    0.75
    """
    from sklearn.metrics import roc_auc_score

    y_true, probs = np.asarray(y_true), np.asarray(probs, np.float64)
    present = np.unique(y_true)
    if len(present) < 2:
        return float("nan")
    # one-vs-rest per present class: classes absent from the test set have no defined AUC
    return float(np.mean([roc_auc_score(y_true == c, probs[:, c]) for c in present]))


def image_quality(original: np.ndarray, protected: np.ndarray, maxval: int = 255) -> dict[str, float]:
    """Quality of one protected image against its original, both integer level arrays (C, H, W).

    linf: largest change in levels; l2: Euclidean norm of the change in [0, 1] units; psnr, ssim;
    changed_values: fraction of (pixel, channel) values changed; changed_pixels: fraction of pixels
    with at least one channel changed.

    >>> o = np.zeros((3, 2, 2), np.uint8); p = o.copy(); p[0, 0, 0] = 3; p[1, 0, 0] = 4
    >>> q = image_quality(o, p)
    >>> q["linf"], round(q["l2"] * 255, 6), q["changed_values"], q["changed_pixels"]
    (4, 5.0, 0.16666666666666666, 0.25)
    """
    o = np.asarray(original, np.int64)
    p = np.asarray(protected, np.int64)
    diff = np.abs(p - o)
    return {
        "linf": int(diff.max(initial=0)),
        "l2": float(np.sqrt(np.sum((diff / maxval) ** 2))),
        "psnr": psnr(o / maxval, p / maxval),
        "ssim": ssim(o / maxval, p / maxval),
        "changed_values": float((diff > 0).mean()),
        "changed_pixels": float((diff > 0).any(axis=0).mean()),
    }


class QualityMeter:
    """Image quality of protected images against their originals, added pair by pair (a stream needs no second pass).

    L-inf is taken over every pair; the other metrics are means over the first ``limit`` pairs (all when
    None). PSNR averages the finite values (an unchanged image has infinite PSNR).
    """

    def __init__(self, limit: int | None = 2000) -> None:
        self.limit = limit
        self.linf = 0
        self.rows: list[dict[str, float]] = []
        self.count = 0

    def add(self, original_cell: Any, protected_cell: Any, row: int | None = None) -> None:
        o = NativeImage.from_pil(load_pil(original_cell, row=row), row=row)
        p = NativeImage.from_pil(load_pil(protected_cell, row=row), row=row)
        lo, lp = o.levels, p.levels  # for P images: the shown colours, not palette indices
        if lo.shape != lp.shape:
            raise ValueError(f"row {row}: protected image {lp.shape} and original {lo.shape} differ in size")
        if self.limit is None or self.count < self.limit:
            q = image_quality(lo, lp, o.maxval)
            q["linf_255"] = q["linf"] * 255 / o.maxval
            self.rows.append(q)
            self.linf = max(self.linf, q["linf"])
        else:
            self.linf = max(self.linf, int(np.abs(lo.astype(np.int64) - lp).max(initial=0)))
        self.count += 1

    def result(self) -> dict[str, float]:
        rows = self.rows
        finite = [r["psnr"] for r in rows if np.isfinite(r["psnr"])]

        def mean(key: str, default: float) -> float:
            return float(np.mean([r[key] for r in rows])) if rows else default

        return {
            "linf_levels": self.linf,
            "mean_l2": mean("l2", 0.0),
            "mean_psnr": float(np.mean(finite)) if finite else float("inf"),
            "mean_ssim": mean("ssim", 1.0),
            "changed_pixels": mean("changed_pixels", 0.0),
            "changed_values": mean("changed_values", 0.0),
            "quality_images": len(rows),
        }


def dataset_quality(
    original: datasets.Dataset, protected: datasets.Dataset, image_column: str, limit: int | None = 2000,
    progress: bool = False,
) -> dict[str, float]:
    """Image quality of a protected split against its original, row by row at the stored pixels
    (:class:`QualityMeter` over the aligned rows)."""
    if len(original) != len(protected):
        raise ValueError(f"the protected set has {len(protected)} rows and the original {len(original)}: they must align")
    raw_o = original.cast_column(image_column, datasets.Image(decode=False))
    raw_p = protected.cast_column(image_column, datasets.Image(decode=False))
    meter = QualityMeter(limit)
    bar = progress_bar(total=len(raw_o), desc="Measuring image quality", unit="img", progress=progress)
    for start in range(0, len(raw_o), 500):
        cells_o = raw_o[start : start + 500][image_column]
        cells_p = raw_p[start : start + 500][image_column]
        for i, (co, cp) in enumerate(zip(cells_o, cells_p)):
            meter.add(co, cp, row=start + i)
        bar.update(len(cells_o))
    bar.close()
    return meter.result()
