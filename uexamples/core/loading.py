"""Decode a dataset split into working-resolution tensors, in chunks, naming the row of a bad image.

Shared by the min-min engine's fit and by victim training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import datasets
import numpy as np
import torch

from .additive import to_working
from .batch import sample_key
from .images import NativeImage, load_pil, upright_size
from .progress import progress_bar


@dataclass
class SplitTensors:
    """(N, 3, R, R) images in [0, 1], the (N,) grey mask, the labels and the per-sample keys (None when not asked for)."""

    images: torch.Tensor
    grey: torch.Tensor
    labels: torch.Tensor | None
    keys: torch.Tensor | None = None


def load_split(
    dataset: datasets.Dataset,
    image_column: str,
    resolution: int,
    label_column: str | None = None,
    indices: Sequence[int] | None = None,
    progress: bool = False,
    desc: str = "Loading images",
    chunk: int = 512,
    keys_seed: int | None = None,
) -> SplitTensors:
    """Decode ``dataset[indices]`` (all rows by default) at ``resolution``; images are read as raw bytes
    so that a corrupt one is reported with its row number. ``keys_seed``: also each image's
    :func:`~uexamples.core.batch.sample_key` (from the same decode)."""
    idx = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)
    raw = dataset.cast_column(image_column, datasets.Image(decode=False))
    xs, greys, ys, keys = [], [], [], []
    bar = progress_bar(total=len(idx), desc=desc, unit="img", progress=progress)
    for start in range(0, len(idx), chunk):
        rows_idx = idx[start : start + chunk]
        rows = raw[rows_idx.tolist()]
        natives = [NativeImage.from_pil(load_pil(c, row=int(r)), row=int(r)) for c, r in zip(rows[image_column], rows_idx)]
        if keys_seed is not None:
            keys += [sample_key(n, keys_seed) for n in natives]
        x, grey = to_working(natives, resolution)
        if xs and x.shape[2:] != xs[0].shape[2:]:  # native resolution: every chunk must share one size
            raise ValueError(f"native resolution needs images of one size, got {tuple(xs[0].shape[2:])} and "
                             f"{tuple(x.shape[2:])} (near row {int(rows_idx[0])}); set resolution=N")  # fmt: skip
        xs.append(x)
        greys.append(grey)
        if label_column is not None:
            ys.append(torch.tensor(rows[label_column], dtype=torch.long))
        bar.update(len(rows_idx))
    bar.close()
    if not xs:
        return SplitTensors(torch.empty(0, 3, resolution, resolution), torch.empty(0, dtype=torch.bool),
                            torch.empty(0, dtype=torch.long) if label_column else None)  # fmt: skip
    return SplitTensors(torch.cat(xs), torch.cat(greys), torch.cat(ys) if label_column is not None else None,
                        torch.tensor(keys, dtype=torch.int64) if keys_seed is not None else None)  # fmt: skip


def one_small_size(sizes: set[tuple[int, int]], limit: int) -> tuple[tuple[int, int] | None, str]:
    """The presets' resolution rule: ``((w, h), why)`` when every image has one size of at most ``limit``
    pixels a side (work it natively), else ``(None, why)`` (work it on a grid)."""
    if len(sizes) == 1 and max(next(iter(sizes))) <= int(limit):
        (w, h), = sizes
        return (w, h), f"every fit image is {w}x{h}, at most native_up_to={limit} px"
    return None, f"{len(sizes)} image sizes" if len(sizes) > 1 else f"images larger than native_up_to={limit} px"


def image_sizes(dataset: datasets.Dataset, image_column: str, indices: Sequence[int] | None = None,
                chunk: int = 2048) -> set[tuple[int, int]]:  # fmt: skip
    """The distinct (width, height) of ``dataset[indices]``, read from the file headers (nothing decoded)."""
    idx = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)
    raw = dataset.cast_column(image_column, datasets.Image(decode=False))
    sizes: set[tuple[int, int]] = set()
    for start in range(0, len(idx), chunk):
        rows_idx = idx[start : start + chunk]
        for cell, row in zip(raw[rows_idx.tolist()][image_column], rows_idx):
            sizes.add(upright_size(cell, row=int(row)))
    return sizes
