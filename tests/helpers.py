import os
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
datasets.disable_progress_bars()

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Cheap settings for tests: a real fit, but only a few steps of everything.
TINY_MINMIN = dict(surrogate="tinycnn", train_steps=3, train_batch_size=32, noise_steps=2, eot_draws=2,
                   adv_steps=1, final_noise_steps=2, final_eot_draws=2)


def shared_dataset(name: str, split: str = "train") -> datasets.Dataset:
    path = SHARED / "datasets" / name
    if not path.is_dir():
        pytest.skip(f"{path} is not available")
    return datasets.load_dataset(str(path), split=split)


def random_image(mode: str, size: tuple[int, int], seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        return PIL.Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "P":
        img = PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
        return img.quantize(colors=64, method=PIL.Image.Quantize.MEDIANCUT)
    channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
    arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return PIL.Image.fromarray(arr[:, :, 0] if channels == 1 else arr, mode)


@pytest.fixture(scope="session")
def sample_ds():
    import uexamples as ue

    return ue.load_sample_dataset()


@pytest.fixture(scope="session")
def small_ds(sample_ds):
    """40 real CIFAR images, 4 per class."""
    labels = np.array(sample_ds["label"])
    idx = sorted(np.concatenate([np.where(labels == c)[0][:4] for c in range(10)]).tolist())
    return sample_ds.select(idx)


@pytest.fixture(scope="session")
def grey_sample_repo(tmp_path_factory):
    """A local dataset repository (parquet + README with a license) of 120 embedded images in mode L: a
    grayscale source for the CLI and publishing tests that needs nothing outside the package."""
    import uexamples as ue

    root = tmp_path_factory.mktemp("repos") / "cifar-grey"
    (root / "data").mkdir(parents=True)
    ds = ue.load_sample_dataset().select(range(120)).map(lambda r: {"image": r["image"].convert("L")})
    ds.to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    (root / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n\n# 120 CIFAR-10 images in grey\n")
    return root


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    path = tmp_path_factory.mktemp("vit")
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=3, architectures=["ViTForImageClassification"])
    torch.manual_seed(0)
    ViTForImageClassification(cfg).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.2, 0.2]).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
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


WORDS = ["dog", "cat", "man", "girl", "snow", "grass", "water", "red", "blue", "ball", "runs", "jumps"]


def captioned(n: int = 16, seed: int = 0, labels: bool = False) -> datasets.Dataset:
    """Random images of several sizes and modes, captions as lists (several per image) or strings, an extra column."""
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for i in range(n):
        h, w = (24, 32) if i % 3 else (40, 30)
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        images.append(PIL.Image.fromarray(arr).convert("L") if i % 5 == 0 else PIL.Image.fromarray(arr))
        words = [" ".join(rng.choice(WORDS, 4)) for _ in range(1 + i % 3)]
        captions.append(words if i % 2 else words[0] + " .")
    cols = {"image": images, "caption": [c if isinstance(c, list) else [c] for c in captions], "id": [f"img{i}" for i in range(n)]}
    if labels:
        cols["label"] = [i % 2 for i in range(n)]
    return datasets.Dataset.from_dict(cols).cast_column("image", datasets.Image())


@pytest.fixture(scope="session")
def tiny_clip_folder(tmp_path_factory):
    """A tiny random transformers CLIP saved in a folder with its tokenizer and processor (no download)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from uexamples.surrogates.contrastive import caption_tokenizer

    path = tmp_path_factory.mktemp("clip")
    tok = caption_tokenizer(captioned(16)["caption"])
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=32, pad_token_id=0, bos_token_id=2, eos_token_id=3)  # fmt: skip
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


def rename_saved_arrays(folder: Path, renames: dict[str, str]) -> None:
    """Rewrite a saved protector's arrays under other names, with the digest its save would have written
    (a protector saved by an older version)."""
    import json

    from safetensors.numpy import load_file, save_file

    from uexamples.core.protector import CONFIG_NAME, WEIGHTS_NAME, _digest

    arrays = load_file(str(folder / WEIGHTS_NAME))
    assert set(renames) <= set(arrays), sorted(arrays)
    save_file({renames.get(k, k): v for k, v in arrays.items()}, str(folder / WEIGHTS_NAME))
    state = json.loads((folder / CONFIG_NAME).read_text())
    state["integrity"] = _digest(state, (folder / WEIGHTS_NAME).read_bytes())
    (folder / CONFIG_NAME).write_text(json.dumps(state, indent=2, sort_keys=True))
