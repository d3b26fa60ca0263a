"""transformers image models as surrogates, run in pixel space [0, 1].

Image processors are not differentiable, so resizing and normalisation happen in torch from the
processor's config (``image_mean``, ``image_std``, ``size``). Classification models keep their
head (re-initialised when the number of classes differs); encoders (ViT, the CLIP vision tower, any
``AutoModel``) get a linear head on their pooled features.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


class SurrogateNotAvailable(OSError):
    """A Hub model id or folder could not be loaded (offline, missing, or not an image model)."""


class PixelSpaceModel(nn.Module):
    """Wrap a transformers vision model: [0, 1] RGB in, class logits out."""

    def __init__(self, backbone: nn.Module, mean, std, size: tuple[int, int], num_classes: int, use_own_head: bool):
        super().__init__()
        self.backbone = backbone
        self.size = tuple(size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.use_own_head = use_own_head
        self.head = None if use_own_head else nn.Linear(_feature_dim(backbone.config), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        out = self.backbone(pixel_values=x)
        if self.use_own_head:
            return out.logits
        feats = getattr(out, "pooler_output", None)
        if feats is None:
            feats = getattr(out, "image_embeds", None)
        if feats is None:
            feats = out.last_hidden_state.mean(dim=1) if out.last_hidden_state.dim() == 3 else out.last_hidden_state
        feats = feats.flatten(1)
        return self.head(feats)


def _feature_dim(config) -> int:
    for name in ("hidden_size", "projection_dim"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    sizes = getattr(config, "hidden_sizes", None)
    if sizes:
        return int(sizes[-1])
    raise ValueError(f"cannot tell the feature size of a {type(config).__name__}")


def _processor_geometry(name: str, config, load_kwargs: dict) -> tuple[list, list, tuple[int, int]]:
    """Mean, std and input size from the image processor config, falling back to the model config."""
    mean, std, size = None, None, None
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(name, **load_kwargs)
        mean, std = getattr(proc, "image_mean", None), getattr(proc, "image_std", None)
        s = getattr(proc, "crop_size", None) or getattr(proc, "size", None)
        if isinstance(s, dict):
            if "height" in s:
                size = (int(s["height"]), int(s["width"]))
            elif "shortest_edge" in s:
                size = (int(s["shortest_edge"]),) * 2
        elif isinstance(s, int):
            size = (s, s)
    except Exception:  # no preprocessor_config.json: fall back to the model config
        pass
    vision = getattr(config, "vision_config", config)
    if size is None:
        image_size = getattr(vision, "image_size", 224)
        size = tuple(image_size) if isinstance(image_size, (list, tuple)) else (int(image_size),) * 2
    mean = list(mean) if mean is not None else [0.5, 0.5, 0.5]
    std = list(std) if std is not None else [0.5, 0.5, 0.5]
    return mean, std, size


def _pick_class(config) -> tuple[Any, bool]:
    """The transformers class to load and whether it carries its own classification head."""
    import transformers

    if config.model_type in ("clip", "clip_vision_model", "siglip", "siglip_vision_model"):
        cls = transformers.SiglipVisionModel if config.model_type.startswith("siglip") else transformers.CLIPVisionModel
        return cls, False
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForImageClassification") for a in archs):
        return transformers.AutoModelForImageClassification, True
    return transformers.AutoModel, False


def hub_kwargs(trust_remote_code: bool = False, revision: str | None = None) -> dict[str, Any]:
    """The ``from_pretrained`` arguments every model, config and processor load shares."""
    return {"trust_remote_code": trust_remote_code, **({"revision": revision} if revision else {})}


def load_config(name: str, load_kwargs: dict) -> Any:
    """A model's config by Hub id or folder; a clear error offline or for a missing model."""
    from transformers import AutoConfig

    from huggingface_hub import constants

    offline = bool(constants.HF_HUB_OFFLINE)  # huggingface_hub's own reading of HF_HUB_OFFLINE
    try:
        return AutoConfig.from_pretrained(name, **load_kwargs)
    except Exception as exc:
        hint = (
            " HF_HUB_OFFLINE is set, so only models already in the local cache or a local folder can be used."
            if offline
            else " Check the id, your network, or pass a local folder."
        )
        raise SurrogateNotAvailable(f"surrogate {name!r} could not be loaded: {exc.__class__.__name__}: {exc}.{hint}") from exc


def load_transformers_surrogate(
    name: str, num_classes: int, trust_remote_code: bool = False, revision: str | None = None
) -> tuple[PixelSpaceModel, dict]:
    """Load a transformers image model by Hub id or local folder; return the wrapper and its description."""
    load_kwargs = hub_kwargs(trust_remote_code, revision)
    config = load_config(name, load_kwargs)
    cls, own_head = _pick_class(config)
    kwargs = dict(load_kwargs, dtype=torch.float32)  # float32: we differentiate through the surrogate
    if own_head:
        kwargs.update(num_labels=num_classes, ignore_mismatched_sizes=True)
    try:
        backbone = cls.from_pretrained(name, **kwargs)
    except Exception as exc:
        raise SurrogateNotAvailable(f"surrogate {name!r} could not be loaded as {cls.__name__}: {exc}") from exc
    mean, std, size = _processor_geometry(name, config, load_kwargs)
    model = PixelSpaceModel(backbone, mean, std, size, num_classes, own_head)
    desc = {
        "kind": "transformers",
        "name": name,
        "class": type(backbone).__name__,
        "config": backbone.config.to_dict(),
        "mean": mean,
        "std": std,
        "size": list(size),
        "own_head": own_head,
        "num_classes": num_classes,
    }
    return model, desc


def rebuild_transformers_surrogate(desc: dict) -> PixelSpaceModel:
    """Rebuild the architecture from a saved description, offline (weights are loaded by the caller)."""
    import transformers

    cls = getattr(transformers, desc["class"])
    config = cls.config_class.from_dict(desc["config"])
    backbone = cls(config)
    return PixelSpaceModel(backbone, desc["mean"], desc["std"], tuple(desc["size"]), desc["num_classes"], desc["own_head"])


def transformers_from_config(config: Any, num_classes: int, resolution: int = 32) -> PixelSpaceModel:
    """A transformers image-classification model built from its config, with random weights.

    ``config``: a ``PretrainedConfig``, a dict with ``model_type``, or a Hub id / folder holding a
    config.json (only the config is read; no weights are downloaded). Pixels are normalised with
    mean = std = 0.5 and resized to the config's ``image_size`` when it has one.
    """
    import transformers

    if isinstance(config, dict):
        config = dict(config)
        config = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    elif isinstance(config, str):
        try:
            config = transformers.AutoConfig.from_pretrained(config)
        except Exception as exc:
            raise SurrogateNotAvailable(f"model config {config!r} could not be loaded: {exc}") from exc
    config.num_labels = num_classes
    model = transformers.AutoModelForImageClassification.from_config(config)
    image_size = getattr(config, "image_size", None) or resolution
    size = tuple(image_size) if isinstance(image_size, (list, tuple)) else (int(image_size),) * 2
    return PixelSpaceModel(model, [0.5] * 3, [0.5] * 3, size, num_classes, use_own_head=True)
