"""UC (Unlearnable Clusters): label-free fit and map, cluster-wise noise that does what the paper's
objective says, save/load, transformers encoders, every image mode."""

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import uexamples as ue
from uexamples.core.images import NativeImage, bound_levels
from uexamples.core.loading import load_split
from uexamples.methods.uc import PerturbationGenerator, kmeans, nearest

from helpers import random_image, tiny_clip, tiny_vit  # noqa: F401  (fixtures)

pytestmark = pytest.mark.unit

TINY_UC = dict(clusters=4, epochs=3, train_batch_size=32, optimiser="direct")  # the paper's objective, quickly


@pytest.fixture(scope="module")
def unlabelled(sample_ds):
    return sample_ds.select(range(200)).remove_columns("label")


@pytest.fixture(scope="module")
def fitted_uc(unlabelled):
    return ue.UCProtect(seed=0, **TINY_UC).fit(unlabelled, progress=False)


def levels(img) -> np.ndarray:
    return NativeImage.from_pil(img).levels.astype(np.int64)


def test_no_label_column_needed_and_noise_is_one_per_cluster(fitted_uc, unlabelled):
    assert not ue.UCProtect.needs_labels
    out = unlabelled.map(fitted_uc, batched=True, batch_size=64, load_from_cache_file=False)
    assert out.features == unlabelled.features
    clusters = fitted_uc.clusters_of(unlabelled)
    assert sorted(set(clusters.tolist())) == [0, 1, 2, 3]
    assert fitted_uc.fit_stats["cluster_sizes"] == np.bincount(clusters, minlength=4).tolist()
    diffs = np.stack([levels(out[i]["image"]) - levels(unlabelled[i]["image"]) for i in range(len(out))])
    assert np.abs(diffs).max() <= bound_levels(8 / 255, 255) and np.abs(diffs).max() > 0
    # cluster-wise: images of one cluster carry the same noise (up to clipping at 0/255 and rounding), other
    # clusters' noise differs: sample-wise or random noise of the same bound fails this
    deltas = fitted_uc._runtime["deltas"].numpy() * 255  # (K, 3, H, W) in levels, like levels()
    for i in range(len(out)):
        x = levels(unlabelled[i]["image"])
        inside = (x > 8) & (x < 247)
        own = np.abs(diffs[i] - deltas[clusters[i]])[inside].max()
        other = np.abs(diffs[i] - deltas[(clusters[i] + 1) % 4])[inside].mean()
        assert own <= 0.5 + 1e-3 and other > 1.0


def test_perturbation_moves_features_towards_the_next_cluster(fitted_uc, unlabelled):
    """The paper's objective: KL(softmax(c_{k+1}) || softmax(h(x + delta_k))) is lower with the fitted delta
    than without it and than with a random perturbation of the same bound."""

    x = load_split(unlabelled, "image", 32).images
    clusters = torch.from_numpy(fitted_uc.clusters_of(unlabelled))
    centers, deltas = fitted_uc._runtime["centers"], fitted_uc._runtime["deltas"]
    enc = fitted_uc.encoder()
    goal = F.softmax(centers[(clusters + 1) % 4], 1)
    rand = (torch.rand(4, *deltas.shape[1:], generator=torch.Generator().manual_seed(1)) * 2 - 1) * 8 / 255

    def kl(noise):
        with torch.no_grad():
            return float(F.kl_div(F.log_softmax(enc((x + noise[clusters]).clamp(0, 1)), 1), goal, reduction="batchmean"))

    assert kl(deltas) < 0.9 * kl(torch.zeros_like(deltas)) and kl(deltas) < 0.9 * kl(rand)


def test_same_seed_same_bytes_other_seed_other_bytes(unlabelled):
    ds = unlabelled.select(range(60))

    def run(seed):
        uc = ue.UCProtect(seed=seed, **TINY_UC).fit(ds, progress=False)
        out = ds.map(uc, batched=True, load_from_cache_file=False).cast_column("image", datasets.Image(decode=False))
        return [r["bytes"] for r in out["image"]]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_saved_and_reloaded_assigns_the_same_clusters_and_bytes(fitted_uc, unlabelled, sample_ds, tmp_path):
    fitted_uc.save_pretrained(tmp_path / "uc")
    loaded = ue.Protector.from_pretrained(tmp_path / "uc")
    assert isinstance(loaded, ue.UCProtect) and loaded.fingerprint == fitted_uc.fingerprint
    later = sample_ds.select(range(300, 400))  # images the fit never saw land in the same clusters
    assert np.array_equal(loaded.clusters_of(later), fitted_uc.clusters_of(later))
    a = later.map(fitted_uc, batched=True, load_from_cache_file=False)
    b = later.map(loaded, batched=True, load_from_cache_file=False)
    assert all(np.array_equal(np.asarray(p), np.asarray(q)) for p, q in zip(a["image"], b["image"]))
    saved = (tmp_path / "uc" / "protector_config.json").read_text()
    assert "uexamples/cifar-resnet20" in saved  # the encoder by name, not by this machine's path


@pytest.mark.parametrize("which", ["vit", "clip"])
def test_transformers_encoders_end_to_end(which, tiny_vit, tiny_clip, unlabelled, tmp_path):  # noqa: F811
    path = tiny_vit if which == "vit" else tiny_clip
    ds = unlabelled.select(range(40))
    uc = ue.UCProtect(seed=0, encoder=path, clusters=3, min_min_steps=3).fit(ds, progress=False)
    assert uc.working_resolution() == (32 if which == "vit" else 48)  # the encoder's input size
    out = ds.map(uc, batched=True, load_from_cache_file=False)
    diff = np.abs(np.asarray(out[0]["image"], dtype=int) - np.asarray(ds[0]["image"], dtype=int))
    assert 0 < diff.max() <= 8 and out[0]["image"].size == (32, 32)
    uc.save_pretrained(tmp_path / which)
    loaded = ue.Protector.from_pretrained(tmp_path / which)
    assert np.array_equal(loaded.clusters_of(ds), uc.clusters_of(ds))


def test_generator_optimiser_and_training_on_all_images(unlabelled):
    ds = unlabelled.select(range(48))
    uc = ue.UCProtect(seed=0, clusters=2, optimiser="generator", train_on="all", epochs=1, train_batch_size=48,
                      generator_width=8).fit(ds, progress=False)  # fmt: skip
    deltas = uc._runtime["deltas"]
    assert deltas.shape == (2, 3, 32, 32) and 0 < float(deltas.abs().max()) <= 8 / 255 + 1e-7
    assert not torch.equal(deltas[0], deltas[1])
    g = PerturbationGenerator(width=8)
    assert g(torch.rand(1, 3, 32, 32)).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "I;16", "CMYK"])
def test_bound_after_rounding_for_every_mode(mode, fitted_uc):
    images = [random_image(mode, size, seed=s) for s, size in enumerate([(32, 32), (17, 40), (64, 23)])]
    ds = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
    out = ds.map(fitted_uc, batched=True, load_from_cache_file=False)
    maxval = 65535 if mode == "I;16" else 255
    for i in range(len(ds)):
        assert out[i]["image"].mode == mode and out[i]["image"].size == ds[i]["image"].size
        diff = np.abs(levels(out[i]["image"]) - levels(ds[i]["image"]))
        assert 0 < diff.max() <= bound_levels(8 / 255, maxval)


def test_kmeans_and_nearest_agree():
    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.normal(c, 0.1, size=(30, 2)) for c in ((0, 0), (5, 5), (0, 5))]).astype(np.float32)
    centers = kmeans(pts, 3, seed=0, restarts=2)
    assign = nearest(torch.from_numpy(pts), torch.from_numpy(centers)).numpy()
    assert sorted(np.bincount(assign).tolist()) == [30, 30, 30]


def test_bad_options_are_refused(unlabelled):
    with pytest.raises(ValueError, match="clusters must be >= 2"):
        ue.UCProtect(clusters=1)
    with pytest.raises(ValueError, match="optimiser"):
        ue.UCProtect(optimiser="adam")
    with pytest.raises(ValueError, match="native"):
        ue.UCProtect(resolution="native")
    with pytest.raises(ValueError, match="cannot form 50 clusters"):
        ue.UCProtect(clusters=50).fit(unlabelled.select(range(20)), progress=False)
    with pytest.raises(ue.NotFittedError):
        ue.UCProtect().clusters_of(unlabelled)


@pytest.mark.integration
def test_cli_protects_an_unlabelled_repo_and_the_card_says_what_was_done(unlabelled, tmp_path):
    from uexamples.cards import render_card
    from uexamples.cli import main

    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    unlabelled.select(range(80)).to_parquet(str(repo / "data" / "train-00000-of-00001.parquet"))
    (repo / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n\n# 80 unlabelled images\n")
    out = tmp_path / "out"
    assert main(["protect", "--dataset", str(repo), "--method", "uc", "--clusters", "3", "--min-min-steps", "3",
                 "--output", str(out), "--quiet"]) == 0  # fmt: skip
    summary = __import__("json").loads((out / "summary.json").read_text())
    assert summary["method"] == "uc" and summary["images"] == 80 and 0 < summary["linf_levels"] <= 8
    card = render_card(summary, "someone/protected", license="cc-by-4.0")
    assert "Label-agnostic" in card and "`uexamples/cifar-resnet20`" in card and "zhang2023unlearnable" in card
    assert str(tmp_path) not in card


def test_any_torch_module_as_encoder(unlabelled, tmp_path):
    ds = unlabelled.select(range(40))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten())  # fmt: skip
    uc = ue.UCProtect(seed=0, encoder=net, clusters=3, min_min_steps=3).fit(ds, progress=False)
    assert uc.config.encoder == "module"  # the module itself is never saved
    uc.save_pretrained(tmp_path / "uc")
    with pytest.raises(ValueError, match="pass an instance again"):
        ue.Protector.from_pretrained(tmp_path / "uc").clusters_of(ds)
    loaded = ue.Protector.from_pretrained(tmp_path / "uc", encoder=net)
    assert np.array_equal(loaded.clusters_of(ds), uc.clusters_of(ds))


def test_min_min_optimiser_uses_the_clusters_as_labels(unlabelled):
    """optimiser="min-min": EM's class-wise engine with the clusters as the label source (no label column read)."""
    ds = unlabelled.select(range(64))
    uc = ue.UCProtect(seed=0, clusters=3, optimiser="min-min", min_min_steps=3).fit(ds, progress=False)
    deltas = uc._runtime["deltas"]
    assert deltas.shape == (3, 3, 32, 32) and 0 < float(deltas.abs().max()) <= 8 / 255 + 1e-7
    out = ds.map(uc, batched=True, load_from_cache_file=False)
    clusters = uc.clusters_of(ds)
    d0 = np.asarray(out[0]["image"], dtype=int) - np.asarray(ds[0]["image"], dtype=int)
    same = next(i for i in range(1, 64) if clusters[i] == clusters[0])
    d1 = np.asarray(out[same]["image"], dtype=int) - np.asarray(ds[same]["image"], dtype=int)
    x0, x1 = np.asarray(ds[0]["image"], dtype=int), np.asarray(ds[same]["image"], dtype=int)
    inside = (x0 > 8) & (x0 < 247) & (x1 > 8) & (x1 < 247)
    assert np.abs(d0 - d1)[inside].max() <= 1  # one noise per cluster


def test_spherical_clustering_option(unlabelled):
    """normalize_features=True clusters directions: centres are means of unit vectors (norm <= 1) while raw
    ResNet features are far longer; saved and reloaded, the assignment is the same."""
    ds = unlabelled.select(range(80))
    raw = ue.UCProtect(seed=0, clusters=3, min_min_steps=3, normalize_features=False).fit(ds, progress=False)
    sph = ue.UCProtect(seed=0, clusters=3, min_min_steps=3, normalize_features=True).fit(ds, progress=False)
    assert float(sph._runtime["centers"].norm(dim=1).max()) <= 1 + 1e-5 < float(raw._runtime["centers"].norm(dim=1).min())
    feats = F.normalize(sph.encode(load_split(ds, "image", 32).images), dim=1)
    assert np.array_equal(sph.clusters_of(ds), nearest(feats, sph._runtime["centers"]).numpy())
