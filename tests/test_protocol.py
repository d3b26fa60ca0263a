"""The datasets.map protocol: columns, fit, determinism, fingerprints, save/load, bad input."""

import io
import json
import pickle
import subprocess
import sys
import textwrap

import datasets
import numpy as np
import PIL.Image
import pytest

import uexamples as ue
from uexamples.core.columns import ColumnError

from helpers import TINY_MINMIN

pytestmark = pytest.mark.unit


def pixels(ds):
    return np.stack([np.asarray(im, dtype=np.int64) for im in ds["image"]])


def png_bytes(ds):
    raw = ds.cast_column("image", datasets.Image(decode=False))
    return [c["bytes"] for c in raw["image"]]


@pytest.fixture(scope="module")
def sem(small_ds):
    return ue.SEMProtect(seed=0, **TINY_MINMIN).fit(small_ds, progress=False)


# ---------------------------------------------------------------- determinism
def test_same_seed_same_bytes(small_ds, sem):
    again = ue.SEMProtect(seed=0, **TINY_MINMIN).fit(small_ds, progress=False)
    a = small_ds.map(sem, batched=True, load_from_cache_file=False)
    b = small_ds.map(again, batched=True, load_from_cache_file=False)
    assert png_bytes(a) == png_bytes(b)
    other = ue.SEMProtect(seed=1, **TINY_MINMIN).fit(small_ds, progress=False)
    c = small_ds.map(other, batched=True, load_from_cache_file=False)
    assert not np.array_equal(pixels(a), pixels(c))


def test_noise_independent_of_batch_size(small_ds, sem):
    a = pixels(small_ds.map(sem, batched=True, batch_size=40, load_from_cache_file=False))
    b = pixels(small_ds.map(sem, batched=True, batch_size=7, load_from_cache_file=False))
    # per-image seeded randomness: only float non-determinism of batched convolutions may differ
    assert (a != b).mean() < 0.01 and np.abs(a - b).max() <= 16


def test_map_without_batched_says_to_add_it(small_ds, sem):
    """datasets' habit is batched=False: the error names the fix instead of failing deep inside on a PIL image."""
    with pytest.raises(TypeError, match=r"batched=True"):
        small_ds.select(range(2)).map(sem, load_from_cache_file=False)


@pytest.mark.parametrize("noise_type", ["sample-wise", "class-wise"])
def test_em_variants_deterministic(small_ds, noise_type):
    make = lambda: ue.EMProtect(seed=3, noise_type=noise_type, **TINY_MINMIN).fit(small_ds, progress=False)  # noqa: E731
    a = small_ds.map(make(), batched=True, load_from_cache_file=False)
    b = small_ds.map(make(), batched=True, load_from_cache_file=False)
    assert png_bytes(a) == png_bytes(b)
    if noise_type == "class-wise":  # one noise per class: two same-class images get the same noise
        d = pixels(a) - pixels(small_ds)
        labels = np.array(small_ds["label"])
        i, j = np.where(labels == 0)[0][:2]
        unclipped = (pixels(small_ds)[i] > 8) & (pixels(small_ds)[i] < 247) & (pixels(small_ds)[j] > 8) & (pixels(small_ds)[j] < 247)
        assert np.array_equal(d[i][unclipped], d[j][unclipped])


def test_cuda_key_changes_output(small_ds):
    a = small_ds.map(ue.CUDAProtect(key=11, allow_weak_key=True, num_classes=10), batched=True, load_from_cache_file=False)
    b = small_ds.map(ue.CUDAProtect(key=11, allow_weak_key=True, num_classes=10), batched=True, load_from_cache_file=False)
    c = small_ds.map(ue.CUDAProtect(key=12, allow_weak_key=True, num_classes=10), batched=True, load_from_cache_file=False)
    assert png_bytes(a) == png_bytes(b)
    assert not np.array_equal(pixels(a), pixels(c))


def test_cuda_needs_no_fit_and_grows_its_filters_with_the_labels(small_ds):
    """CUDAProtect(key=...) maps without fit or num_classes: the filters are built up to the largest label
    seen, batch by batch, and equal the fitted protector's (class c's filter depends only on the key and
    the classes before it). Catches filters rebuilt differently when more classes turn up."""
    key = 2**61 + 12345
    by_label = small_ds.sort("label")  # the first batches hold the small labels only
    lazy = ue.CUDAProtect(key=key)
    a = by_label.map(lazy, batched=True, batch_size=8, load_from_cache_file=False)
    b = by_label.map(ue.CUDAProtect(key=key).fit(small_ds, progress=False), batched=True, load_from_cache_file=False)
    assert png_bytes(a) == png_bytes(b)
    assert len(lazy.filters) == max(small_ds["label"]) + 1
    worker = pickle.loads(pickle.dumps(ue.CUDAProtect(key=key)))  # what num_proc sends: no key, no filters
    with pytest.raises(RuntimeError, match="num_classes="):
        small_ds.select(range(4)).map(worker, batched=True, load_from_cache_file=False)


def test_cuda_is_the_papers_filter(small_ds):
    prot = ue.CUDAProtect(key=5, allow_weak_key=True, preset="paper").fit(small_ds, progress=False)
    f = prot.filters
    assert f.shape == (10, 3, 3)
    assert np.all((f == 1.0).sum(axis=(1, 2)) == 1) and np.all(f[f != 1.0] < 0.3) and np.all(f >= 0)
    # reference: one image, convolved channel by channel with numpy, divided by its max
    img = small_ds[0]["image"]
    x = np.asarray(img, dtype=np.float64).transpose(2, 0, 1) / 255
    k = f[small_ds[0]["label"]].astype(np.float64)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    ref = sum(k[a, b] * xp[:, a : a + 32, b : b + 32] for a in range(3) for b in range(3))
    ref = np.rint(ref / ref.max() * 255).transpose(1, 2, 0)
    out = small_ds.select([0]).map(prot, batched=True, load_from_cache_file=False)[0]["image"]
    assert np.abs(np.asarray(out, dtype=np.int64) - ref).max() <= 1


def test_cuda_scaled_filter_blurs_a_large_image_as_the_small_one():
    """filter_scale=s blurs an s-times enlarged image as the paper's filter blurs the small one: on a
    nearest-neighbour enlargement the dilated filter gives exactly the enlarged blur, and the tent fills
    the pixels between the taps with the triangle a linear interpolation of the filter would give."""
    import torch

    from uexamples.methods.cuda import blur, filter_scale_for, make_filters

    rng = np.random.default_rng(0)
    small = rng.random((4, 3, 12, 10), dtype=np.float32)
    kernels = make_filters(7, 4, 3, 1.0, draws=8)
    for s in (2, 3):
        big = small.repeat(s, axis=2).repeat(s, axis=3)
        dilated = np.stack(blur(list(big), kernels, s, "dilate"))
        expected = np.stack(blur(list(small), kernels, 1)).repeat(s, axis=2).repeat(s, axis=3)
        assert np.array_equal(dilated, expected)
    # the tent: one convolution with the dilated filter convolved with a separable triangle, away from the border
    s = 2
    x = rng.random((1, 3, 20, 20), dtype=np.float32)
    tent = np.array([0.5, 1.0, 0.5])
    full = np.zeros((7, 7))
    for a in range(3):
        for b in range(3):
            full[2 * a : 2 * a + 3, 2 * b : 2 * b + 3] += kernels[0][a, b] * np.outer(tent, tent)
    conv = torch.nn.functional.conv2d(torch.from_numpy(x).double(), torch.from_numpy(full).expand(3, 1, 7, 7), groups=3)[0]
    out = blur(list(x), kernels[:1], s, "tent")[0][:, 3:-3, 3:-3]  # divided by the whole image's max
    conv = conv.numpy()
    np.testing.assert_allclose(out / out.max(), conv / conv.max(), rtol=1e-5, atol=1e-6)
    # the triangle's running sums are zero-padded on both borders alike, at any scale
    from uexamples.methods.cuda import tent_sum

    y = torch.from_numpy(rng.random((2, 9, 11)))
    for dim, scale in [(-2, 2), (-1, 3), (-1, 15)]:
        direct = torch.zeros_like(y)
        for i in range(y.shape[dim]):
            for d in range(1 - scale, scale):
                if 0 <= i + d < y.shape[dim]:
                    direct.select(dim, i).add_((scale - abs(d)) * y.select(dim, i + d))
        assert torch.allclose(tent_sum(y, dim, scale), direct)
    # on large images the running sums along the rows take a two-level scan: the same sums, tail rows included
    from uexamples.methods.cuda import BLOCK_SCAN_ELEMENTS, running_sum_

    for shape, dim in [((3, 301, 300), -2), ((700, 400), 0), ((2, 3, 90, 500), 2)]:
        big = torch.from_numpy(rng.random(shape))
        assert big.numel() >= BLOCK_SCAN_ELEMENTS
        assert torch.allclose(running_sum_(big.clone(), dim), big.cumsum(dim))
    # the rule: one tap spacing per 32 px of the shorter side, never below 1
    assert [filter_scale_for("auto", h, w) for h, w in [(28, 28), (32, 32), (47, 47), (48, 64), (64, 64), (480, 640)]] == [1, 1, 1, 2, 2, 15]
    assert filter_scale_for(3, 28, 28) == 3


def test_cuda_filter_scale_auto_keeps_small_images_and_scales_large_ones(small_ds, tmp_path):
    key = dict(key=21, allow_weak_key=True, num_classes=10)
    paper_scale = small_ds.map(ue.CUDAProtect(filter_scale=1, **key), batched=True, load_from_cache_file=False)
    auto = ue.CUDAProtect(**key)  # the fast preset's rule
    assert auto.config.filter_scale == "auto" and ue.CUDAProtect(preset="paper", **key).config.filter_scale == 1
    assert np.array_equal(pixels(small_ds.map(auto, batched=True, load_from_cache_file=False)), pixels(paper_scale))
    large = small_ds.select(range(6)).map(lambda r: {"image": r["image"].resize((64, 64), PIL.Image.NEAREST)})
    by_auto = pixels(large.map(auto, batched=True, load_from_cache_file=False))
    by_two = pixels(large.map(ue.CUDAProtect(filter_scale=2, **key), batched=True, load_from_cache_file=False))
    by_one = pixels(large.map(ue.CUDAProtect(filter_scale=1, **key), batched=True, load_from_cache_file=False))
    assert np.array_equal(by_auto, by_two) and not np.array_equal(by_auto, by_one)
    assert auto.public_config()["filter_scale"] == "auto"  # the rule is what is saved, not one image's spacing
    assert "one per 32 px" in " ".join(ue.CUDAProtect.card_notes(auto.public_config()))
    # the rule is saved; a protector saved before the rule existed keeps the 3x3 taps it was made with
    auto.save_pretrained(tmp_path / "auto")
    assert np.array_equal(pixels(large.map(ue.Protector.from_pretrained(tmp_path / "auto", key=21), batched=True,
                                           load_from_cache_file=False)), by_auto)  # fmt: skip
    config_file = tmp_path / "auto" / "protector_config.json"
    state = json.loads(config_file.read_text())
    del state["config"]["filter_scale"], state["config"]["filter_resampling"], state["integrity"]  # as saved before
    config_file.write_text(json.dumps(state))
    old = ue.Protector.from_pretrained(tmp_path / "auto", key=21)
    assert old.config.filter_scale == 1
    assert np.array_equal(pixels(large.map(old, batched=True, load_from_cache_file=False)), by_one)
    for bad in ({"filter_scale": 0}, {"filter_scale": "big"}, {"filter_scale": 1.5}, {"filter_resampling": "cubic"}):
        with pytest.raises(ValueError, match="filter_"):
            ue.CUDAProtect(**key, **bad)


def test_cuda_separated_filters_keep_the_papers_distribution_and_spread_the_classes():
    from itertools import combinations

    from uexamples.methods.cuda import filter_spectra, make_filters

    def closest_pair(f):
        s = filter_spectra(f)
        return min(np.sqrt(((s[i] - s[j]) ** 2).mean()) for i, j in combinations(range(len(f)), 2))

    keys = range(8)
    paper = [make_filters(k, 10, 3, 0.3) for k in keys]
    separated = [make_filters(k, 10, 3, 0.3, draws=64) for k in keys]
    for f in separated:  # the same family of filters: one tap at 1, the others in [0, 0.3)
        assert np.all((f == 1.0).sum(axis=(1, 2)) == 1) and np.all(f[f != 1.0] < 0.3) and np.all(f >= 0)
    # the closest two classes are farther apart for every key
    assert all(closest_pair(s) > closest_pair(p) for s, p in zip(separated, paper))
    # deterministic, and a class's filter does not depend on how many classes follow it
    assert np.array_equal(make_filters(3, 10, 3, 0.3, draws=64), separated[3])
    assert np.array_equal(make_filters(3, 4, 3, 0.3, draws=64), separated[3][:4])
    # a protector with draws applies those filters; the presets are the paper's filters and p_b=1 separated
    assert np.array_equal(ue.CUDAProtect(key=3, allow_weak_key=True, num_classes=10, preset="paper", filter_draws=64).filters, separated[3])
    assert np.array_equal(ue.CUDAProtect(key=3, allow_weak_key=True, num_classes=10, preset="paper").filters, paper[3])
    assert np.array_equal(ue.CUDAProtect(key=3, allow_weak_key=True, num_classes=10).filters, make_filters(3, 10, 3, 1.0, draws=64))


# ---------------------------------------------------------------- fingerprints
FP_SCRIPT = textwrap.dedent(
    """
    import sys, json, datasets
    import uexamples as ue
    from datasets.fingerprint import Hasher
    ds = ue.load_sample_dataset().select(range(20))
    p = ue.SEMProtect.from_pretrained(sys.argv[1])
    unfitted = ue.SEMProtect(seed=4)
    cuda = ue.CUDAProtect(key=77, allow_weak_key=True, num_classes=10)
    out = ds.map(p, batched=True)
    print(json.dumps([Hasher.hash(p), Hasher.hash(unfitted), Hasher.hash(cuda), out._fingerprint]))
    """
)


@pytest.mark.integration
def test_fingerprint_equal_in_two_fresh_processes(sem, tmp_path):
    sem.save_pretrained(tmp_path / "p")
    script = tmp_path / "fp.py"
    script.write_text(FP_SCRIPT)
    runs = [subprocess.run([sys.executable, str(script), str(tmp_path / "p")], capture_output=True, text=True, check=True) for _ in range(2)]
    first, second = (json.loads(r.stdout.strip().splitlines()[-1]) for r in runs)
    assert first == second
    assert len(set(first[:3])) == 3


def test_fingerprint_ignores_model_mode_and_changes_with_state(small_ds, sem):
    before = sem.fingerprint
    sem._model().train()
    in_train_mode = sem.fingerprint  # datasets may hash it while a model is in train mode
    sem._model().eval()
    assert in_train_mode == before and sem.fingerprint == before
    assert ue.SEMProtect(seed=0, **TINY_MINMIN).fingerprint != before  # unfitted differs
    assert ue.CUDAProtect(key=1, allow_weak_key=True, num_classes=10).fingerprint != ue.CUDAProtect(key=2, allow_weak_key=True, num_classes=10).fingerprint


# ---------------------------------------------------------------- save / load
@pytest.mark.parametrize("kind", ["sem", "em-classwise", "rem"])
def test_saved_and_reloaded_protector_gives_identical_output(small_ds, tmp_path, kind):
    if kind == "sem":
        prot = ue.SEMProtect(seed=0, **TINY_MINMIN)
    elif kind == "rem":
        prot = ue.REMProtect(seed=0, **TINY_MINMIN)
    else:
        prot = ue.EMProtect(seed=0, noise_type="class-wise", **TINY_MINMIN)
    prot.fit(small_ds, progress=False)
    prot.save_pretrained(tmp_path / kind)
    files = sorted(p.name for p in (tmp_path / kind).iterdir())
    assert files == ["protector.safetensors", "protector_config.json"]
    loaded = ue.Protector.from_pretrained(tmp_path / kind)
    assert type(loaded) is type(prot) and loaded.fingerprint == prot.fingerprint
    a = small_ds.map(prot, batched=True, load_from_cache_file=False)
    b = small_ds.map(loaded, batched=True, load_from_cache_file=False)
    assert png_bytes(a) == png_bytes(b)


def test_cuda_key_never_saved_and_required_on_load(small_ds, tmp_path):
    key = 987654321987
    prot = ue.CUDAProtect(key=key, allow_weak_key=True).fit(small_ds, progress=False)
    prot.save_pretrained(tmp_path / "c")
    for f in (tmp_path / "c").iterdir():
        assert str(key).encode() not in f.read_bytes()
    assert str(key) not in repr(prot)
    assert str(key) not in json.dumps(prot.public_config())
    with pytest.raises(ValueError, match="key"):
        ue.Protector.from_pretrained(tmp_path / "c")
    with pytest.raises(ValueError, match="wrong key"):
        ue.Protector.from_pretrained(tmp_path / "c", key=key + 1)
    loaded = ue.Protector.from_pretrained(tmp_path / "c", key=key)
    a = small_ds.map(prot, batched=True, load_from_cache_file=False)
    b = small_ds.map(loaded, batched=True, load_from_cache_file=False)
    assert png_bytes(a) == png_bytes(b)


def test_num_proc_map_matches_single_process(small_ds, sem):
    a = small_ds.map(sem, batched=True, load_from_cache_file=False)
    b = small_ds.map(sem, batched=True, num_proc=2, load_from_cache_file=False)
    assert np.abs(pixels(a) - pixels(b)).max() <= 16 and (pixels(a) != pixels(b)).mean() < 0.01


# ---------------------------------------------------------------- columns
def test_columns_detected_and_overridable(small_ds):
    ds = small_ds.rename_column("image", "picture").rename_column("label", "category")
    ds = ds.add_column("other_label", [0] * len(ds))
    prot = ue.CUDAProtect(key=3, allow_weak_key=True)
    cols = prot.columns_for(ds.features)
    assert cols.image == "picture" and cols.label == "category"
    prot2 = ue.CUDAProtect(key=3, allow_weak_key=True, label_column="other_label").fit(ds, progress=False)
    assert prot2.num_classes == 1
    out = ds.map(prot2, batched=True, load_from_cache_file=False)
    assert out.column_names == ds.column_names and out["category"] == ds["category"]


# ---------------------------------------------------------------- bad input
def test_unfitted_call_is_clear_error(small_ds):
    with pytest.raises(ue.NotFittedError, match="fit"):
        small_ds.map(ue.SEMProtect(), batched=True)


def test_corrupt_image_names_the_row(small_ds, sem):
    raw = small_ds.cast_column("image", datasets.Image(decode=False))
    cells = list(raw["image"])
    cells[7] = {"bytes": b"\x89PNG\r\n\x1a\n this is not an image", "path": None}
    bad = datasets.Dataset.from_dict({"image": cells, "label": list(raw["label"])}, features=raw.features)
    bad = bad.cast_column("image", datasets.Image())
    with pytest.raises(ue.ImageDecodeError, match="row 7"):
        sem.apply(bad)
    with pytest.raises(ue.ImageDecodeError, match="row 7"):
        ue.SEMProtect(**TINY_MINMIN).fit(bad, progress=False)


def test_empty_dataset(small_ds):
    with pytest.raises(ValueError, match="empty"):
        ue.SEMProtect().fit(small_ds.select([]))


def test_no_image_column():
    ds = datasets.Dataset.from_dict({"text": ["a"], "label": [0]})
    with pytest.raises(ColumnError, match="no image column"):
        ue.CUDAProtect(key=1, allow_weak_key=True).fit(ds)


def test_no_label_column_points_to_label_agnostic(small_ds):
    ds = small_ds.remove_columns("label")
    with pytest.raises(ColumnError, match="needs class labels.*a method that needs no labels"):
        ue.EMProtect().fit(ds)


@pytest.mark.parametrize("eps", [0, -0.1, 1.5, float("nan")])
def test_epsilon_outside_range(eps):
    with pytest.raises(ValueError, match="epsilon"):
        ue.SEMProtect(epsilon=eps)


def test_unknown_method_and_options():
    with pytest.raises(ValueError, match="unknown method 'foo'.*sem"):
        ue.protector("foo")
    with pytest.raises(TypeError, match="unknown option"):
        ue.SEMProtect(epsilom=0.1)
    with pytest.raises(ValueError, match="preset"):
        ue.SEMProtect(preset="turbo")


@pytest.mark.parametrize("key", ["123", 1.5, True, None])
def test_cuda_key_must_be_integer(key):
    with pytest.raises((TypeError, ValueError), match="key"):
        ue.CUDAProtect(key=key, allow_weak_key=True)


def test_labels_out_of_range(small_ds, sem):
    ds = small_ds.cast_column("label", datasets.Value("int64")).map(lambda b: {"label": [12] * len(b["label"])}, batched=True)
    with pytest.raises(ValueError, match="outside"):
        ds.map(sem, batched=True, load_from_cache_file=False)


def test_unsupported_mode_is_clear():
    img = PIL.Image.fromarray(np.zeros((4, 4), np.float32))  # mode F
    buf = io.BytesIO()
    img.save(buf, format="TIFF")
    ds = datasets.Dataset.from_dict({"image": [{"bytes": buf.getvalue(), "path": None}], "label": [0]},
                                    features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=2)}))
    with pytest.raises(ue.ImageDecodeError, match="mode 'F'"):
        ds.map(ue.CUDAProtect(key=1, allow_weak_key=True, num_classes=2), batched=True)


def test_progress_bars_follow_the_datasets_switch(small_ds, capfd):
    """datasets.disable_progress_bars() (or HF_DATASETS_DISABLE_PROGRESS_BARS=1) silences uexamples' bars too."""
    fit = dict(seed=0, **TINY_MINMIN)
    ue.SEMProtect(**fit).fit(small_ds, progress=True)  # the test session runs with datasets' bars off
    assert "Fitting" not in capfd.readouterr().err
    datasets.enable_progress_bars()
    try:
        ue.SEMProtect(**fit).fit(small_ds, progress=True)
    finally:
        datasets.disable_progress_bars()
    assert "Fitting SEM surrogate" in capfd.readouterr().err


def test_uexamples_logger_and_verbosity(small_ds, caplog):
    """ue.logging works like transformers' logging: INFO shows what a fit decided, WARNING (the default) hides it."""
    logger = ue.logging.get_logger()
    logger.addHandler(caplog.handler)
    try:
        ue.logging.set_verbosity_info()
        ue.SEMProtect(seed=0, **TINY_MINMIN).fit(small_ds, progress=False)
        assert f"SEM fitted on {len(small_ds)} images" in caplog.text and "resolution: native 32x32" in caplog.text
        caplog.clear()
        ue.logging.set_verbosity_warning()
        ue.SEMProtect(seed=0, **TINY_MINMIN).fit(small_ds, progress=False)
        assert "fitted" not in caplog.text
    finally:
        logger.removeHandler(caplog.handler)
        ue.logging.set_verbosity_warning()


def test_a_dataset_dict_fits_on_train_and_protects_the_named_splits(small_ds):
    dd = datasets.DatasetDict({"train": small_ds.select(range(20)), "test": small_ds.select(range(20, 30))})
    cuda = ue.CUDAProtect(key=91827364551, allow_weak_key=True).fit(dd)
    both = cuda.apply(dd)
    assert isinstance(both, datasets.DatasetDict) and {k: len(v) for k, v in both.items()} == {"train": 20, "test": 10}
    alone = cuda.apply(dd["test"])
    assert [np.asarray(a).tolist() for a in alone["image"]] == [np.asarray(a).tolist() for a in both["test"]["image"]]
    assert list(cuda.apply(dd, splits=["test"])) == ["test"]
    with pytest.raises(KeyError, match="validation"):
        cuda.apply(dd, splits=["validation"])
    with pytest.raises(TypeError, match="without a 'train' split"):
        cuda.fit(datasets.DatasetDict({"test": dd["test"]}))


def test_a_stream_is_protected_with_its_features_and_fitted_on_a_seeded_sample():
    """IterableDataset: apply keeps the Image feature (datasets' own map loses it) and gives the same pixels as
    the in-memory map; fit takes a bounded, seeded sample of the stream and says so."""
    ds = ue.load_sample_dataset().select(range(48))
    key = 70412938475123
    cuda = ue.CUDAProtect(key=key, num_classes=10)
    streamed = cuda.apply(ds.to_iterable_dataset(num_shards=2), batch_size=16)
    assert streamed.features == ds.features
    rows = list(streamed)
    expected = ds.map(cuda, batched=True)
    assert all((np.asarray(r["image"]) == np.asarray(e)).all() for r, e in zip(rows, expected["image"]))
    assert [r["label"] for r in rows] == ds["label"]
    sem = ue.SEMProtect(seed=3, surrogate="tinycnn", train_steps=2, train_batch_size=16, final_noise_steps=1)
    sem.fit(ds.to_iterable_dataset(), progress=False, stream_sample=32)
    assert sem.fitted_on["rows"] == 32 and sem.fitted_on["sampled_from_stream"]
    again = ue.SEMProtect(seed=3, surrogate="tinycnn", train_steps=2, train_batch_size=16, final_noise_steps=1)
    again.fit(ds.to_iterable_dataset(), progress=False, stream_sample=32)
    assert sem.fingerprint == again.fingerprint  # the same seed, the same sample, the same fit
    with pytest.raises(ValueError, match="stream_sample"):
        sem.fit(ds.to_iterable_dataset(), progress=False, stream_sample=0)
