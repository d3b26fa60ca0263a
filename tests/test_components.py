"""Small components against hand-computed values: metrics, batched crop/flip, column detection."""

import datasets
import numpy as np
import pytest
import torch

from uexamples.core.augment import SampleRandom, crop_flip
from uexamples.core.columns import detect_columns
from uexamples.evaluation.metrics import image_quality, psnr, ssim

pytestmark = pytest.mark.unit


def test_psnr_and_ssim_known_values():
    a = np.zeros((1, 16, 16))
    b = np.full((1, 16, 16), 0.1)
    assert psnr(a, b) == pytest.approx(20.0)  # 10*log10(1/0.01)
    assert psnr(a, a) == float("inf")
    assert ssim(a + 0.5, a + 0.5) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    x = rng.random((3, 32, 32))
    assert ssim(x, np.clip(x + rng.normal(0, 0.2, x.shape), 0, 1)) < ssim(x, np.clip(x + rng.normal(0, 0.02, x.shape), 0, 1)) < 1


def test_image_quality_levels():
    o = np.full((3, 4, 4), 100)
    p = o.copy()
    p[0, 0, 0] += 8
    q = image_quality(o, p)
    assert q["linf"] == 8 and q["changed_values"] == pytest.approx(1 / 48)


def test_crop_flip_matches_manual():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    offsets = torch.tensor([[0, 2], [1, 1]])
    flips = torch.tensor([False, True])
    out = crop_flip(x, offsets, flips, pad=1)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    assert torch.equal(out[0], padded[0, :, 0:4, 2:6])
    assert torch.equal(out[1], padded[1, :, 1:5, 1:5].flip(-1))


def test_sample_random_is_per_sample():
    a = SampleRandom([1, 2, 3]).rand(5)
    b = SampleRandom([3, 1]).rand(5)
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])


def test_detect_columns_integer_label_and_caption():
    feats = datasets.Features({"caption": datasets.Value("string"), "img": datasets.Image(), "labels": datasets.Value("int32")})
    cols = detect_columns(feats)
    assert (cols.image, cols.label, cols.text, cols.num_classes) == ("img", "labels", "caption", None)
