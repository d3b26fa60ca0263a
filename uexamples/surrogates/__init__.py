"""Surrogate models: built-in nets, transformers models (Hub id or folder), or any ``torch.nn.Module``.

Every surrogate is described by a small JSON-able dict (``desc``) so that a fitted protector can
rebuild its architecture offline and load the weights from safetensors.

>>> from uexamples.surrogates import build_surrogate
>>> model, desc = build_surrogate("smallcnn", num_classes=10)
>>> desc["kind"], desc["name"]
('builtin', 'smallcnn')
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .builtin import BUILTIN, CifarResNet, ResNet18, SmallConvNet
from .transformers_models import (
    PixelSpaceModel,
    SurrogateNotAvailable,
    load_transformers_surrogate,
    rebuild_transformers_surrogate,
    transformers_from_config,
)

SurrogateSpec = Any  # str (builtin name, Hub id, folder) | torch.nn.Module


def build_surrogate(spec: SurrogateSpec, num_classes: int, trust_remote_code: bool = False) -> tuple[nn.Module, dict]:
    """Instantiate a surrogate from ``spec`` and return ``(model, description)``."""
    if isinstance(spec, nn.Module):
        return spec, {"kind": "module", "class": f"{type(spec).__module__}.{type(spec).__qualname__}"}
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"surrogate must be a built-in name, a Hub id, a folder or a torch.nn.Module, got {spec!r}")
    if spec in BUILTIN:
        return BUILTIN[spec](num_classes), {"kind": "builtin", "name": spec, "num_classes": num_classes}
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
        return BUILTIN[desc["name"]](desc["num_classes"])
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


def state_arrays(model: nn.Module, prefix: str = "surrogate.") -> dict[str, np.ndarray]:
    """The model's state dict as numpy arrays (for safetensors and fingerprints)."""
    return {prefix + k: v.detach().cpu().contiguous().numpy().copy() for k, v in model.state_dict().items()}


def load_state_arrays(model: nn.Module, arrays: dict[str, np.ndarray], prefix: str = "surrogate.") -> nn.Module:
    state = {k[len(prefix) :]: torch.from_numpy(np.array(v)) for k, v in arrays.items() if k.startswith(prefix)}
    model.load_state_dict(state, strict=True)
    return model


__all__ = [
    "BUILTIN",
    "CifarResNet",
    "ResNet18",
    "SmallConvNet",
    "PixelSpaceModel",
    "SurrogateNotAvailable",
    "build_surrogate",
    "rebuild_surrogate",
    "state_arrays",
    "load_state_arrays",
    "transformers_from_config",
]
