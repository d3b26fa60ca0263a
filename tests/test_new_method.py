"""A new method is one module and a registration: this file defines two toy methods and nothing else.

They go through everything a built-in method goes through (``ds.map``, ``save_pretrained`` /
``from_pretrained``, the CLI with its own option in ``--help``, the dataset card, and
``hub_scripts/protect.py`` in a subprocess that loads this file through ``UEXAMPLES_PLUGINS``)
without any change to the package. They also make the label-free and caption paths real:
``toy-caption`` needs captions and no labels, ``toy-pattern`` needs neither.

This module must stay importable on its own (no ``helpers`` import at the top): the subprocess
imports it as a plugin.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import uexamples as ue
from uexamples.core.additive import AdditiveConfig, AdditiveProtector, project_grey
from uexamples.core.options import option
from uexamples.core.registry import register_method

REPO = Path(__file__).resolve().parents[1]
CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ---------------------------------------------------------------------------------- the toy methods
@dataclasses.dataclass
class PatternConfig(AdditiveConfig):
    pattern_cells: int = option(4, "side of the grid of +-epsilon blocks that makes the toy pattern")


class _Pattern(AdditiveProtector):
    """+-epsilon blocks on a ``pattern_cells`` grid, drawn from a seed that a subclass chooses per row."""

    config_class = PatternConfig

    def pattern_seed(self, batch, i: int) -> int:
        raise NotImplementedError

    def perturbation(self, x, batch, grey):
        cells, eps = int(self.config.pattern_cells), float(self.config.epsilon)
        deltas = []
        for i in range(len(batch)):
            g = torch.Generator().manual_seed(self.pattern_seed(batch, i))
            signs = torch.randint(0, 2, (1, 3, cells, cells), generator=g).float() * 2 - 1
            deltas.append(F.interpolate(signs, size=tuple(x.shape[-2:]), mode="nearest")[0] * eps)
        return project_grey((x + torch.stack(deltas)).clamp(0, 1) - x, grey)


def _text_seed(text: str, seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{text}".encode(), digest_size=7).digest(), "little")


@register_method
class ToyCaptionPattern(_Pattern):
    method = "toy-caption"
    title = "Toy caption pattern"
    summary = "A fixed pattern per caption (a test of the protocol, not a protection)."
    paper = "Nobody, *A toy*, 2026"
    citation = "@misc{toy2026caption,\n  title={A Fixed Pattern per Caption},\n  year={2026}\n}"
    needs_texts = True

    def pattern_seed(self, batch, i: int) -> int:
        caption = batch.texts[i]
        return _text_seed(caption if isinstance(caption, str) else caption[0], self.config.seed)


@register_method
class ToySeedPattern(_Pattern):
    method = "toy-pattern"
    title = "Toy seed pattern"
    summary = "One pattern for every image, from the seed alone."
    paper = "Nobody, *Another toy*, 2026"
    citation = "@misc{toy2026seed,\n  title={One Pattern from the Seed},\n  year={2026}\n}"

    def pattern_seed(self, batch, i: int) -> int:
        return _text_seed("", self.config.seed)


# ---------------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def captioned(small_ds):
    """40 real images with a caption column and no label column."""
    captions = [f"a photo of a {CLASS_NAMES[y]}" for y in small_ds["label"]]
    return small_ds.add_column("caption", captions).remove_columns("label")


def pixels(ds, column="image"):
    return np.stack([np.asarray(im, dtype=np.int64) for im in ds[column]])


# ---------------------------------------------------------------------------------- tests
pytestmark = pytest.mark.unit


def test_toy_caption_maps_and_the_caption_passes_through(captioned):
    protector = ue.get_method("toy-caption")(seed=3)
    out = captioned.map(protector, batched=True, batch_size=16, load_from_cache_file=False)
    assert out["caption"] == captioned["caption"]
    d = pixels(out) - pixels(captioned)
    assert 0 < np.abs(d).max() <= 8
    # the noise is a function of the caption: same caption, same pattern (where no pixel was clipped)
    caps = np.array(captioned["caption"])
    i, j = np.where(caps == caps[0])[0][:2]
    k = int(np.where(caps != caps[0])[0][0])
    free = lambda a: (pixels(captioned)[a] >= 8) & (pixels(captioned)[a] <= 247)  # noqa: E731
    both = free(i) & free(j)
    assert np.array_equal(d[i][both], d[j][both])
    assert not np.array_equal(d[i][free(i) & free(k)], d[k][free(i) & free(k)])


def test_list_captions_and_bad_captions(captioned):
    lists = datasets.Dataset.from_dict(
        {"image": captioned["image"][:4], "captions": [["a cat", "a kitten"], ["a cat"], ["a dog"], ["a dog", "x"]]},
        features=datasets.Features({"image": datasets.Image(), "captions": datasets.List(datasets.Value("string"))}),
    )
    out = lists.map(ue.get_method("toy-caption")(), batched=True, load_from_cache_file=False)
    assert out["captions"] == lists["captions"]
    d, clean = pixels(out) - pixels(lists), pixels(lists)
    free = lambda a: (clean[a] >= 8) & (clean[a] <= 247)  # noqa: E731  (pixels the bound did not clip)
    assert np.array_equal(d[0][free(0) & free(1)], d[1][free(0) & free(1)])  # the same first caption
    assert not np.array_equal(d[0][free(0) & free(2)], d[2][free(0) & free(2)])
    bad = datasets.Dataset.from_dict({"image": captioned["image"][:2], "caption": ["ok", None]})
    with pytest.raises(ValueError, match="caption at row 1"):
        ue.get_method("toy-caption")().apply(bad)


def test_label_free_dataset(captioned):
    # a method that needs neither labels nor texts maps an image+caption dataset; the caption passes
    out = captioned.map(ue.get_method("toy-pattern")(seed=1), batched=True, load_from_cache_file=False)
    assert out["caption"] == captioned["caption"] and out.column_names == ["image", "caption"]
    assert 0 < np.abs(pixels(out) - pixels(captioned)).max() <= 8
    # methods that need labels say so, and name the methods that do not
    with pytest.raises(ue.ColumnError, match=r"SEM needs class labels.*toy-caption, toy-pattern"):
        ue.SEMProtect().fit(captioned)
    with pytest.raises(ue.ColumnError, match=r"CUDA needs class labels.*toy-caption, toy-pattern"):
        captioned.map(ue.CUDAProtect(key=5, allow_weak_key=True, num_classes=10), batched=True)
    # a caption method on a dataset without captions
    with pytest.raises(ue.ColumnError, match="TOY-CAPTION needs captions"):
        ue.get_method("toy-caption")().apply(captioned.remove_columns("caption"))


def test_save_and_load_the_toy(captioned, tmp_path):
    protector = ue.get_method("toy-caption")(seed=2, pattern_cells=2)
    protector.save_pretrained(tmp_path / "toy")
    loaded = ue.Protector.from_pretrained(tmp_path / "toy")
    assert type(loaded) is ToyCaptionPattern and loaded.config.pattern_cells == 2
    a = captioned.map(protector, batched=True, load_from_cache_file=False)
    b = captioned.map(loaded, batched=True, load_from_cache_file=False)
    assert np.array_equal(pixels(a), pixels(b))
    assert loaded.fingerprint == protector.fingerprint


def test_registry_refuses_duplicates_and_bad_names():
    with pytest.raises(ValueError, match="already registered"):
        register_method(type("OtherSEM", (ue.SEMProtect,), {"method": "sem"}))
    with pytest.raises(ValueError, match="method name"):
        register_method(type("Bad", (_Pattern,), {"method": "Bad Name"}))
    with pytest.raises(ValueError, match="method name"):
        register_method(type("NoName", (_Pattern,), {}))  # inherits no name of its own
    with pytest.raises(TypeError, match="Protector subclass"):
        register_method(type("NotAProtector", (), {"method": "x"}))
    register_method(ToyCaptionPattern)  # the same class again (a module reloaded) is fine


@pytest.mark.integration
def test_toy_through_cli_card_and_protect_script(captioned, tmp_path, capsys):
    from uexamples.cards import render_card
    from uexamples.cli import main

    with pytest.raises(SystemExit):
        main(["protect", "--method", "toy-caption", "--help"])
    help_text = capsys.readouterr().out
    assert "--pattern-cells" in help_text and "side of the grid" in help_text and "Nobody, *A toy*" in help_text

    data = tmp_path / "data"
    captioned.save_to_disk(str(data))
    out = tmp_path / "cli"
    assert main(["protect", "--dataset", str(data), "--method", "toy-caption", "--pattern-cells", "2",
                 "--seed", "4", "--output", str(out), "--quiet"]) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "toy-caption" and summary["config"]["pattern_cells"] == 2
    cli_ds = datasets.load_from_disk(str(out / "dataset"))
    expected = captioned.map(ToyCaptionPattern(seed=4, pattern_cells=2), batched=True, load_from_cache_file=False)
    assert np.array_equal(pixels(cli_ds), pixels(expected)) and cli_ds["caption"] == captioned["caption"]

    card = render_card(summary, "someone/protected", license="mit")
    assert "toy2026caption" in card and "Toy caption pattern" in card

    # hub_scripts/protect.py in a fresh process: the toy comes in through UEXAMPLES_PLUGINS only
    env = dict(os.environ, UEXAMPLES_PLUGINS=str(Path(__file__).resolve()), OMP_NUM_THREADS="1")
    script_out = tmp_path / "script"
    res = subprocess.run(
        [sys.executable, str(REPO / "hub_scripts" / "protect.py"), "--dataset", str(data), "--method", "toy-caption",
         "--pattern-cells", "2", "--seed", "4", "--output", str(script_out), "--quiet"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    script_ds = datasets.load_from_disk(str(script_out / "dataset"))
    assert np.array_equal(pixels(script_ds), pixels(expected))
    assert json.loads((script_out / "summary.json").read_text())["config"]["pattern_cells"] == 2


# ---------------------------------------------------------------------------------- engine hooks
@register_method
class ToyLeftHalfSEM(ue.SEMProtect):
    """SEM whose noise lives on the left half of the image only: a projection, not a copy of the engine."""

    method = "toy-left-sem"
    title = "Toy left-half SEM"
    paper = "Nobody, *A mask*, 2026"

    def project(self, delta, x, grey):
        delta = super().project(delta, x, grey)
        mask = torch.zeros_like(delta)
        mask[..., : delta.shape[-1] // 2] = 1
        return delta * mask


def test_a_projection_hook_restricts_the_noise(small_ds):
    tiny = dict(surrogate="tinycnn", train_steps=3, train_batch_size=32, noise_steps=2, eot_draws=1, adv_steps=1,
                final_noise_steps=3, final_eot_draws=1)  # fmt: skip
    protector = ToyLeftHalfSEM(seed=0, **tiny).fit(small_ds, progress=False)
    d = pixels(small_ds.map(protector, batched=True, load_from_cache_file=False)) - pixels(small_ds)
    assert np.abs(d[:, :, 16:]).max() == 0  # (N, H, W, C): the right half is untouched
    assert 0 < np.abs(d[:, :, :16]).max() <= 8


def test_float_labels_are_never_truncated_for_a_label_free_method(small_ds, monkeypatch):
    ds = small_ds.select(range(4)).cast_column("label", datasets.Value("float32"))
    ds = ds.map(lambda r, i: {"label": r["label"] + (0.9 if i == 1 else 0.0)}, with_indices=True)
    seen = []
    original = ToySeedPattern.protect_batch
    monkeypatch.setattr(ToySeedPattern, "protect_batch", lambda self, b: seen.append(b.labels) or original(self, b))
    ds.map(ToySeedPattern(), batched=True, load_from_cache_file=False)
    assert seen == [None]  # 1.9 is not class 1: no labels rather than wrong ones
    ints = small_ds.select(range(4))
    ints.map(ToySeedPattern(), batched=True, load_from_cache_file=False)
    assert seen[-1] == ints["label"]  # integer labels are passed on
