"""Batched, differentiable augmentations and per-sample randomness.

The expectation over transformations (EOT) of EM/REM/SEM and victim training both need random
crop-with-padding and horizontal flips for a whole batch at once: one gather, no Python loop.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


class BatchRandom:
    """Random draws for a batch from one generator (fit: one seeded stream).

    With ``rows``, every draw is made for the whole global batch and only those rows are kept: the
    processes of a data-parallel fit then consume the same stream and agree on every number.
    """

    def __init__(self, generator: torch.Generator, batch: int, rows: slice | None = None) -> None:
        self.g = generator
        self.global_batch = batch
        self.rows = rows or slice(0, batch)
        self.batch = len(range(batch)[self.rows])

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand((self.global_batch, *shape), generator=self.g)[self.rows]

    def randint(self, high: int, *shape: int) -> torch.Tensor:
        return torch.randint(0, high, (self.global_batch, *shape), generator=self.g)[self.rows]


class SampleRandom:
    """Random draws from one generator per sample, keyed by the sample's content.

    An image then gets the same noise whatever batch it lands in, whatever the batch size or the
    number of processes. Each generator fills a buffer of uniforms in large blocks (one call per
    sample per block, not per draw: per-call overhead was 6 % of SEM's map time); draws are served
    from the buffers, so a sample's stream depends only on its key and the sequence of requests.
    """

    block = 32768  # uniforms per refill and sample (128 KiB)

    def __init__(self, keys: Sequence[int]) -> None:
        self.gens = [torch.Generator().manual_seed(int(k)) for k in keys]
        self.batch = len(self.gens)
        self._buffer = torch.empty(self.batch, 0)
        self._pos = 0

    def _uniform(self, count: int) -> torch.Tensor:
        if self._pos + count > self._buffer.shape[1]:
            size = max(count, self.block)
            self._buffer = torch.stack([torch.rand(size, generator=g) for g in self.gens])
            self._pos = 0
        out = self._buffer[:, self._pos : self._pos + count]
        self._pos += count
        return out

    def rand(self, *shape: int) -> torch.Tensor:
        return self._uniform(math.prod(shape)).reshape(self.batch, *shape)

    def randint(self, high: int, *shape: int) -> torch.Tensor:
        u = self._uniform(math.prod(shape)).reshape(self.batch, *shape)
        return (u * high).long().clamp_(max=high - 1)


def crop_flip(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int) -> torch.Tensor:
    """Random crop after zero padding by ``pad`` plus horizontal flip, for a whole batch.

    x: (N, C, H, W); offsets: (N, 2) integers in [0, 2*pad]; flips: (N,) bool.
    Differentiable with respect to ``x`` (the backward is a scatter-add).
    """
    n, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad)) if pad else x
    wp = w + 2 * pad
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = offsets[:, 0:1].to(x.device) + ar_h  # (N, H)
    cols_fwd = ar_w.expand(n, w)
    cols = torch.where(flips.to(x.device)[:, None], w - 1 - cols_fwd, cols_fwd) + offsets[:, 1:2].to(x.device)
    flat_index = (rows[:, :, None] * wp + cols[:, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
    out = torch.gather(xp.reshape(n, c, -1), 2, flat_index)
    return out.reshape(n, c, h, w)


def random_crop_flip(x: torch.Tensor, rnd, pad: int | None = None) -> torch.Tensor:
    """``crop_flip`` with offsets and flips drawn from ``rnd`` (BatchRandom or SampleRandom of size N).

    For x of shape (J*B, ...) with a random source of size B, draws J sets per sample.
    """
    n, _, h, _ = x.shape
    pad = max(1, h // 8) if pad is None else pad
    draws = n // rnd.batch
    offsets = rnd.randint(2 * pad + 1, draws, 2)  # (B, J, 2)
    flips = rnd.randint(2, draws) == 1  # (B, J)
    # the batch is laid out draw-major: (J, B) -> (J*B)
    offsets = offsets.transpose(0, 1).reshape(n, 2)
    flips = flips.transpose(0, 1).reshape(n)
    return crop_flip(x, offsets, flips, pad)
