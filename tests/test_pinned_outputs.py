"""The protected pixels of SEM, EM, REM and CUDA, pinned by hash for small fixed configurations.

The hashes were recorded on the code before the protocol rework (issue 11) and must not move when
the layers under the methods change: a refactor that alters one random draw, one rounding or the
order of two steps changes them. Runs on one torch thread: float reductions of several threads may
add up in another order, and the pinned bytes are those of the single-threaded run.
"""

import hashlib

import numpy as np
import PIL.Image
import pytest
import torch

import uexamples as ue

from helpers import TINY_MINMIN

pytestmark = pytest.mark.unit

PINNED = {
    "sem": "9b4f8f46ba942eed",
    "em": "6a6617819a513327",
    "em-classwise": "cb199f1ca17b011f",
    "rem": "445bd298997afdef",
    "cuda-paper": "770b5ed747c3beaa",
    "cuda-fast": "6d400984ca6d3abc",
}

CASES = {
    "sem": lambda: ue.SEMProtect(seed=0, **TINY_MINMIN),
    "em": lambda: ue.EMProtect(seed=1, **TINY_MINMIN),
    "em-classwise": lambda: ue.EMProtect(seed=2, noise_type="class-wise", **TINY_MINMIN),
    "rem": lambda: ue.REMProtect(seed=3, **TINY_MINMIN),
    "cuda-paper": lambda: ue.CUDAProtect(key=123456789, allow_weak_key=True, preset="paper"),
    "cuda-fast": lambda: ue.CUDAProtect(key=987654321, allow_weak_key=True),
}


@pytest.fixture(scope="module")
def pinned_ds(sample_ds):
    """36 embedded images: a third RGB 32x32, a third grey (L), a third resized to 48x40 (noise resized)."""

    def vary(row, i):
        img = row["image"]
        if i % 3 == 1:
            img = img.convert("L")
        elif i % 3 == 2:
            img = img.resize((48, 40), PIL.Image.BICUBIC)
        return {"image": img}

    return sample_ds.select(range(36)).map(vary, with_indices=True)


def pixel_digest(ds) -> str:
    h = hashlib.sha256()
    for im in ds["image"]:
        h.update(f"{im.mode}{im.size}".encode())
        h.update(np.asarray(im).tobytes())
    return h.hexdigest()[:16]


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", sorted(CASES))
def test_protected_pixels_are_pinned(pinned_ds, one_thread, name):
    protector = CASES[name]().fit(pinned_ds, progress=False)
    protected = pinned_ds.map(protector, batched=True, load_from_cache_file=False)
    assert pixel_digest(protected) == PINNED[name]
