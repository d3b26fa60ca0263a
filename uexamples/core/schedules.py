"""Learning-rate schedules shared by the surrogates that train and the victims."""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch


def warmup_cosine(total_steps: int, warmup: float = 0.25) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up over the first 25 % of the steps, then cosine to zero."""
    warm = max(1, int(warmup * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total_steps - warm))))

    return factor


def step_plan(n: int, batch_size: int, epochs: int, max_steps: int | None = None) -> tuple[int, int, int]:
    """(batch size, steps per epoch, total steps) of a training on ``n`` samples: full batches only (a
    contrastive batch of 3 is a different task), ``epochs`` passes, at most ``max_steps`` steps."""
    bs = min(batch_size, n)
    per_epoch = max(1, n // bs)
    total = epochs * per_epoch if max_steps is None else min(epochs * per_epoch, max_steps)
    return bs, per_epoch, total


def shuffled_epochs(n: int, bs: int, per_epoch: int, total: int, generator: torch.Generator) -> Iterator[Iterator[torch.Tensor]]:
    """The batches of a :func:`step_plan`, one iterator of index tensors per epoch; each epoch draws its
    permutation from ``generator`` when it starts (after the previous epoch's steps drew theirs)."""
    for epoch in range(math.ceil(total / per_epoch)):
        order = torch.randperm(n, generator=generator)
        yield (order[s * bs : (s + 1) * bs] for s in range(min(per_epoch, total - epoch * per_epoch)))
