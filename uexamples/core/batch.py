"""What a method receives for one batch: images, and whatever else the dataset has.

>>> import numpy as np, PIL.Image
>>> from uexamples.core.images import NativeImage
>>> img = NativeImage.from_pil(PIL.Image.new("RGB", (4, 4)))
>>> b = ProtectBatch(images=[img, img], labels=[0, 1], texts=["a cat", ["a dog", "a pup"]], rows=[7, 8], seed=0)
>>> sub = b[1:]
>>> sub.rows, sub.labels, sub.texts, len(sub)
([8], [1], [['a dog', 'a pup']], 1)
>>> b.keys[0] == b.keys[1]   # the same pixels and seed give the same key
True
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Union

import numpy as np

from .images import NativeImage

Caption = Union[str, list]  # a string, or a list of strings (several captions per image)


def sample_key(native: NativeImage, seed: int) -> int:
    """A 63-bit key from the image content and the seed: per-sample randomness that does not depend on
    the batch an image lands in, its position, or the number of processes."""
    h = hashlib.blake2b(digest_size=8)
    h.update(str(seed).encode())
    h.update(str(native.levels.shape).encode())
    h.update(np.ascontiguousarray(native.levels).tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


@dataclass
class ProtectBatch:
    """One batch as a method sees it.

    images: the decoded images at their own size and mode (``NativeImage``).
    labels: integer class labels, when the dataset has a label column (else None).
    texts: the caption of each row (a string or a list of strings), when it has a caption column.
    rows: the dataset row of each image when known (``map(with_indices=True)``, ``apply``), for errors.
    seed: the protector's seed; ``keys`` are the per-sample random keys derived from it and the
    pixels (computed on first use, so methods that need no randomness pay nothing).
    """

    images: list[NativeImage]
    labels: list[int] | None = None
    texts: list[Caption] | None = None
    rows: list[int | None] = field(default_factory=list)
    seed: int = 0
    _keys: list[int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.rows:
            self.rows = [None] * len(self.images)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def keys(self) -> list[int]:
        if self._keys is None:
            self._keys = [sample_key(img, self.seed) for img in self.images]
        return self._keys

    def __getitem__(self, part: slice) -> "ProtectBatch":
        if not isinstance(part, slice):
            raise TypeError("index a ProtectBatch with a slice (batch[a:b]) or use .select([...])")
        return self.select(range(len(self))[part])

    def select(self, indices) -> "ProtectBatch":
        """The rows ``indices`` of this batch, keys included when already computed."""
        idx = list(indices)
        pick = lambda seq: None if seq is None else [seq[i] for i in idx]  # noqa: E731
        return ProtectBatch(images=pick(self.images), labels=pick(self.labels), texts=pick(self.texts),
                            rows=pick(self.rows), seed=self.seed, _keys=pick(self._keys))  # fmt: skip


def at_row(row: int | None) -> str:
    """' at row N' for error messages (empty when the row is unknown)."""
    return f" at row {row}" if row is not None else ""


def caption_of(value, row: int | None = None) -> Caption:
    """Check one caption cell: a string or a list of strings; the error names the row."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"the caption{at_row(row)} is {value!r}: expected a string or a non-empty list of strings")
