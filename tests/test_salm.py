"""SALM: error-minimizing noise on a sparse mask per image; everything outside the mask left bit-identical."""

import json
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

import uexamples as ue
from uexamples.core.images import NativeImage, bound_levels
from uexamples.evaluation import dataset_to_tensors
from uexamples.methods.salm import background_last, dark_frame, local_windows, top_pixels

from helpers import random_image, shared_dataset

pytestmark = pytest.mark.unit

TINY_SALM = dict(surrogate="tinycnn", train_steps=20, train_epochs=None, train_batch_size=64, noise_steps=3,
                 final_noise_steps=10, mask_ratio=0.2)  # fmt: skip


def levels(img) -> np.ndarray:
    return NativeImage.from_pil(img).levels.astype(np.int64)


@pytest.fixture(scope="module")
def scans():
    """120 real breast ultrasound scans (28 x 28, mode L)."""
    return shared_dataset("breastmnist").select(range(120))


@pytest.fixture(scope="module", params=["local", "saliency", "saliency-refresh", "intensity", "contrast"])
def fitted(request, scans):
    protector = ue.SALMProtect(seed=0, mask_rule=request.param, **TINY_SALM).fit(scans, progress=False)
    protected = scans.map(protector, batched=True, batch_size=50, load_from_cache_file=False)
    return protector, protected, protector.masks(scans)


def test_outside_the_mask_nothing_changes_and_the_ratio_holds(fitted, scans):
    protector, protected, masks = fitted
    count = round(0.2 * 28 * 28)
    changed_in_mask = 0
    for i, mask in enumerate(masks):
        assert mask.shape == (28, 28) and int(mask.sum()) == count  # exactly the ratio, every image
        out = protected[i]["image"]
        assert out.mode == "L" and out.size == (28, 28)  # one channel kept, native size
        diff = levels(out) - levels(scans[i]["image"])
        assert np.abs(diff).max() <= bound_levels(8 / 255, 255)  # the bound after rounding
        assert not diff[:, ~mask].any()  # bit-identical outside the mask
        changed_in_mask += int((diff != 0).any(0).sum())
    assert changed_in_mask > 0.5 * count * len(masks)  # the noise does use its mask


def test_masks_follow_their_rule(fitted, scans):
    protector, _, masks = fitted
    rule = protector.config.mask_rule
    x, y = dataset_to_tensors(scans, 28)
    if rule == "intensity":  # the brightest pixels
        for img, mask in zip(x[:, 0].numpy(), masks):
            assert img[mask].min() >= img[~mask].max()
    elif rule == "contrast":  # the pixels farthest from the image's median, on both sides of it
        median = [np.sort(img.ravel())[(img.size - 1) // 2] for img in x[:, 0].numpy()]  # torch's: the lower middle
        far = [np.abs(img - med) for img, med in zip(x[:, 0].numpy(), median)]
        assert all(f[m].min() >= f[~m].max() - 1e-6 for f, m in zip(far, masks))
        below = np.mean([(img[m] < med).mean() for img, m, med in zip(x[:, 0].numpy(), masks, median)])
        assert 0.05 < below < 0.95  # dark and bright pixels both enter (intensity's masks: none below the median)
    elif rule in ("saliency", "local"):  # drawn from where the surrogate's loss is most sensitive
        sal = protector.saliency(protector._model().eval(), x, y).numpy()
        inside = np.mean([s[m].mean() for s, m in zip(sal, masks)])
        outside = np.mean([s[~m].mean() for s, m in zip(sal, masks)])
        assert inside > (3 if rule == "saliency" else 1.5) * outside  # random masks: 1 (measured 2.4 for local)
        if rule == "saliency":
            assert all(s[m].min() >= s[~m].max() - 1e-9 for s, m in zip(sal, masks))
        else:  # windows, not scattered pixels: few connected patches
            patches = [ndimage.label(m)[1] for m in masks]
            assert np.mean(patches) < 0.15 * round(0.2 * 28 * 28)


def test_noise_minimises_the_surrogate_loss_better_than_random_noise_on_the_same_mask(fitted, scans):
    protector, protected, masks = fitted
    x, y = dataset_to_tensors(scans, 28)
    px, _ = dataset_to_tensors(protected, 28)
    g = torch.Generator().manual_seed(0)
    m = torch.from_numpy(np.stack(masks))[:, None].float()
    rand = ((x + (torch.randint(0, 2, x.shape, generator=g) * 2 - 1) * 8 / 255 * m).clamp(0, 1) * 255).round() / 255
    model = protector._model().eval()
    with torch.no_grad():
        loss_protected = F.cross_entropy(model(px), y).item()
        loss_random = F.cross_entropy(model(rand), y).item()
    # random noise on the mask gives about 1, error-maximising noise more. Measured with this 20-step fit: 0.30-0.87
    # over the rules, fit seeds 0-1 and persistent_noise on/off (AMD EPYC, 2026-12-04); an earlier machine gave
    # 0.65-0.85: the short fit amplifies the CPU's floating-point differences, hence no tighter limit
    assert loss_protected < 0.92 * loss_random, (loss_protected, loss_random)


def test_same_seed_same_bytes_and_save_load_gives_identical_output(scans, tmp_path):
    ds = scans.select(range(40))

    def run(seed):
        p = ue.SALMProtect(seed=seed, **TINY_SALM).fit(ds, progress=False)
        out = ds.map(p, batched=True, load_from_cache_file=False).cast_column("image", datasets.Image(decode=False))
        return p, [r["bytes"] for r in out["image"]]

    p, first = run(5)
    assert run(5)[1] == first and run(6)[1] != first
    p.save_pretrained(tmp_path / "salm")
    loaded = ue.Protector.from_pretrained(tmp_path / "salm")
    again = ds.map(loaded, batched=True, load_from_cache_file=False).cast_column("image", datasets.Image(decode=False))
    assert [r["bytes"] for r in again["image"]] == first
    assert json.loads((tmp_path / "salm" / "protector_config.json").read_text())["config"]["mask_rule"] == "intensity"


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "I;16", "CMYK"])
def test_every_mode_and_size_keeps_the_bound_and_the_rest_of_the_image(mode, sample_ds):
    protector = ue.SALMProtect(seed=0, **TINY_SALM).fit(sample_ds.select(range(64)), progress=False)
    images = [random_image(mode, size, seed=s) for s, size in enumerate([(32, 32), (17, 40), (64, 23)])]
    ds = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2]}, features=datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}))  # fmt: skip
    out = ds.map(protector, batched=True, load_from_cache_file=False)
    masks = protector.masks(ds)
    maxval = 65535 if mode == "I;16" else 255
    for i in range(len(ds)):
        assert out[i]["image"].mode == mode and out[i]["image"].size == ds[i]["image"].size
        diff = levels(out[i]["image"]) - levels(ds[i]["image"])
        assert 0 < np.abs(diff).max() <= bound_levels(8 / 255, maxval)
        w, h = ds[i]["image"].size
        assert masks[i].shape == (h, w) and int(masks[i].sum()) == round(0.2 * w * h)
        if mode != "P":  # a palette colour is shared by pixels in and out of the mask: documented exception
            assert not diff[:, ~masks[i]].any()


def test_top_pixels_and_local_windows_take_exactly_count():
    scores = torch.rand(3, 9, 11, generator=torch.Generator().manual_seed(0))
    for count in (1, 7, 50, 99):
        assert top_pixels(scores, count).sum((1, 2, 3)).tolist() == [count] * 3
        win = local_windows(scores, count, 3)
        assert win.sum((1, 2, 3)).tolist() == [count] * 3
    best = scores.reshape(3, -1).argmax(1)
    assert all(win.reshape(3, -1)[i, best[i]] == 1 for i in range(3))  # the first window is at the peak


def test_a_dark_frame_around_the_image_ranks_last_and_other_dark_regions_do_not():
    x = torch.full((3, 1, 12, 12), 0.6)
    x[0, :, :2, :] = 0.0  # image 0: a frame on every side (a letterbox) ...
    x[0, :, -2:, :] = 0.05
    x[0, :, :, :1] = x[0, :, :, -1:] = 0.0
    x[0, :, 5:8, 5:8] = 0.0  # ... and a dark blob inside (a cyst): not frame
    x[1, :, :3, :] = 0.0  # image 1: dark along the top edge only (an acoustic shadow): no frame
    x[2] = 0.0  # image 2: a round bright disc touching the top and bottom edges: the corner pieces are frame
    yy, xx = torch.meshgrid(torch.arange(12.0), torch.arange(12.0), indexing="ij")
    disc = (yy - 5.5) ** 2 + (xx - 5.5) ** 2 <= 6.2**2
    x[2, :, disc] = 0.6
    frame = dark_frame(x, 20 / 255)
    expected0 = torch.zeros(12, 12, dtype=torch.bool)
    expected0[:2, :] = expected0[-2:, :] = True
    expected0[:, 0] = expected0[:, -1] = True
    assert torch.equal(frame[0], expected0)
    assert not frame[1].any()
    assert torch.equal(frame[2], ~disc)
    assert not dark_frame(x, 0).any()  # level 0: off
    scores = torch.rand(3, 12, 12, generator=torch.Generator().manual_seed(1))
    scores[0, 0, :] = 10.0  # the most salient pixels are on the frame
    count = int((~frame[0]).sum())  # exactly the inside of image 0
    mask = top_pixels(background_last(scores, frame), count)[:, 0] > 0
    assert not (mask[0] & frame[0]).any()  # the inside first, however salient the frame
    more = top_pixels(background_last(scores, frame), count + 3)[:, 0] > 0
    assert int((more[0] & frame[0]).sum()) == 3 and bool(more[0, 0, :3].all())  # then the most salient frame pixels
    assert torch.equal(mask[1], top_pixels(scores, count)[1, 0] > 0)  # no frame: the plain rule
    win = local_windows(background_last(scores, frame), 30, 3, frame)[:, 0] > 0
    assert not (win[0] & frame[0]).any() and int(win[0].sum()) == 30  # windows stay off the frame too


def test_the_fundus_frame_is_kept_out_of_real_masks():
    retina = shared_dataset("retinamnist").select(range(64))
    x, y = dataset_to_tensors(retina, 28)
    frame = dark_frame(x, 20 / 255)
    assert frame.any((1, 2)).float().mean() > 0.8  # most fundus images have one
    # the saliency masks reach into the frame (the intensity masks of the presets, the brightest pixels, do not)
    salient = dict(TINY_SALM, mask_rule="saliency-refresh", persistent_noise=False)
    protector = ue.SALMProtect(seed=0, frame_level=20 / 255, **salient).fit(retina, progress=False)
    masks = torch.from_numpy(np.stack(protector.masks(retina)))
    assert not (masks & frame).any()  # the frame leaves more than the mask's 20 % inside
    plain = ue.SALMProtect(seed=0, **salient).fit(retina, progress=False)  # no frame rule
    on_frame = (torch.from_numpy(np.stack(plain.masks(retina))) & frame).sum() / masks.sum()
    assert on_frame > 0.2  # without the rule, the saliency masks do reach into the frame


def test_bad_options_and_mixed_sizes_at_native_resolution(sample_ds):
    for bad in (dict(mask_ratio=0), dict(mask_ratio=1.5), dict(mask_rule="random"), dict(window=2)):
        with pytest.raises(ValueError):
            ue.SALMProtect(**bad)
    mixed = datasets.Dataset.from_dict(
        {"image": [random_image("RGB", (32, 32), 0), random_image("RGB", (30, 30), 1)], "label": [0, 1]})
    with pytest.raises(ValueError, match="resolution"):
        ue.SALMProtect(**TINY_SALM).fit(mixed, progress=False)


def test_fit_length_follows_the_dataset_size(scans):
    p = ue.SALMProtect(seed=0)  # fast preset: 30 epochs, at least 20 steps, at most 400
    assert p.planned_train_steps(546) == 128 and p.planned_train_steps(20_000) == 400
    assert p.planned_train_steps(50_000) == 938  # 400 steps are one epoch of 50,000: raised to 2.4 epochs
    assert p.planned_train_steps(20) == 30  # a batch smaller than 128: one step per epoch
    assert ue.SALMProtect(train_epochs=2).planned_train_steps(300) == 20  # the floor
    small = ue.SALMProtect(seed=0, train_epochs=2, min_train_steps=2, train_batch_size=64, final_noise_steps=1)
    small.fit(scans, progress=False)
    assert small.fit_stats["planned_steps"] == 4 and small.fit_stats["steps"] == 4


@pytest.mark.integration
def test_cli_protects_with_salm_and_the_card_names_the_mask(tmp_path, grey_sample_repo):
    out = tmp_path / "salm"
    cmd = [sys.executable, "-m", "uexamples.cli", "protect", "--dataset", str(grey_sample_repo), "--method", "salm",
           "--train-steps", "3", "--mask-ratio", "0.1", "--output", str(out), "--quiet"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["linf_levels"] <= 8 and summary["changed_pixels"] <= 0.1 + 1e-9
    ds = datasets.load_from_disk(str(out / "dataset"))
    assert ds[0]["image"].mode == "L"
    from uexamples.cards import render_card

    card = render_card(summary, "someone/protected-scans", license="cc-by-4.0")
    assert "SALM" in card and "sun2024medical" in card and "10 % of each image's pixels" in card
