"""The embedded sample dataset: 500 train + 100 test CIFAR-10 images (lossless PNG), works offline."""

from __future__ import annotations

from pathlib import Path

import datasets

SAMPLE_DIR = Path(__file__).parent / "cifar10_sample"


def load_sample_dataset(split: str = "train") -> datasets.Dataset:
    """Load the packaged CIFAR-10 sample (taken from the canonical test set, bit-exact).

    >>> ds = load_sample_dataset()
    >>> len(ds), ds.features["label"].num_classes
    (500, 10)
    """
    return datasets.load_dataset(str(SAMPLE_DIR), split=split)
