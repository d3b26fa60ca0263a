"""Checkpoints of an unfinished fit, so that a killed fit goes on where it stopped.

A paper-preset fit runs for hours; ``Protector.fit(..., checkpoint_dir=DIR)`` saves the whole loop
state every ``checkpoint_every`` steps: surrogate weights and buffers, optimizer and scheduler,
the random generators, the data order and the method's own state (EM's class-wise noise). A fit
resumed from it runs the same remaining steps with the same random numbers, so it ends with the same
protector as an uninterrupted fit.

The file is written by process 0 through a temporary name and an atomic rename (a kill never leaves
half a checkpoint), loaded with ``torch.load(weights_only=True)`` (tensors and plain values only, no
pickled code), and deleted when the fit finishes. A checkpoint written by another configuration or
dataset is refused, not silently mixed in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

FILENAME = "fit-checkpoint.pt"


class FitCheckpoint:
    """One fit's checkpoint file in ``directory``; ``identity`` names what it belongs to."""

    def __init__(self, directory: str | os.PathLike, every: int, identity: dict[str, Any], rank: int = 0) -> None:
        if int(every) < 1:
            raise ValueError(f"checkpoint_every must be a positive number of steps, got {every}")
        self.path = Path(directory) / FILENAME
        self.every = int(every)
        self.identity = json.dumps(identity, sort_keys=True, default=str)
        self.rank = rank

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none yet."""
        if not self.path.is_file():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state.get("identity") != self.identity:
            raise ValueError(
                f"{self.path} is the checkpoint of a different fit (other options or data); "
                "delete it or use another checkpoint_dir"
            )
        return state

    def due(self, steps_done: int, total: int) -> bool:
        return steps_done % self.every == 0 and steps_done < total

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` (process 0 only; the others hold the same state)."""
        if self.rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({**state, "identity": self.identity}, tmp)
        os.replace(tmp, self.path)

    def remove(self) -> None:
        if self.rank == 0:
            self.path.unlink(missing_ok=True)
