"""Surrogate models, one shared layer for every method (see ``layer.py``).

- classifiers (:class:`Surrogate`): built-in nets, transformers image models (Hub id or folder), or
  any ``torch.nn.Module``; trained by the min-min methods, saved and rebuilt offline;
- frozen encoders (:func:`load_encoder`): CLIP image and text features, ViT/ResNet/``AutoModel``
  pooled features, and the pretrained CIFAR ResNets of ``shared/models`` by weights file.

>>> from uexamples.surrogates import build_surrogate
>>> model, desc = build_surrogate("smallcnn", num_classes=10)
>>> desc["kind"], desc["name"]
('builtin', 'smallcnn')
"""

from __future__ import annotations

from typing import Any

from .builtin import BUILTIN, CifarResNet, ResNet18, SmallConvNet
from .layer import (
    FeatureEncoder,
    Surrogate,
    build_surrogate,
    load_encoder,
    load_state_arrays,
    rebuild_encoder,
    rebuild_surrogate,
    spec_as_config,
    state_arrays,
    to_fast_layout,
)
from .transformers_models import PixelSpaceModel, SurrogateNotAvailable, transformers_from_config

SurrogateSpec = Any  # str (builtin name, Hub id, folder) | torch.nn.Module

__all__ = [
    "BUILTIN",
    "CifarResNet",
    "ResNet18",
    "SmallConvNet",
    "FeatureEncoder",
    "PixelSpaceModel",
    "Surrogate",
    "SurrogateNotAvailable",
    "build_surrogate",
    "load_encoder",
    "rebuild_encoder",
    "rebuild_surrogate",
    "spec_as_config",
    "state_arrays",
    "load_state_arrays",
    "to_fast_layout",
    "transformers_from_config",
]
