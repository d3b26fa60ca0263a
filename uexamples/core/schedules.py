"""Learning-rate schedules shared by the surrogates that train and the victims."""

from __future__ import annotations

import math
from typing import Callable


def warmup_cosine(total_steps: int, warmup: float = 0.25) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up over the first 25 % of the steps, then cosine to zero."""
    warm = max(1, int(warmup * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total_steps - warm))))

    return factor
