"""Data parallelism for fits and maps: which process computes which rows.

One process is the special case ``world == 1``. The fit splits every global batch into
``shards`` equal parts (the batch-norm batches); process ``r`` computes shards
``r*k .. (r+1)*k - 1`` (``k = shards / world``) and DDP (through ``Accelerator.prepare``) sums the
gradients. All processes draw the random numbers of the *global* batch from the same seeded
generator and keep their rows, so a fit with the same ``shards`` gives the same surrogate on 1, 2
or ``shards`` processes (up to floating-point summation order).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn as nn


class DataParallel:
    """The view of one process; ``DataParallel()`` is a single process."""

    def __init__(self, accelerator: Any = None, shards: int = 1) -> None:
        self.accelerator = accelerator
        self.world = int(accelerator.num_processes) if accelerator is not None else 1
        self.rank = int(accelerator.process_index) if accelerator is not None else 0
        if shards < 1 or shards % self.world:
            raise ValueError(
                f"fit_shards={shards} must be a positive multiple of the number of processes ({self.world}); "
                "use the same fit_shards on every machine size to get the same result"
            )
        self.shards = shards

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def local_rows(self, batch: int) -> slice:
        """This process's contiguous rows of a global batch of ``batch`` rows."""
        if batch % self.shards:
            raise ValueError(f"the fit batch ({batch}) must be divisible by fit_shards ({self.shards})")
        per = batch // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def local_shards(self, batch: int) -> list[tuple[int, slice]]:
        """(global shard index, rows within this process's part) of each local shard."""
        size = batch // self.shards
        k = self.shards // self.world
        return [(self.rank * k + j, slice(j * size, (j + 1) * size)) for j in range(k)]

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        """(the module to train through, the optimizer, the bare module)."""
        if not self.distributed:
            return model, optimizer, model
        wrapped, opt = self.accelerator.prepare(model, optimizer)
        return wrapped, opt, self.accelerator.unwrap_model(wrapped)

    def no_sync(self, wrapped: nn.Module, last: bool):
        """Skip DDP's gradient all-reduce on all but the last local shard (gradient accumulation)."""
        if self.distributed and not last:
            return self.accelerator.no_sync(wrapped)
        return contextlib.nullcontext()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return t
        t = t.clone()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every process's ``t`` (same shape on each), concatenated in process order along the first axis:
        a global batch back from the processes' contiguous rows."""
        if not self.distributed:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        torch.distributed.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Batch-norm running statistics from process 0 to all (only shard 0 updates them)."""
        if self.distributed:
            for buf in model.buffers():
                torch.distributed.broadcast(buf.data, src=0)
