"""Nothing silently wrong: each test is a probe that failed (or crashed unhelpfully) before it was fixed.

Numbers in the test names follow the reliability issue (13): EXIF orientation, exclusive and atomic
outputs, tampered saved protectors, batch sizes, animated images, fit length, float labels, CUDA key
range, up-front checks, memory on large photos, the key on the command line.
"""

import io
import json
import os
import subprocess
import sys

import datasets
import numpy as np
import PIL.Image
import pytest

import uexamples as ue
from uexamples.cli import main
from uexamples.outputs import OutputLock, move_into_place, partial_dir

from helpers import TINY_MINMIN

pytestmark = pytest.mark.unit

BIG_KEY = 2**61 + 12345


def jpeg_with_orientation(orientation: int) -> bytes:
    """A non-symmetric 40x24 photo whose EXIF says how to turn it."""
    yy, xx = np.mgrid[0:24, 0:40]
    arr = np.stack([xx * 6, yy * 10, (xx + yy) * 3], -1).astype(np.uint8)
    arr[:6, :6] = [255, 0, 0]  # a red corner: shows where the top-left went
    exif = PIL.Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    PIL.Image.fromarray(arr).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


# ---------------------------------------------------------------- 1. EXIF orientation
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_1_exif_rotated_photos_come_out_upright_on_every_path(orientation):
    raw = jpeg_with_orientation(orientation)
    ds = datasets.Dataset.from_dict({"image": [{"bytes": raw, "path": None}] * 2, "label": [0, 1]},
                                    features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}))  # fmt: skip
    seen = PIL.ImageOps.exif_transpose(PIL.Image.open(io.BytesIO(raw)))  # what a viewer shows
    protector = ue.CUDAProtect(key=BIG_KEY, num_classes=2)
    by_map = ds.map(protector, batched=True, load_from_cache_file=False)  # datasets decodes (upright)
    by_apply = protector.apply(ds, load_from_cache_file=False)  # raw bytes (the CLI's path)
    for out in (by_map, by_apply):
        img = out[0]["image"]
        assert img.size == seen.size and img.getexif().get(0x0112) is None
    assert np.array_equal(np.asarray(by_map[0]["image"]), np.asarray(by_apply[0]["image"]))
    # the protected image is the photo as seen (blurred): the red corner is where the viewer shows it
    seen_px, out_px = np.asarray(seen, int), np.asarray(by_apply[0]["image"], int)
    red = (seen_px[..., 0] - seen_px[..., 1]) > 150
    redness = out_px[..., 0] - out_px[..., 1]
    assert red.sum() >= 16 and redness[red].mean() > redness[~red].mean() + 100


# ---------------------------------------------------------------- 2. exclusive, atomic outputs
def test_2_a_second_run_on_the_same_output_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("UEXAMPLES_CUDA_KEY", str(BIG_KEY))
    out = tmp_path / "out"
    with OutputLock(out):
        assert main(["protect", "--method", "cuda", "--output", str(out), "--quiet"]) == 2
    assert "being written by another run" in capsys.readouterr().err and not out.exists()
    # a lock left by a killed process is taken over
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "out.lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "since": "then"}))
    assert main(["protect", "--method", "cuda", "--output", str(out), "--quiet"]) == 0
    assert (out / "summary.json").is_file() and not (tmp_path / "out.lock").exists()
    assert not list(tmp_path.glob("out.partial*"))


def test_2_overwrite_swaps_atomically(tmp_path):
    out, new = tmp_path / "out", partial_dir(tmp_path / "out")
    assert new != partial_dir(tmp_path / "out")  # unique per call: two runs never share a partial folder
    out.mkdir()
    (out / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    with pytest.raises(ValueError, match="not empty"):
        move_into_place(new, out, overwrite=False)
    move_into_place(new, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["new.txt"] and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------- 3. tampered saved protectors
@pytest.fixture(scope="module")
def saved_sem(small_ds, tmp_path_factory):
    path = tmp_path_factory.mktemp("sem")
    ue.SEMProtect(seed=0, **TINY_MINMIN).fit(small_ds, progress=False).save_pretrained(path)
    return path


def edited_copy(src, dst, edit=None, drop_digest=False, weights=None):
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "protector_config.json").read_text())
    if edit:
        edit(cfg)
    if drop_digest:
        cfg.pop("integrity")
    (dst / "protector_config.json").write_text(json.dumps(cfg))
    if weights is not None:
        from safetensors.numpy import load_file, save_file

        arrays = load_file(str(dst / "protector.safetensors"))
        weights(arrays)
        save_file(arrays, str(dst / "protector.safetensors"))
    return dst


def test_3_edited_config_or_weights_are_refused(saved_sem, tmp_path):
    def eps(value):
        return lambda cfg: cfg["config"].update(epsilon=value)

    with pytest.raises(ValueError, match="modified after it was saved"):
        ue.Protector.from_pretrained(edited_copy(saved_sem, tmp_path / "a", eps(0.5)))
    for i, bad in enumerate([-1, 5.0]):  # without the digest, validation still refuses
        with pytest.raises(ValueError, match="epsilon"):
            ue.Protector.from_pretrained(edited_copy(saved_sem, tmp_path / f"b{i}", eps(bad), drop_digest=True))

    def nan(arrays):
        name = next(k for k in arrays if k.endswith("weight"))
        arrays[name][...] = np.nan

    with pytest.raises(ValueError, match="modified after it was saved"):
        ue.Protector.from_pretrained(edited_copy(saved_sem, tmp_path / "c", weights=nan))
    with pytest.raises(ValueError, match="NaN"):
        ue.Protector.from_pretrained(edited_copy(saved_sem, tmp_path / "d", drop_digest=True, weights=nan))
    cuda = tmp_path / "cuda"
    ue.CUDAProtect(key=BIG_KEY, num_classes=10).save_pretrained(cuda)
    for i, fields in enumerate([{"kernel_size": 1}, {"max_weight": 0}, {"batch_size": -1}, {"batch_size": 0}]):
        edited = edited_copy(cuda, tmp_path / f"e{i}", lambda cfg: cfg["config"].update(fields), drop_digest=True)
        with pytest.raises(ValueError, match=next(iter(fields))):
            ue.Protector.from_pretrained(edited, key=BIG_KEY)


def test_9_missing_weights_file_is_named(saved_sem, tmp_path):
    broken = edited_copy(saved_sem, tmp_path / "w")
    (broken / "protector.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="protector.safetensors is missing"):
        ue.Protector.from_pretrained(broken)


# ---------------------------------------------------------------- 4, 6, 8, 9: refused on construction
@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": -1}, "batch_size"), ({"batch_size": 0}, "batch_size"), ({"batch_pixels": 0}, "batch_pixels"),
    ({"num_classes": 0}, "num_classes"), ({"seed": 2**70}, "seed"), ({"seed": -1}, "seed"),
])  # fmt: skip
def test_4_9_bad_cuda_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ue.CUDAProtect(key=BIG_KEY, **kwargs)


@pytest.mark.parametrize("steps", [0, -3])
def test_6_no_fit_without_steps(steps):
    with pytest.raises(ValueError, match="train_steps"):
        ue.SEMProtect(train_steps=steps)
    with pytest.raises(ValueError, match="noise_steps"):
        ue.EMProtect(noise_steps=steps)


def test_8_cuda_keys_map_one_to_one_and_weak_keys_are_refused():
    for key in (2**100, 2**63, -5):
        with pytest.raises(ValueError, match=r"2\*\*63"):
            ue.CUDAProtect(key=key)
    with pytest.raises(ValueError, match="below 2\\*\\*32"):
        ue.CUDAProtect(key=1234)
    assert ue.CUDAProtect(key=1234, allow_weak_key=True, num_classes=2).fitted
    a = ue.CUDAProtect(key=2**63 - 1, num_classes=10).filters
    b = ue.CUDAProtect(key=2**62, num_classes=10).filters
    assert not np.array_equal(a, b)


# ---------------------------------------------------------------- 5. animated images
def test_5_animated_images_are_refused_by_row(small_ds):
    frames = [PIL.Image.new("RGB", (8, 8), (i * 80, 0, 0)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    cells = [{"bytes": buf.getvalue(), "path": None} if i == 2 else small_ds[i]["image"] for i in range(4)]
    ds = datasets.Dataset.from_dict({"image": cells, "label": [0, 1, 2, 3]},
                                    features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}))  # fmt: skip
    protector = ue.CUDAProtect(key=BIG_KEY, num_classes=10)
    with pytest.raises(ue.ImageDecodeError, match="row 2 is animated \\(3 frames"):
        protector.apply(ds)
    with pytest.raises(ue.ImageDecodeError, match="animated"):
        ds.map(protector, batched=True)


# ---------------------------------------------------------------- 7, 9. labels
def test_7_float_labels_refused_on_every_path(small_ds):
    ds = small_ds.select(range(4)).cast_column("label", datasets.Value("float32"))
    ds = ds.map(lambda r, i: {"label": r["label"] + (0.9 if i == 1 else 0.0)}, with_indices=True)
    protector = ue.CUDAProtect(key=BIG_KEY, num_classes=10)
    with pytest.raises(ValueError, match="row 0 is not an integer class label"):
        ds.map(protector, batched=True, with_indices=True)
    with pytest.raises(ValueError, match="not an integer class label"):
        ds.map(protector, batched=True)
    with pytest.raises(ValueError, match="not integer class labels"):
        protector.apply(ds.rename_column("label", "y"), label_column="y") if False else ue.CUDAProtect(
            key=BIG_KEY, label_column="label").fit(ds)


def test_9_unlabelled_rows(small_ds):
    unlabelled = small_ds.select(range(6)).map(lambda r: {"label": -1}).cast_column("label", datasets.Value("int64"))
    with pytest.raises(ValueError, match="no row of 'label' has a class label"):
        ue.CUDAProtect(key=BIG_KEY).fit(unlabelled)
    some = small_ds.select(range(6)).map(lambda r, i: {"label": -1 if i == 4 else r["label"]}, with_indices=True,
                                         features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}))  # fmt: skip
    with pytest.raises(ValueError, match="label -1 at row 4"):
        ue.SEMProtect(**TINY_MINMIN).fit(some)


# ---------------------------------------------------------------- 9. output paths checked before any work
@pytest.mark.parametrize("where", ["file", "cwd", "parent"])
def test_9_output_path_checked_up_front(tmp_path, capsys, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("x")
    output = {"file": "a-file", "cwd": ".", "parent": ".."}[where]
    assert main(["protect", "--method", "sem", "--output", output, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert ("existing file" in err) if where == "file" else ("current directory" in err)
    assert "Fitting" not in err


# ---------------------------------------------------------------- 10. memory on large photos
def test_10_batches_are_bounded_by_pixels(monkeypatch):
    rng = np.random.default_rng(0)
    imgs = [PIL.Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(10)]
    ds = datasets.Dataset.from_dict({"image": imgs, "label": [0] * 10})
    protector = ue.CUDAProtect(key=BIG_KEY, num_classes=1, batch_pixels=2 * 64 * 64 + 10)
    seen = []
    original = type(protector).protect_batch
    monkeypatch.setattr(type(protector), "protect_batch", lambda self, b: seen.append(len(b)) or original(self, b))
    ds.map(protector, batched=True, batch_size=10, load_from_cache_file=False)
    assert seen == [2, 2, 2, 2, 2]
    big = [{"bytes": _png(PIL.Image.new("RGB", (4000, 3000))), "path": None}]
    raw = datasets.Dataset.from_dict({"image": big}).cast_column("image", datasets.Image(decode=False))
    assert ue.CUDAProtect(key=BIG_KEY, num_classes=1).map_batch_size(raw, "image") == 2  # 8 x 4 Mpx of 12 Mpx photos


def _png(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_10_summary_counts_quality_and_preview(tmp_path, monkeypatch):
    monkeypatch.setenv("UEXAMPLES_CUDA_KEY", str(BIG_KEY))
    assert main(["protect", "--method", "cuda", "--output", str(tmp_path / "o"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["quality_seconds"] > 0
    assert summary["seconds"] >= summary["fit_seconds"] + summary["map_seconds"] + summary["quality_seconds"] - 0.05


# ---------------------------------------------------------------- 11. the key on the command line
def test_11_key_on_the_command_line_warns(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("UEXAMPLES_CUDA_KEY", raising=False)
    assert main(["protect", "--method", "cuda", "--key", str(BIG_KEY), "--output", str(tmp_path / "o"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "UEXAMPLES_CUDA_KEY" in err and str(BIG_KEY) not in err
