"""Surrogates as one shared layer: every method that works through a model uses this, never its own copy.

Two roles:

- :class:`Surrogate` (``role="classifier"``): a trainable classifier, built from a spec (built-in
  name, transformers Hub id or folder, or a ``torch.nn.Module``), trained by a method (EM/REM/SEM),
  saved as safetensors beside a small JSON description, rebuilt offline from that description.
- :class:`FeatureEncoder` (``role="encoder"``, from :func:`load_encoder`): a frozen pretrained
  encoder giving image features (CLIP ``get_image_features``, ViT/ResNet pooled output, any
  ``AutoModel`` with a pooled output, the pretrained CIFAR ResNets of ``shared/models``) and, for
  CLIP, text features.

Both take RGB pixels in [0, 1] at any size: resizing and normalisation happen inside, in torch, so
gradients reach the pixels. Both are placed on a device with ``.to(device)``.

>>> s = Surrogate.build("tinycnn", num_classes=10)
>>> s.desc["kind"], s.input_size
('builtin', None)
>>> arrays = s.state_arrays()
>>> again = Surrogate.rebuild(s.desc, arrays)
>>> bool(all((again.state_arrays()[k] == v).all() for k, v in arrays.items()))
True
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .builtin import BUILTIN, WIDTHS, CifarResNet
from .transformers_models import (
    SurrogateNotAvailable,
    load_transformers_surrogate,
    rebuild_transformers_surrogate,
)

PREFIX = "surrogate."


def to_fast_layout(model: nn.Module) -> nn.Module:
    """channels_last: 1.4-1.6x faster convolutions on CPU (measured in benchmarks/speed.py)."""
    return model.to(memory_format=torch.channels_last)


def spec_as_config(spec: Any) -> tuple[Any, nn.Module | None]:
    """A surrogate spec as a config value (JSON-able) and the module instance, if one was given."""
    if isinstance(spec, nn.Module):
        return f"module:{type(spec).__module__}.{type(spec).__qualname__}", spec
    return spec, None


def check_surrogate_width(spec: Any, width: Any) -> None:
    """A width (positive int) is only for the built-in conv nets of ``WIDTHS``; None is always fine. Called by
    :func:`build_surrogate` and by the min-min config, so a bad ``surrogate_width`` fails at construction."""
    if width is not None and (spec not in WIDTHS or isinstance(width, bool) or not isinstance(width, int) or width < 1):
        raise ValueError(f"surrogate_width (a positive int) applies to the built-in nets {sorted(WIDTHS)} only; got "
                         f"surrogate {spec!r} with width {width!r}")  # fmt: skip


def build_surrogate(spec: Any, num_classes: int, trust_remote_code: bool = False,
                    width: int | None = None) -> tuple[nn.Module, dict]:  # fmt: skip
    """Instantiate a classifier from ``spec`` and return ``(model, description)``; ``width`` sets the first
    stage's channels of a built-in conv net (``WIDTHS``; None: the net's own)."""
    check_surrogate_width(spec, width)
    if isinstance(spec, nn.Module):
        return spec, {"kind": "module", "class": f"{type(spec).__module__}.{type(spec).__qualname__}"}
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"surrogate must be a built-in name, a Hub id, a folder or a torch.nn.Module, got {spec!r}")
    if spec in BUILTIN:
        desc = {"kind": "builtin", "name": spec, "num_classes": num_classes}
        if width is None:
            return BUILTIN[spec](num_classes), desc
        return BUILTIN[spec](num_classes, width=width), {**desc, "width": width}
    if os.path.isdir(spec) or "/" in spec:
        return load_transformers_surrogate(spec, num_classes, trust_remote_code=trust_remote_code)
    raise ValueError(
        f"unknown surrogate {spec!r}: use one of {sorted(BUILTIN)}, a Hub model id (user/model), a local folder, "
        "or pass a torch.nn.Module"
    )


def rebuild_surrogate(desc: dict, module: nn.Module | None = None) -> nn.Module:
    """Rebuild the architecture described by ``desc`` (without weights)."""
    kind = desc.get("kind")
    if kind == "builtin":
        return BUILTIN[desc["name"]](desc["num_classes"], **({"width": desc["width"]} if "width" in desc else {}))
    if kind == "transformers":
        return rebuild_transformers_surrogate(desc)
    if kind == "module":
        if module is None:
            raise ValueError(
                f"this protector was fitted with a custom torch.nn.Module ({desc['class']}); "
                "pass an instance of it again: from_pretrained(path, surrogate=MyNet())"
            )
        return module
    raise ValueError(f"unknown surrogate description {desc!r}")


def state_arrays(model: nn.Module, prefix: str = PREFIX) -> dict[str, np.ndarray]:
    """The model's state dict as numpy arrays (for safetensors and fingerprints)."""
    return {prefix + k: v.detach().cpu().contiguous().numpy().copy() for k, v in model.state_dict().items()}


def load_state_arrays(model: nn.Module, arrays: dict[str, np.ndarray], prefix: str = PREFIX) -> nn.Module:
    state = {k[len(prefix) :]: torch.from_numpy(np.array(v)) for k, v in arrays.items() if k.startswith(prefix)}
    model.load_state_dict(state, strict=True)
    return model


class Surrogate:
    """A trainable classifier in pixel space, with what it takes to save and rebuild it.

    ``model`` is the ``nn.Module`` (RGB [0, 1] in, logits out); ``desc`` a JSON-able description that
    rebuilds the architecture offline. Weights travel as arrays named ``surrogate.<param>``.
    """

    role = "classifier"

    def __init__(self, model: nn.Module, desc: dict) -> None:
        self.model = model
        self.desc = desc

    @classmethod
    def build(cls, spec: Any, num_classes: int, trust_remote_code: bool = False, width: int | None = None) -> "Surrogate":
        model, desc = build_surrogate(spec, num_classes, trust_remote_code=trust_remote_code, width=width)
        return cls(model, desc)

    @classmethod
    def rebuild(cls, desc: dict, arrays: dict[str, np.ndarray] | None = None, module: nn.Module | None = None) -> "Surrogate":
        model = rebuild_surrogate(desc, module)
        if arrays is not None:
            load_state_arrays(model, arrays)
        return cls(model, desc)

    @property
    def input_size(self) -> int | None:
        """The side the model was made for (transformers: its processor's size); None: any size."""
        return int(self.desc["size"][0]) if self.desc.get("kind") == "transformers" else None

    def to(self, device: torch.device | str) -> "Surrogate":
        self.model = to_fast_layout(self.model.to(device))
        return self

    def state_arrays(self) -> dict[str, np.ndarray]:
        return state_arrays(self.model)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


# ---------------------------------------------------------------------------------------- encoders
def _first_tensor(out: Any) -> torch.Tensor:
    """transformers 5 returns output objects from get_*_features; older versions a tensor."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    hidden = out.last_hidden_state
    return hidden.mean(dim=1) if hidden.dim() == 3 else hidden.mean(dim=(2, 3))


class FeatureEncoder(nn.Module):
    """A frozen encoder: RGB [0, 1] images of any size in, (B, D) features out; CLIP also encodes texts."""

    role = "encoder"

    def __init__(self, backbone: nn.Module, kind: str, mean, std, size: tuple[int, int] | None,
                 desc: dict, tokenizer: Any = None) -> None:  # fmt: skip
        super().__init__()
        self.backbone = backbone
        self.kind = kind  # "clip", "transformers", "transformers-first-token" or "cifar-resnet"
        self.size = tuple(size) if size else None
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.desc = desc
        self.tokenizer = tokenizer
        self.requires_grad_(False)
        self.eval()

    @property
    def input_size(self) -> int | None:
        return self.size[0] if self.size else None

    @property
    def has_text(self) -> bool:
        return self.kind == "clip"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_images(x)

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) image features; differentiable with respect to ``x``."""
        if self.size and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        if self.kind in ("cifar-resnet", "module-features"):  # take [0, 1] pixels (built-in nets normalise inside)
            return self.backbone.features(x)
        x = (x - self.mean) / self.std
        if self.kind == "clip":
            return _first_tensor(self.backbone.get_image_features(pixel_values=x))
        if self.kind == "transformers-first-token":  # no trained pooler in the checkpoint
            return self.backbone(pixel_values=x).last_hidden_state[:, 0]
        return _first_tensor(self.backbone(pixel_values=x)).flatten(1)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, D) text features of a CLIP encoder (in the same space as its image features)."""
        if not self.has_text:
            raise ValueError(f"the {self.kind} encoder {self.desc.get('name')!r} has no text tower (use a CLIP model)")
        if self.tokenizer is None:
            raise ValueError(f"no tokenizer was found with {self.desc.get('name')!r}: save one beside the model")
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        tokens = {k: v.to(self.mean.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return _first_tensor(self.backbone.get_text_features(**tokens))


def _cifar_resnet_weights(path: Path) -> Path | None:
    """The safetensors file of a pretrained CIFAR ResNet at ``path`` (a file, or a folder holding one)."""
    if path.is_file() and path.suffix == ".safetensors":
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return files[0]
        if len(files) > 1:
            raise ValueError(f"{path} holds several weight files {[f.name for f in files]}: name one of them")
    return None


def _load_cifar_resnet(weights: Path) -> FeatureEncoder:
    from safetensors.torch import load_file

    state = load_file(str(weights))
    blocks = {k.split(".")[1] for k in state if k.startswith("layer1.")}
    if "conv1.weight" not in state or not blocks:
        raise SurrogateNotAvailable(f"{weights} is not a CIFAR ResNet (option A) state dict")
    depth = 6 * len(blocks) + 2
    model = CifarResNet(depth, num_classes=state["linear.weight"].shape[0])
    model.load_state_dict(state, strict=True)
    desc = {"kind": "cifar-resnet", "name": str(weights), "depth": depth, "num_classes": model.linear.out_features,
            "dim": 64}  # fmt: skip
    return FeatureEncoder(model, "cifar-resnet", [0.0] * 3, [1.0] * 3, None, desc)


# Encoders shipped in the package, by name (no download: they work on a fresh machine).
DEFAULT_ENCODER = "uexamples/cifar-resnet20"
BUILTIN_ENCODERS = {
    # CIFAR ResNet-20 trained by tools/train_default_encoder.py on the CIFAR-10 train set (cifar10-jpeg)
    DEFAULT_ENCODER: Path(__file__).resolve().parents[1] / "data" / "encoders" / "uexamples-cifar-resnet20.safetensors",
}


def load_encoder(spec: Any, trust_remote_code: bool = False, revision: str | None = None) -> FeatureEncoder:
    """A frozen feature encoder from a Hub id, a folder, a CIFAR ResNet weights file, or an ``nn.Module``.

    ``"uexamples/cifar-resnet20"`` (:data:`DEFAULT_ENCODER`) is shipped in the package (no download).
    transformers models: CLIP (``CLIPModel``: image and text features, tokenizer from the same place),
    ViT, ResNet, or any ``AutoModel`` with a pooled output. A module must map [0, 1] RGB to features.
    """
    if isinstance(spec, FeatureEncoder):
        return spec
    if isinstance(spec, nn.Module):
        desc = {"kind": "module", "class": f"{type(spec).__module__}.{type(spec).__qualname__}"}
        return FeatureEncoder(_ModuleFeatures(spec), "module-features", [0.0] * 3, [1.0] * 3, None, desc)
    if not isinstance(spec, (str, os.PathLike)) or not str(spec):
        raise TypeError(f"encoder must be a Hub id, a folder, a weights file or a torch.nn.Module, got {spec!r}")
    if str(spec) in BUILTIN_ENCODERS:
        encoder = _load_cifar_resnet(BUILTIN_ENCODERS[str(spec)])
        encoder.desc["name"] = str(spec)  # saved by name: a loaded protector finds it in any install
        return encoder
    weights = _cifar_resnet_weights(Path(spec))
    if weights is not None:
        return _load_cifar_resnet(weights)
    return _load_transformers_encoder(str(spec), trust_remote_code, revision)


def rebuild_encoder(desc: dict, module: nn.Module | None = None) -> FeatureEncoder:
    """The encoder a saved description names (after unpickling or loading): frozen encoders are not
    trained, so they are loaded again from their Hub id, folder or weights file (a module is passed again)."""
    if desc.get("kind") == "module":
        if module is None:
            raise ValueError(f"this protector used a custom encoder module ({desc['class']}); pass an instance again")
        return load_encoder(module)
    return load_encoder(desc["name"])


class _ModuleFeatures(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x).flatten(1)


def _load_transformers_encoder(name: str, trust_remote_code: bool, revision: str | None) -> FeatureEncoder:
    import transformers

    from .transformers_models import _processor_geometry, hub_kwargs, load_config

    kwargs = hub_kwargs(trust_remote_code, revision)
    config = load_config(name, kwargs)
    if config.model_type == "clip":
        cls, kind = transformers.CLIPModel, "clip"
    elif config.model_type == "clip_vision_model":
        cls, kind = transformers.CLIPVisionModel, "transformers"
    else:
        cls, kind = transformers.AutoModel, "transformers"
    try:
        backbone, info = cls.from_pretrained(name, dtype=torch.float32, output_loading_info=True, **kwargs)
    except Exception as exc:
        raise SurrogateNotAvailable(f"encoder {name!r} could not be loaded as {cls.__name__}: {exc}") from exc
    missing = sorted(info.get("missing_keys") or [])
    # A checkpoint saved from a classification head has no pooler: a freshly drawn one would give other
    # features at every load, so the first token of the last hidden state is used instead.
    no_pooler = bool(missing) and all(k.startswith("pooler.") for k in missing)
    if missing and not no_pooler:
        raise SurrogateNotAvailable(f"encoder {name!r} lacks trained weights for {missing[:4]}: its features would be random")
    mean, std, size = _processor_geometry(name, config, kwargs)
    tokenizer = None
    if kind == "clip":
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(name, **kwargs)
        except Exception:  # an image-only use of CLIP needs none; encode_texts says so
            tokenizer = None
    if no_pooler:
        kind = "transformers-first-token"
    desc = {"kind": "transformers-encoder", "name": name, "class": type(backbone).__name__, "model_type": config.model_type,
            "mean": mean, "std": std, "size": list(size)}  # fmt: skip
    return FeatureEncoder(backbone, kind, mean, std, size, desc, tokenizer)
