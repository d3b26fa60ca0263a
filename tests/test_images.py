"""Images of every mode and size: kept mode and size, lossless storage, the bound after rounding."""

import io

import datasets
import numpy as np
import PIL.Image
import pytest

import uexamples as ue
from uexamples.core.images import NativeImage, bound_levels

from helpers import TINY_MINMIN, random_image

pytestmark = pytest.mark.unit

MODES = ["L", "LA", "RGB", "RGBA", "P", "I;16", "CMYK"]
SIZES = [(32, 32), (17, 40), (64, 23)]


def mixed_dataset(modes, seed=0):
    images, labels = [], []
    for i, mode in enumerate(modes):
        for j, size in enumerate(SIZES):
            images.append(random_image(mode, size, seed=100 * i + j))
            labels.append((i + j) % 3)
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=3), "id": datasets.Value("int64")})
    return datasets.Dataset.from_dict({"image": images, "label": labels, "id": list(range(len(images)))}, features=feats)


def shown(img: PIL.Image.Image) -> np.ndarray:
    """What a viewer sees, in the image's own levels: palette colours for P, raw values otherwise."""
    return NativeImage.from_pil(img).levels.astype(np.int64)


@pytest.fixture(scope="module")
def fitted_sem(small_ds):
    return ue.SEMProtect(seed=0, **TINY_MINMIN).fit(small_ds, progress=False)


def stored_format(ds, i):
    raw = ds.cast_column("image", datasets.Image(decode=False))[i]["image"]["bytes"]
    return PIL.Image.open(io.BytesIO(raw)).format


@pytest.mark.parametrize("mode", MODES)
def test_mode_size_bound_and_lossless_storage(mode, fitted_sem):
    ds = mixed_dataset([mode])
    out = ds.map(fitted_sem, batched=True, load_from_cache_file=False)
    assert out.features == ds.features
    for i in range(len(ds)):
        orig, prot = ds[i]["image"], out[i]["image"]
        assert prot.mode == mode and prot.size == orig.size
        assert stored_format(out, i) == ("TIFF" if mode == "CMYK" else "PNG")
        maxval = 65535 if mode == "I;16" else 255
        diff = np.abs(shown(prot) - shown(orig))
        assert diff.max() <= bound_levels(8 / 255, maxval), f"{mode}: bound broken"
        assert diff.max() > 0, f"{mode}: nothing was added"
        arr_o, arr_p = np.asarray(orig), np.asarray(prot)
        if mode in ("LA", "RGBA"):
            assert np.array_equal(arr_o[..., -1], arr_p[..., -1]), "alpha must be untouched"
        if mode == "P":
            assert np.array_equal(arr_o, arr_p), "palette indices are kept; only palette colours move"
        if mode == "CMYK":
            assert np.array_equal(arr_o[..., 3], arr_p[..., 3]), "K channel is kept"
            assert np.abs(arr_o[..., :3].astype(int) - arr_p[..., :3]).max() <= 8
    assert out["id"] == ds["id"] and out["label"] == ds["label"]


def test_mixed_modes_in_one_dataset(fitted_sem):
    ds = mixed_dataset(MODES)
    out = ds.map(fitted_sem, batched=True, batch_size=5, load_from_cache_file=False)
    for i in range(len(ds)):
        assert out[i]["image"].mode == ds[i]["image"].mode
        assert out[i]["image"].size == ds[i]["image"].size


def test_bound_after_rounding_at_other_epsilon(small_ds):
    prot = ue.SEMProtect(seed=1, epsilon=3 / 255, **TINY_MINMIN).fit(small_ds, progress=False)
    out = small_ds.map(prot, batched=True, load_from_cache_file=False)
    a = np.stack([np.asarray(i, dtype=np.int64) for i in small_ds["image"]])
    b = np.stack([np.asarray(i, dtype=np.int64) for i in out["image"]])
    assert np.abs(a - b).max() == 3
    # the noise really uses the budget rather than vanishing in the rounding
    assert (np.abs(a - b) == 3).mean() > 0.2


def test_jpeg_source_comes_out_png(fitted_sem):
    buf = io.BytesIO()
    random_image("RGB", (40, 30), 3).save(buf, format="JPEG", quality=90)
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": buf.getvalue(), "path": "a.jpg"}] * 2, "label": [0, 1]}, features=feats)
    assert ds[0]["image"].format == "JPEG"
    out = ds.map(fitted_sem, batched=True, load_from_cache_file=False)
    assert stored_format(out, 0) == "PNG"
    diff = np.abs(np.asarray(out[0]["image"], dtype=int) - np.asarray(ds[0]["image"], dtype=int))
    assert 0 < diff.max() <= 8  # relative to the decoded JPEG pixels


def test_save_to_disk_and_parquet_reload_bit_exact(fitted_sem, tmp_path):
    ds = mixed_dataset(["RGB", "L", "RGBA", "I;16", "P", "CMYK"])
    out = ds.map(fitted_sem, batched=True, load_from_cache_file=False)
    out.save_to_disk(str(tmp_path / "disk"))
    back = datasets.load_from_disk(str(tmp_path / "disk"))
    out.to_parquet(str(tmp_path / "p.parquet"))
    back_pq = datasets.load_dataset("parquet", data_files=str(tmp_path / "p.parquet"), split="train")
    for i in range(len(out)):
        ref = out[i]["image"]
        for other in (back[i]["image"], back_pq[i]["image"]):
            assert other.mode == ref.mode
            assert np.array_equal(np.asarray(other), np.asarray(ref))
            if ref.mode == "P":
                assert other.getpalette() == ref.getpalette()


def test_decode_false_column_gives_bytes_back(fitted_sem):
    ds = mixed_dataset(["RGB"]).cast_column("image", datasets.Image(decode=False))
    out = ds.map(fitted_sem, batched=True, load_from_cache_file=False)
    cell = out[0]["image"]
    assert isinstance(cell, dict) and cell["bytes"][:4] == b"\x89PNG"


def test_palette_transparency_survives():
    img = random_image("P", (16, 16), 5)
    img.info["transparency"] = 3
    nat = NativeImage.from_pil(img)
    out = nat.to_pil(np.clip(nat.color + 0.02, 0, 1), bound=8)
    buf = io.BytesIO()
    out.save(buf, format=out.format)
    back = PIL.Image.open(io.BytesIO(buf.getvalue()))
    assert back.info.get("transparency") == 3


def test_photo_previews_show_the_stored_pixels_at_full_resolution():
    """Thumbnails of photos hide the noise: the preview adds 1:1 centre crops of the clean and protected image."""
    from uexamples.preview import PHOTO_CELL, preview_grid

    rng = np.random.default_rng(0)
    clean = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    protected = np.clip(clean.astype(int) + rng.integers(-3, 4, clean.shape), 0, 255).astype(np.uint8)
    pair = (NativeImage.from_pil(PIL.Image.fromarray(clean)), NativeImage.from_pil(PIL.Image.fromarray(protected)))
    sheet = np.asarray(preview_grid([pair], cell=96, gap=4))
    assert sheet.shape[1] == 5 * PHOTO_CELL + 6 * 4  # clean | protected | noise | clean 1:1 | protected 1:1
    top = 16 + 4
    for column, source in ((3, clean), (4, protected)):
        left = 4 + column * (PHOTO_CELL + 4)
        tile = sheet[top : top + PHOTO_CELL, left : left + PHOTO_CELL]
        assert np.array_equal(tile, source[240 - 80 : 240 + 80, 320 - 80 : 320 + 80])  # pixel for pixel, not resampled
    small = (NativeImage.from_pil(PIL.Image.fromarray(clean[:32, :32])),) * 2
    assert np.asarray(preview_grid([small], cell=96, gap=4)).shape[1] == 3 * 96 + 4 * 4  # small images: as before
