"""CUDA: convolution-based unlearnable datasets (Sadasivan et al., CVPR 2023). Model-free and keyed.

Each class ``c`` gets a private 3x3 filter (weights ~ U(0, 0.3), one tap set to 1.0 at a random
position), the same filter on every colour channel. A protected image is ``conv_c(x) / max(conv_c(x))``
at the image's own resolution. There is no L-inf bound: the blur is the protection.

The private key seeds the filters. It is never written to a saved config, a log or a card: a
salted, slow hash of it (``key_fingerprint``) is stored instead, and the user supplies the key again to
re-create the same filters.

>>> import uexamples as ue
>>> protect = ue.CUDAProtect(key=20231101, num_classes=10)
>>> protect.filters.shape
(10, 3, 3)
>>> "20231101" in repr(protect)
False
"""

from __future__ import annotations

import dataclasses
import hashlib
import numbers
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..core.images import NativeImage
from ..core.protector import ProtectorConfig, Protector
from ..core.registry import register_method


def key_fingerprint(key: int) -> str:
    """A salted PBKDF2 hash of the key: lets a saved protector check a key without storing it."""
    digest = hashlib.pbkdf2_hmac("sha256", str(int(key)).encode(), b"uexamples-cuda-key-v1", 200_000)
    return digest[:12].hex()


def check_key(key: Any) -> int:
    if isinstance(key, bool) or not isinstance(key, numbers.Integral):
        raise TypeError(f"the CUDA key must be an integer (a private seed), got a {type(key).__name__}")
    return int(key)


def make_filters(key: int, num_classes: int, kernel_size: int = 3, max_weight: float = 0.3) -> np.ndarray:
    """The (num_classes, k, k) filters of a key; class c's filter does not depend on num_classes."""
    gen = torch.Generator().manual_seed(check_key(key) % (2**63))
    filters = []
    for _ in range(num_classes):
        w = torch.rand(kernel_size * kernel_size, generator=gen) * max_weight
        w[int(torch.randint(0, kernel_size * kernel_size, (1,), generator=gen))] = 1.0
        filters.append(w.view(kernel_size, kernel_size))
    return torch.stack(filters).numpy()


@dataclasses.dataclass
class CUDAConfig(ProtectorConfig):
    """key: the private integer key (secret; never saved). num_classes: known classes (else read at fit).

    kernel_size and max_weight follow the paper (3 and 0.3). ``epsilon`` is None: CUDA is unbounded.
    A larger filter protects more and blurs more: on cifar10-10k k=5 brings our CPU victim from 33 % to
    about 20 % at PSNR 17 dB (benchmarks/README.md, "CUDA's strength against its visibility").
    """

    epsilon: float | None = None
    key: int | None = None
    num_classes: int | None = None
    kernel_size: int = 3
    max_weight: float = 0.3
    key_fingerprint: str | None = None


@register_method
class CUDAProtect(Protector):
    """Class-wise keyed 3x3 blur filters, applied to whole batches as one grouped convolution."""

    method = "cuda"
    config_class = CUDAConfig
    needs_fit = True  # to learn the number of classes, unless num_classes is given
    needs_labels = True
    PRESETS = {"paper": {}, "fast": {}}
    SECRET_FIELDS = ("key",)

    def __init__(self, preset: str = "fast", **kwargs: Any) -> None:
        if "key" not in kwargs or kwargs["key"] is None:
            raise ValueError("CUDAProtect needs a private integer key: CUDAProtect(key=...) (keep it secret)")
        kwargs["key"] = check_key(kwargs["key"])
        if kwargs.get("epsilon") is not None:
            raise ValueError("CUDA has no L-inf bound; leave epsilon unset")
        super().__init__(preset=preset, **kwargs)
        self.config.key_fingerprint = key_fingerprint(self.config.key)
        if self.config.num_classes is not None:
            self.num_classes = int(self.config.num_classes)
            self._build_filters()
            self.fitted = True

    @property
    def filters(self) -> np.ndarray:
        return self._runtime["filters"]

    def _build_filters(self) -> None:
        cfg = self.config
        self._runtime["filters"] = make_filters(cfg.key, self.num_classes, cfg.kernel_size, cfg.max_weight)

    def _fit(self, dataset, columns, progress) -> None:
        self.config.num_classes = self.num_classes
        self._build_filters()

    # The filters travel to worker processes (and into the datasets fingerprint), never to disk.
    def _fitted_arrays(self) -> dict[str, np.ndarray]:
        return {"filters": self.filters}

    def _saved_arrays(self) -> dict[str, np.ndarray]:
        return {}

    def _load_fitted(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        if "filters" in arrays:
            self._runtime["filters"] = np.array(arrays["filters"])
        else:
            self._build_filters()

    def _accept_runtime_kwargs(self, kwargs: dict[str, Any], state: dict[str, Any]) -> None:
        key = kwargs.pop("key", None)
        if key is None:
            raise ValueError("a saved CUDA protector does not contain its key: from_pretrained(path, key=...)")
        key = check_key(key)
        if key_fingerprint(key) != self.config.key_fingerprint:
            raise ValueError("wrong key: it does not match the key fingerprint this protector was saved with")
        self.config.key = key
        super()._accept_runtime_kwargs(kwargs, state)

    def protect_colors(self, images: list[NativeImage], labels: list[int] | None) -> list[np.ndarray]:
        filters = torch.from_numpy(self.filters)
        k = filters.shape[-1]
        out: list[np.ndarray | None] = [None] * len(images)
        groups: dict[tuple, list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(img.color.shape, []).append(i)
        for shape, idx in groups.items():  # one grouped convolution per image shape
            c, h, w = shape
            x = torch.from_numpy(np.stack([images[i].color for i in idx]))  # (B, C, H, W)
            weight = filters[torch.tensor([labels[i] for i in idx])]  # (B, k, k)
            weight = weight[:, None].repeat_interleave(c, dim=0)  # (B*C, 1, k, k), the same filter per channel
            y = F.conv2d(x.reshape(1, -1, h, w), weight, padding=k // 2, groups=len(idx) * c).reshape(len(idx), c, h, w)
            peak = y.amax(dim=(1, 2, 3), keepdim=True)
            y = torch.where(peak > 0, y / peak.clamp_min(1e-12), y)
            for j, i in enumerate(idx):
                out[i] = y[j].numpy()
        return out  # type: ignore[return-value]
