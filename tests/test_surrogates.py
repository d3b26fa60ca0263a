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

from helpers import TINY_MINMIN

pytestmark = pytest.mark.unit

FAST = {k: v for k, v in TINY_MINMIN.items() if k != "surrogate"}


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    path = tmp_path_factory.mktemp("vit")
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=3, architectures=["ViTForImageClassification"])
    torch.manual_seed(0)
    ViTForImageClassification(cfg).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.2, 0.2]).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    path = tmp_path_factory.mktemp("clip")
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100),
        vision_config=dict(image_size=48, patch_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(path)  # no preprocessor config: geometry falls back to the model config
    return str(path)


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
