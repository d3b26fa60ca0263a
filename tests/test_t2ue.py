"""T2UE: noise generated from the caption alone (the T2UE issue)."""

import json

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from helpers import captioned, shared_dataset, tiny_clip_folder  # noqa: F401  (a fixture)

import uexamples as ue
from uexamples.core.images import NativeImage
from uexamples.surrogates.contrastive import contrastive_loss

TINY = dict(surrogate_epochs=1, epochs=2, train_batch_size=8, generator_width=4, resolution=32)


@pytest.fixture(scope="module")
def pairs():
    return captioned(16)


@pytest.fixture(scope="module")
def fitted(pairs):
    return ue.T2UEProtect(seed=5, **TINY).fit(pairs, progress=False)


@pytest.fixture(scope="module")
def mapped(pairs, fitted):
    return pairs.map(fitted, batched=True, batch_size=5)


def _pixels(ds):
    return [np.asarray(r["image"]).astype(int) for r in ds]


def _expected(image: PIL.Image.Image, noise: np.ndarray, protector) -> np.ndarray:
    """What map must store for ``image`` given the noise ``noise_for_texts`` returned (no image involved)."""
    nat = NativeImage.from_pil(image)
    return np.asarray(nat.to_pil(nat.color + noise, protector.bound_for(nat))).astype(int)


def test_map_adds_exactly_the_noise_of_the_caption_whatever_the_pixels(pairs, mapped, fitted):
    """Catches noise that reads the pixels: every stored image equals its original plus the noise
    ``noise_for_texts`` computes from the caption and size alone (grey rows with channels=1)."""
    for src, out in zip(pairs, mapped):
        img = src["image"]
        noise = fitted.noise_for_texts([src["caption"]], size=img.size, channels=1 if img.mode == "L" else 3)[0]
        assert noise.shape[1:] == (img.size[1], img.size[0])
        assert (_expected(img, noise, fitted) == np.asarray(out["image"]).astype(int)).all()


def test_two_different_images_with_one_caption_get_the_same_noise(fitted):
    rng = np.random.default_rng(1)
    a, b = (PIL.Image.fromarray(rng.integers(40, 215, (24, 32, 3), dtype=np.uint8)) for _ in range(2))
    ds = datasets.Dataset.from_dict({"image": [a, b], "caption": ["a red ball on grass"] * 2}).cast_column("image", datasets.Image())
    out = ds.map(fitted, batched=True)
    change = [np.asarray(o).astype(int) - np.asarray(i).astype(int) for o, i in zip(out["image"], (a, b))]
    assert (change[0] == change[1]).all() and np.abs(change[0]).max() > 0  # no clipping: mid-grey pixels
    other = fitted.noise_for_texts(["a blue dog jumps"], size=(32, 24))[0]
    same = fitted.noise_for_texts(["a red ball on grass"], size=(32, 24))[0]
    assert np.abs(other - same).max() > 1 / 255  # another caption, another noise


def test_bound_modes_sizes_and_captions_pass_through(pairs, mapped):
    assert mapped["caption"] == pairs["caption"] and mapped["id"] == pairs["id"]
    for a, b, ra, rb in zip(_pixels(pairs), _pixels(mapped), pairs, mapped):
        assert ra["image"].mode == rb["image"].mode and ra["image"].size == rb["image"].size
        assert np.abs(a - b).max() <= 8


def test_same_seed_same_bytes_whatever_the_batch_and_another_seed_differs(pairs, mapped):
    again = pairs.map(ue.T2UEProtect(seed=5, **TINY).fit(pairs, progress=False), batched=True, batch_size=16)
    assert all((a == b).all() for a, b in zip(_pixels(mapped), _pixels(again)))
    other = pairs.map(ue.T2UEProtect(seed=6, **TINY).fit(pairs, progress=False), batched=True)
    assert any((a != b).any() for a, b in zip(_pixels(mapped), _pixels(other)))


def test_save_load_reload_identical_and_only_the_text_side_is_saved(tmp_path, pairs, mapped, fitted):
    from safetensors.numpy import load_file

    fitted.save_pretrained(tmp_path / "p")
    names = load_file(str(tmp_path / "p" / "protector.safetensors"))
    assert any(k.startswith("generator.") for k in names) and any(k.startswith("surrogate.text") for k in names)
    assert not any("vision" in k or "visual" in k for k in names)  # the map never needs the image tower
    loaded = ue.Protector.from_pretrained(tmp_path / "p")
    assert isinstance(loaded, ue.T2UEProtect)
    again = pairs.map(loaded, batched=True, batch_size=3)
    assert all((a == b).all() for a, b in zip(_pixels(mapped), _pixels(again)))
    loaded.save_pretrained(tmp_path / "q")
    twice = pairs.map(ue.Protector.from_pretrained(tmp_path / "q"), batched=True)
    assert all((a == b).all() for a, b in zip(_pixels(mapped), _pixels(twice)))
    noise = ue.Protector.from_pretrained(tmp_path / "q").noise_for_texts(["a dog"], 20)
    assert np.array_equal(noise, fitted.noise_for_texts(["a dog"], 20))


def test_the_generated_noise_matches_images_to_their_captions_unlike_random_noise():
    """Catches a generator replaced by random noise of the same bound: against the frozen surrogate (the
    paper's objective), the generated noise must make real Flickr images match their own captions better,
    by a margin random noise does not come near."""
    ds = shared_dataset("flickr8k-1k").select(range(64))
    protector = ue.T2UEProtect(seed=0, objective="frozen", surrogate_epochs=10, epochs=30, lr=1e-2, train_batch_size=16,
                               generator_width=4, resolution=32).fit(ds, progress=False)  # fmt: skip
    from uexamples.core.loading import load_split

    x = load_split(ds, "image", 32).images
    noise = torch.from_numpy(protector.noise_for_texts(ds["caption"], 32))
    rnd = (torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 8 / 255
    model = protector._runtime["surrogate"].model.eval()
    text = protector._embed_captions(ds["caption"])

    def loss(images):
        with torch.no_grad():
            return float(contrastive_loss(model(images.clamp(0, 1)), text, model.scale))

    clean, generated, random = loss(x), loss(x + noise), loss(x + rnd)
    assert abs(random - clean) < 0.05 and generated < min(clean, random) - 0.15, (clean, generated, random)
    assert protector.fit_stats["final_loss"] < protector.fit_stats["first_loss"]


def test_needs_captions_and_a_fit(pairs):
    with pytest.raises(ue.ColumnError, match="needs captions"):
        ue.T2UEProtect(**TINY).fit(ue.load_sample_dataset().select(range(8)), progress=False)
    with pytest.raises(ue.NotFittedError):
        pairs.map(ue.T2UEProtect(**TINY), batched=True)
    with pytest.raises(ue.NotFittedError):
        ue.T2UEProtect(**TINY).noise_for_texts(["a dog"], 32)
    with pytest.raises(ValueError, match="native"):
        ue.T2UEProtect(resolution="native").fit(pairs, progress=False)


def test_captions_from_labels_class_wise_and_sample_wise():
    ds = ue.load_sample_dataset().select(range(40))
    names = ds.features["label"].names
    cw = ue.captions_from_labels(ds)
    assert cw["caption"] == [f"a photo of a {names[y]}." for y in ds["label"]]
    sw = ue.captions_from_labels(ds, sample_wise=True, seed=1)
    assert all(names[y] in c for c, y in zip(sw["caption"], ds["label"])) and len(set(sw["caption"])) > len(set(cw["caption"]))
    assert sw["caption"] == ue.captions_from_labels(ds, sample_wise=True, seed=1)["caption"]
    with pytest.raises(ValueError, match="template"):
        ue.captions_from_labels(ds, template="a photo")
    with pytest.raises(ValueError, match="names="):
        ue.captions_from_labels(ds.cast_column("label", datasets.Value("int64")))
    # a labelled dataset protected through its class names: one noise per class
    p = ue.T2UEProtect(seed=0, **TINY).fit(cw, progress=False)
    assert len({c for c in cw["caption"]}) == len(set(ds["label"]))
    n0, n1 = p.noise_for_texts([f"a photo of a {names[0]}.", f"a photo of a {names[1]}."], 32)
    assert np.abs(n0 - n1).max() > 0


def test_a_transformers_clip_saved_locally_is_the_frozen_surrogate(tmp_path, tiny_clip_folder, pairs):
    protector = ue.T2UEProtect(surrogate=tiny_clip_folder, seed=0, **TINY).fit(pairs, progress=False)
    assert protector.fit_stats["surrogate_seconds"] == 0  # a pretrained CLIP is used as it is
    out = pairs.map(protector, batched=True)
    protector.save_pretrained(tmp_path / "p")
    again = pairs.map(ue.Protector.from_pretrained(tmp_path / "p"), batched=True)
    assert all((a == b).all() for a, b in zip(_pixels(out), _pixels(again)))


@pytest.mark.integration
def test_cli_fits_once_and_protects_other_images_from_the_saved_protector(tmp_path, pairs):
    """Zero contact: one party fits and saves; another protects its own captioned images with no fit."""
    from uexamples.cards import render_card
    from uexamples.cli import main

    repo = tmp_path / "pairs"
    (repo / "data").mkdir(parents=True)
    pairs.to_parquet(str(repo / "data" / "train-00000-of-00001.parquet"))
    out = tmp_path / "out"
    assert main(["protect", "--dataset", str(repo), "--method", "t2ue", "--epochs", "1", "--surrogate-epochs", "1",
                 "--generator-width", "4", "--resolution", "32", "--output", str(out), "--quiet"]) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    card = render_card(summary, "me/pairs-protected", "cc-by-4.0")
    assert "Zero-contact" in card and "T2UE" in card and "captions in `caption` included (byte for byte" in card
    mine = tmp_path / "mine"
    (mine / "data").mkdir(parents=True)
    other = captioned(6, seed=9)
    other.to_parquet(str(mine / "data" / "train-00000-of-00001.parquet"))
    out2 = tmp_path / "out2"
    assert main(["protect", "--dataset", str(mine), "--protector", str(out / "protector"), "--output", str(out2), "--quiet"]) == 0
    protected = datasets.load_from_disk(str(out2 / "dataset"))
    loaded = ue.Protector.from_pretrained(out / "protector")
    for src, got in zip(other, protected):
        img = src["image"]
        noise = loaded.noise_for_texts([src["caption"]], img.size, channels=1 if img.mode == "L" else 3)[0]
        assert (_expected(img, noise, loaded) == np.asarray(got["image"]).astype(int)).all()
    assert json.loads((out2 / "summary.json").read_text())["fit_seconds"] == 0
    # hub_scripts/protect.py in a fresh process with the same saved protector: the same bytes, no fit
    import os
    import subprocess
    import sys

    from helpers import REPO

    script_out = tmp_path / "script"
    res = subprocess.run(
        [sys.executable, str(REPO / "hub_scripts" / "protect.py"), "--dataset", str(mine), "--protector",
         str(out / "protector"), "--output", str(script_out), "--quiet"],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    script_ds = datasets.load_from_disk(str(script_out / "dataset"))
    assert all((np.asarray(a["image"]) == np.asarray(b["image"])).all() for a, b in zip(script_ds, protected))
    assert json.loads((script_out / "summary.json").read_text())["method"] == "t2ue"


def test_fast_noise_grid_is_the_working_resolution_at_most_32_px(pairs):
    """The fast preset's noise-grid rule (measured: an 8 px grid left CIFAR-10 victims at 47.9 %, 32 px at
    25.4 %): noise at the working resolution, at most 32 px a side, recorded in the rules; an explicit
    noise_grid wins. Catches the cap ignored (a 64 px generator on the mixed-size pairs) or applied to a
    resolution below it."""
    quick = dict(seed=0, surrogate_epochs=1, epochs=1, train_batch_size=8, generator_width=4)

    def grid(p):
        return p._runtime["generator"].hparams["size"]

    mixed = ue.T2UEProtect(**quick).fit(pairs, progress=False)  # several sizes: the 64 px working grid
    assert grid(mixed) == 32 and mixed.rules["noise_grid"] == "32 px (the working resolution 64 px, at most noise_grid_cap=32)"
    small = ue.T2UEProtect(resolution=16, **quick).fit(pairs, progress=False)
    assert grid(small) == 16 and "noise_grid" not in small.rules
    assert grid(ue.T2UEProtect(noise_grid=8, **quick).fit(pairs, progress=False)) == 8
    assert ue.T2UEProtect(preset="paper").config.noise_grid_cap is None  # the paper: the working resolution


def test_fast_steps_follow_the_data_up_to_a_cap(pairs):
    """The fast preset's step rule (measured on CIFAR-10 class captions: 600 steps left the victim at 26-33 %,
    1800 at 20-24 %): 30 epochs, at most 1800 steps, recorded in the rules. Catches the cap ignored, the
    epochs ignored under the cap, or the rule not recorded."""
    fast = ue.T2UEProtect().config
    assert (fast.epochs, fast.max_steps) == (30, 1800)
    quick = dict(seed=0, surrogate_epochs=1, epochs=3, train_batch_size=8, generator_width=4, resolution=16)
    under = ue.T2UEProtect(**quick).fit(pairs, progress=False)  # 16 pairs, batches of 8: 3 epochs of 2 steps
    assert under.fit_stats["steps"] == 6 and under.rules["steps"] == "6 generator steps (3 epochs of 2)"
    capped = ue.T2UEProtect(max_steps=4, **quick).fit(pairs, progress=False)
    assert capped.fit_stats["steps"] == 4 and capped.rules["steps"] == "4 generator steps (max_steps; 3 epochs would be 6)"


def test_without_z_the_caption_start_tells_captions_apart_from_the_first_step(tmp_path, pairs):
    """Without z the generator's text modulation starts at zero, so a short fit gives every caption nearly the
    same noise; ``caption_start`` computes the 4x4 input from the caption instead. Catches the option ignored
    (a constant start), lost on save/load, or accepted beside a z."""
    quick = dict(seed=0, noise_dim=0, surrogate_epochs=1, epochs=1, train_batch_size=8, generator_width=4, resolution=16)

    def spread(p):
        noise = np.stack([p.noise_for_texts([c], size=(16, 16))[0] for c in pairs["caption"][:6]])
        return np.abs(noise[:, None] - noise[None, :]).max(axis=(2, 3, 4))[~np.eye(6, dtype=bool)].min()

    constant = ue.T2UEProtect(**quick).fit(pairs, progress=False)
    started = ue.T2UEProtect(caption_start=True, **quick).fit(pairs, progress=False)
    assert spread(started) > 5 * spread(constant)  # measured: 0.095 / 255 against 0.004 / 255 (all noise is small so early)
    started.save_pretrained(tmp_path / "p")
    again = ue.Protector.from_pretrained(tmp_path / "p")
    assert np.array_equal(again.noise_for_texts(["a red ball"], size=(16, 16)), started.noise_for_texts(["a red ball"], size=(16, 16)))
    with pytest.raises(ValueError, match="noise_dim=0"):
        ue.T2UEProtect(caption_start=True)
