"""Surrogates: transformers models by local folder (tiny random ViT / CLIP), any nn.Module, offline errors."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import uexamples as ue
import uexamples.surrogates
from uexamples.surrogates import PixelSpaceModel, SurrogateNotAvailable, build_surrogate

from helpers import TINY_MINMIN, tiny_clip, tiny_vit  # noqa: F401  (fixtures)

pytestmark = pytest.mark.unit

FAST = {k: v for k, v in TINY_MINMIN.items() if k != "surrogate"}


def test_vit_surrogate_pixel_space(tiny_vit):
    model, desc = build_surrogate(tiny_vit, num_classes=10)
    assert isinstance(model, PixelSpaceModel) and desc["own_head"] and desc["size"] == [32, 32]
    assert desc["mean"] == [0.5, 0.4, 0.3]
    x = torch.rand(2, 3, 20, 28, requires_grad=True)  # any size: resized in torch, differentiably
    out = model(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_clip_vision_tower_gets_a_head(tiny_clip):
    model, desc = build_surrogate(tiny_clip, num_classes=4)
    assert desc["class"] == "CLIPVisionModel" and not desc["own_head"] and desc["size"] == [48, 48]
    assert model(torch.rand(3, 3, 48, 48)).shape == (3, 4)


@pytest.mark.parametrize("which", ["vit", "clip"])
def test_sem_with_transformers_surrogate_end_to_end(which, tiny_vit, tiny_clip, small_ds, tmp_path):
    path = tiny_vit if which == "vit" else tiny_clip
    prot = ue.SEMProtect(surrogate=path, seed=0, **FAST).fit(small_ds, progress=False)
    assert prot.working_resolution() == (32 if which == "vit" else 48)
    out = small_ds.map(prot, batched=True, load_from_cache_file=False)
    d = np.abs(np.stack([np.asarray(i, int) for i in out["image"]]) - np.stack([np.asarray(i, int) for i in small_ds["image"]]))
    assert 0 < d.max() <= 8
    prot.save_pretrained(tmp_path / "p")
    loaded = ue.Protector.from_pretrained(tmp_path / "p")  # rebuilt offline from the saved description
    again = small_ds.map(loaded, batched=True, load_from_cache_file=False)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(out["image"], again["image"]))


def test_any_torch_module(small_ds, tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 10))
    prot = ue.EMProtect(surrogate=net, seed=0, **FAST).fit(small_ds, progress=False)
    out = small_ds.map(prot, batched=True, load_from_cache_file=False)
    prot.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="custom torch.nn.Module"):
        ue.Protector.from_pretrained(tmp_path / "m")
    fresh = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 10))
    loaded = ue.Protector.from_pretrained(tmp_path / "m", surrogate=fresh)
    again = small_ds.map(loaded, batched=True, load_from_cache_file=False)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(out["image"], again["image"]))


def test_offline_missing_model_is_clear_error(tmp_path):
    code = (
        "import uexamples as ue\n"
        "from uexamples.surrogates import SurrogateNotAvailable\n"
        "try:\n"
        "    ue.surrogates.build_surrogate('someone/not-a-model', 10)\n"
        "except SurrogateNotAvailable as e:\n"
        "    print('ERR', e)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "ERR" in out.stdout and "someone/not-a-model" in out.stdout and "HF_HUB_OFFLINE" in out.stdout


def test_unknown_surrogate_name():
    with pytest.raises(ValueError, match="unknown surrogate"):
        build_surrogate("resnet9000", 10)
    assert SurrogateNotAvailable.__mro__[1] is OSError


# ---------------------------------------------------------------- the shared surrogate layer: encoders
@pytest.fixture(scope="module")
def tiny_clip_with_tokenizer(tmp_path_factory, tiny_clip):
    """The tiny CLIP plus a character-level CLIP tokenizer written from a vocab (no download)."""
    import json
    import shutil

    from transformers import CLIPTokenizer

    path = tmp_path_factory.mktemp("clip-tok")
    shutil.copytree(tiny_clip, path, dirs_exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": 26 + i for i, c in enumerate(letters)})
    vocab.update({"<|startoftext|>": 52, "<|endoftext|>": 53})
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt")).save_pretrained(path)
    config = json.loads((path / "config.json").read_text())  # CLIP pools text at the end-of-text token: its id
    config["text_config"].update(bos_token_id=52, eos_token_id=53, pad_token_id=53)
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def test_clip_encoder_gives_image_and_text_features_in_one_space(tiny_clip_with_tokenizer):
    from transformers import CLIPModel

    enc = ue.surrogates.load_encoder(tiny_clip_with_tokenizer)
    assert enc.has_text and enc.input_size == 48
    x = torch.rand(2, 3, 32, 32, requires_grad=True)  # resized to 48 inside, differentiably
    feats = enc.encode_images(x)
    assert feats.shape == (2, 16)  # projection_dim: the joint space
    feats.sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in enc.parameters())  # frozen
    texts = enc.encode_texts(["a cat", "a dog"])
    assert texts.shape == (2, 16) and not torch.allclose(texts[0], texts[1])
    # the same numbers as transformers' own CLIPModel on normalised pixels
    ref = CLIPModel.from_pretrained(tiny_clip_with_tokenizer).eval()
    pix = torch.nn.functional.interpolate(x.detach(), size=(48, 48), mode="bilinear", align_corners=False, antialias=True)
    out = ref.get_image_features(pixel_values=(pix - 0.5) / 0.5)
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    assert torch.allclose(out, feats.detach(), atol=1e-5)


def test_vit_encoder_pooled_features_and_no_text(tiny_vit):
    enc = ue.surrogates.load_encoder(tiny_vit)
    assert enc.input_size == 32 and not enc.has_text
    assert enc(torch.rand(3, 3, 32, 32)).shape == (3, 32)
    with pytest.raises(ValueError, match="no text tower"):
        enc.encode_texts(["a cat"])


def test_pretrained_cifar_resnet_is_a_builtin_feature_encoder(sample_ds):
    from helpers import SHARED

    weights = SHARED / "models" / "cifar10-resnet" / "resnet20.safetensors"
    if not weights.is_file():
        pytest.skip(f"{weights} is not available")
    enc = ue.surrogates.load_encoder(str(weights))
    assert enc.desc["kind"] == "cifar-resnet" and enc.desc["depth"] == 20
    ds = sample_ds.select(range(200))
    x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255) for im in ds["image"]])
    with torch.no_grad():
        feats = enc(x)
        accuracy = (enc.backbone.linear(feats).argmax(1).numpy() == np.array(ds["label"])).mean()
    assert feats.shape == (200, 64)
    assert accuracy > 0.8  # the real pretrained weights (91.7 % on the test set), not a random net
    with pytest.raises(ValueError, match="several weight files"):
        ue.surrogates.load_encoder(str(weights.parent))
    again = ue.surrogates.rebuild_encoder(enc.desc)  # what a method does after unpickling
    with torch.no_grad():
        assert torch.equal(again(x[:4]), feats[:4])


def test_classifier_surrogate_round_trip():
    from uexamples.surrogates import Surrogate

    torch.manual_seed(0)
    s = Surrogate.build("tinycnn", num_classes=3)
    again = Surrogate.rebuild(s.desc, s.state_arrays())
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(s(x), again(x)) and s.input_size is None


# ---------------------------------------------------------------- noise resolution is a setting
def test_native_resolution_and_resample(small_ds):
    import PIL.Image

    big = small_ds.select(range(6)).map(lambda r: {"image": r["image"].resize((64, 48), PIL.Image.BICUBIC)})
    fitted = ue.SEMProtect(seed=0, resolution="native", **FAST).fit(big, progress=False)
    assert fitted.working_resolution() is None
    native = big.map(fitted, batched=True, load_from_cache_file=False)
    grid = big.map(ue.SEMProtect(seed=0, **FAST).fit(big, progress=False), batched=True, load_from_cache_file=False)
    d_native = np.stack([np.asarray(a, int) - np.asarray(b, int) for a, b in zip(native["image"], big["image"])])
    d_grid = np.stack([np.asarray(a, int) - np.asarray(b, int) for a, b in zip(grid["image"], big["image"])])
    assert np.abs(d_native).max() <= 8 and np.abs(d_grid).max() <= 8
    # noise computed at 32 px and resized bilinearly is smooth; native noise changes from pixel to pixel
    roughness = lambda d: np.abs(np.diff(d, axis=2)).mean()  # noqa: E731
    assert roughness(d_native) > 1.5 * roughness(d_grid)
    nearest = big.map(ue.SEMProtect(seed=0, resample="nearest", **FAST).fit(big, progress=False), batched=True,
                      load_from_cache_file=False)  # fmt: skip
    d_near = np.stack([np.asarray(a, int) - np.asarray(b, int) for a, b in zip(nearest["image"], big["image"])])
    assert not np.array_equal(d_near, d_grid) and np.abs(d_near).max() <= 8
    with pytest.raises(ValueError, match="resolution"):
        ue.SEMProtect(resolution="huge")
    with pytest.raises(ValueError, match="resample"):
        ue.SEMProtect(resample="lanczos")


def test_surrogate_width_builds_saves_and_reloads(small_ds, tmp_path):
    """surrogate_width sets the built-in net's width; a saved protector rebuilds that width (a load that fell
    back to the net's own width would fail on the weights' shapes) and maps to the same bytes; a width on a
    net that has none, or a bad value, is an error."""
    from uexamples.surrogates import Surrogate

    assert Surrogate.build("tinycnn", 2, width=4).model.classifier.in_features == 16  # 4 * width
    with pytest.raises(ValueError, match="built-in nets"):
        build_surrogate("resnet20", 10, width=8)
    with pytest.raises(ValueError, match="surrogate_width"):
        ue.SEMProtect(surrogate="resnet20", surrogate_width=8)
    for bad in ("classes", 0, True):
        with pytest.raises(ValueError, match="surrogate_width"):
            ue.SEMProtect(surrogate_width=bad)
    prot = ue.EMProtect(seed=0, surrogate_width=6, **FAST, surrogate="tinycnn").fit(small_ds, progress=False)
    assert prot._runtime["surrogate"].desc["width"] == 6
    prot.save_pretrained(tmp_path / "w")
    loaded = ue.Protector.from_pretrained(tmp_path / "w")
    assert loaded._runtime["surrogate"].desc["width"] == 6
    out, again = (small_ds.map(p, batched=True, load_from_cache_file=False) for p in (prot, loaded))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(out["image"], again["image"]))


def test_clean_uniform_weight_makes_the_surrogate_blind_to_clean_images(small_ds):
    """With clean_uniform_weight the surrogate learns to answer uniformly on the clean images: its entropy on
    them rises towards log(classes); a model phase that ignored the option (or pushed the clean images
    towards their labels) would leave the clean entropy as low as without it."""
    from uexamples.evaluation import dataset_to_tensors

    settings = dict(FAST, surrogate="tinycnn", train_steps=30, seed=0)
    x, _ = dataset_to_tensors(small_ds, 32)
    entropy = {}
    for weight in (0.0, 1.0):
        prot = ue.EMProtect(clean_uniform_weight=weight, **settings).fit(small_ds, progress=False)
        with torch.no_grad():
            p = prot._model().eval()(x).softmax(-1)
        entropy[weight] = float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean())
    assert entropy[1.0] > entropy[0.0] + 0.5, entropy  # measured 1.71 against 0.85 (log 10 = 2.30)
    with pytest.raises(ValueError, match="clean_uniform_weight"):
        ue.EMProtect(clean_uniform_weight=-1)


def test_clean_target_one_class_teaches_the_surrogate_one_class_for_every_clean_image(small_ds, tmp_path):
    """clean_target='one-class': the surrogate learns the seeded class for every clean image (most clean images
    go to it; a loss that ignored the option would leave them uniform or at their labels), the class is recorded
    as a rule and survives save/load with the same bytes; refused without the weight and without labels."""
    from uexamples.evaluation import dataset_to_tensors

    settings = dict(FAST, surrogate="tinycnn", train_steps=30, seed=0, clean_uniform_weight=1.0)
    x, _ = dataset_to_tensors(small_ds, 32)
    prot = ue.EMProtect(clean_target="one-class", **settings).fit(small_ds, progress=False)
    target = prot.clean_class()
    assert 0 <= target < prot.num_classes
    assert f"class index {target}" in prot.rules["clean_target"]
    drawn = set()
    for seed in range(5):  # the seed draws it
        other = ue.EMProtect(clean_target="one-class", **dict(settings, seed=seed))
        other.num_classes = prot.num_classes
        drawn.add(other.clean_class())
    assert len(drawn) > 1, drawn
    uniform = ue.EMProtect(**settings).fit(small_ds, progress=False)
    with torch.no_grad():
        share = float((prot._model().eval()(x).argmax(-1) == target).float().mean())
        share_uniform = float((uniform._model().eval()(x).argmax(-1) == target).float().mean())
    assert share > 0.8 and share > share_uniform + 0.3, (share, share_uniform)  # measured 0.88 against 0.08
    prot.save_pretrained(tmp_path / "one")
    loaded = ue.Protector.from_pretrained(tmp_path / "one")
    assert loaded.clean_class() == target
    out, again = (small_ds.map(p, batched=True, load_from_cache_file=False) for p in (prot, loaded))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(out["image"], again["image"]))
    with pytest.raises(ValueError, match="clean_uniform_weight > 0"):
        ue.SEMProtect(clean_target="one-class", clean_uniform_weight=0.0)
    # SEM's preset teaches one class; switching its clean loss off switches off what it teaches
    assert ue.SEMProtect().config.clean_target == "one-class"
    assert ue.SEMProtect(clean_uniform_weight=0.0).config.clean_target == "uniform"
    with pytest.raises(ValueError, match="clean_target must be one of"):
        ue.SEMProtect(clean_target="one")
    with pytest.raises(ValueError, match="needs class labels"):
        ue.MEMProtect(clean_target="one-class", clean_uniform_weight=1.0)


def test_clean_uniform_weight_blinds_contrastive_learners_to_clean_pairs():
    """The contrastive counterpart (MEM's surrogate, T2UE's joint learner): with the option the learner finds the
    clean images about as close to every caption as to their own (cross-entropy to uniform near its floor, log 16);
    a learner that ignored the option matches clean pairs (far above it)."""
    from helpers import captioned

    from uexamples.core.batch import caption_of
    from uexamples.core.loading import load_split
    from uexamples.surrogates.contrastive import encode_captions, uniform_contrastive_loss

    pairs = captioned(16)
    x = load_split(pairs, "image", 32).images
    captions = [caption_of(v, i) for i, v in enumerate(pairs["caption"])]
    makers = {
        "mem": (lambda w: ue.MEMProtect(seed=0, train_steps=30, train_batch_size=8, noise_steps=2, eot_draws=1,
                                        final_noise_steps=1, final_eot_draws=1, map_negatives=16, resolution=32,
                                        clean_uniform_weight=w), lambda p: p._model()),  # fmt: skip
        "t2ue": (lambda w: ue.T2UEProtect(seed=0, surrogate_epochs=1, epochs=15, train_batch_size=8, generator_width=4,
                                          resolution=32, clean_uniform_weight=w), lambda p: p._runtime["learner"]),  # fmt: skip
    }
    for name, (make, learner_of) in makers.items():
        blind = {}
        for weight in (0.0, 1.0):
            prot = make(weight).fit(pairs, progress=False)
            model = learner_of(prot)
            ids = encode_captions(prot._runtime["surrogate"].tokenizer, captions, 5)
            with torch.no_grad():
                blind[weight] = float(uniform_contrastive_loss(model(x), model.encode_text(ids), model.scale))
        # measured: MEM 7.12 against 2.86, T2UE 5.56 against 2.98 (floor log 16 = 2.77)
        assert blind[1.0] < 3.3 < 4.5 < blind[0.0], (name, blind)
    with pytest.raises(ValueError, match="objective='joint'"):
        ue.T2UEProtect(objective="frozen", clean_uniform_weight=1.0)


def test_decoy_class_keeps_random_noise_on_one_class(small_ds, tmp_path):
    """decoy_class: the drawn class's images keep their uniform random start (it does not depend on the surrogate:
    two fits of different length give those rows the same bytes, while every other class's noise differs, as an
    engine that optimised the decoy rows too would make them differ); the class is recorded as a rule, the noise
    stays in the bound, save/load gives the same bytes; refused without labels and for class-wise EM."""
    settings = dict(FAST, surrogate="tinycnn", seed=0, decoy_class=True)
    short, long = (ue.SEMProtect(**dict(settings, train_steps=n)).fit(small_ds, progress=False) for n in (4, 12))
    decoy = short.clean_class()
    assert long.clean_class() == decoy and f"class index {decoy}" in short.rules["decoy_class"]
    labels = np.asarray(small_ds["label"])
    assert 0 < (labels == decoy).sum() < len(labels)
    a, b = (small_ds.map(p, batched=True, load_from_cache_file=False)["image"] for p in (short, long))
    orig = [np.asarray(im, dtype=np.int16) for im in small_ds["image"]]
    same = np.array([np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(a, b)])
    assert same[labels == decoy].all()
    assert not same[labels != decoy].any()
    for im, o in zip(a, orig):
        d = np.abs(np.asarray(im, dtype=np.int16) - o)
        assert d.max() <= 8
    # the decoy rows are random noise: changed pixels spread over the bound's levels, not the optimised +-8 of a sign step
    decoy_levels = np.concatenate([(np.asarray(im, dtype=np.int16) - o).ravel() for im, o, l in zip(a, orig, labels) if l == decoy])
    assert (np.abs(decoy_levels) < 8).mean() > 0.5
    assert any("decoy class" in n for n in ue.SEMProtect.card_notes(short.public_config()))
    assert not any("decoy class" in n for n in ue.SEMProtect.card_notes(ue.SEMProtect(decoy_class=False).public_config()))
    short.save_pretrained(tmp_path / "decoy")
    again = small_ds.map(ue.Protector.from_pretrained(tmp_path / "decoy"), batched=True, load_from_cache_file=False)["image"]
    assert all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(a, again))
    # drawn among the classes the fit images hold: a set with two of its label's ten classes gets one of those two
    two = small_ds.filter(lambda row: row["label"] in (1, 2))
    drawn = {ue.SEMProtect(**dict(settings, train_steps=1, seed=s)).fit(two, progress=False).clean_class() for s in range(6)}
    assert drawn == {1, 2}, drawn
    with pytest.raises(ValueError, match="at least two classes"):
        ue.SEMProtect(**dict(settings, train_steps=1)).fit(small_ds.filter(lambda row: row["label"] == 1), progress=False)
    with pytest.raises(ValueError, match="needs class labels"):
        ue.MEMProtect(decoy_class=True)
    with pytest.raises(ValueError, match="sample-wise"):
        ue.EMProtect(noise_type="class-wise", decoy_class=True)
