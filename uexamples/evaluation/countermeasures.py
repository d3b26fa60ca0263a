"""What an attacker does to beat the protection, applied when training a victim.

Every countermeasure keeps the standard random crop + flip of victim training and adds its own
step. Two kinds:

* **preprocessing** of the training images, once, before training (image shortcut squeezing and
  friends): ``grayscale``, ``jpeg:Q``, ``bitdepth:B``, ``blur:SIGMA``, and ``frame:LEVEL`` (the dark
  field around a scan set to black, as medical pipelines mask the field of view). The test images stay as they
  are, as in the papers' evaluation code.
* **preprocessing that reads the labels**: ``orthogonal`` (Sandoval-Segura et al., NeurIPS 2023: fit a
  linear classifier to the protected training set and project its class directions out of every
  training image; it removes shortcuts that a linear model finds, such as class-wise patterns).
* **training procedures**: ``cutout:SIZE``, ``mixup:ALPHA``, ``adv:RADIUS`` (PGD adversarial
  training), and ``partial:FRACTION`` (only that fraction of the training set is protected; needs
  the clean set).

Spelled as strings, ``"name"`` or ``"name:value"`` with optional ``,key=value`` extras::

    >>> parse_countermeasure("jpeg:10")
    JPEG(quality=10)
    >>> parse_countermeasure("adv:8/255,steps=5")
    AdversarialTraining(radius=0.03137254901960784, steps=5, step_size=None)
    >>> [c.name for c in parse_countermeasures("standard,grayscale")]
    ['standard', 'grayscale']
"""

from __future__ import annotations

import dataclasses
import io
import math
from fractions import Fraction
from typing import Any, Callable, ClassVar, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from ..core.regions import dark_frame


class CountermeasureError(ValueError):
    """An unknown countermeasure or a bad parameter."""


@dataclasses.dataclass
class Countermeasure:
    """Base: standard training (random crop + flip), nothing else."""

    name: ClassVar[str] = "standard"
    needs_clean: ClassVar[bool] = False

    @property
    def label(self) -> str:
        """Short name with its parameters, for reports: ``jpeg:10``, ``adv:8/255``."""
        return self.name

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Applied once to the (N, 3, H, W) training images in [0, 1]."""
        return x

    def preprocess_labelled(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Applied once to the training images with their labels (what the victim calls); ``preprocess`` by default."""
        return self.preprocess(x)

    def preprocess_test(self, x: torch.Tensor) -> torch.Tensor:
        """Applied to the test images after the training set was preprocessed; unchanged by default (the papers'
        evaluation code preprocesses the training images only)."""
        return x

    def mix_training_set(self, protected: torch.Tensor, clean: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
        """The training images the victim sees (``partial`` mixes in clean images)."""
        return protected

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, gen: torch.Generator) -> torch.Tensor:
        """Training loss of one (already cropped and flipped) batch."""
        return F.cross_entropy(model(x), y)

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return f"{type(self).__name__}({fields})"


@dataclasses.dataclass(repr=False)
class Grayscale(Countermeasure):
    """ITU-R 601 luma, replicated to three channels (ISS's grayscale squeezing)."""

    name: ClassVar[str] = "grayscale"

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        luma = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
        return luma.expand_as(x).contiguous()


@dataclasses.dataclass(repr=False)
class JPEG(Countermeasure):
    """Re-encode every training image as JPEG at ``quality`` (ISS uses 10) and decode it."""

    name: ClassVar[str] = "jpeg"
    quality: int = 10

    def __post_init__(self) -> None:
        if not 1 <= int(self.quality) <= 95:
            raise CountermeasureError(f"jpeg quality must be in [1, 95], got {self.quality}")
        self.quality = int(self.quality)

    @property
    def label(self) -> str:
        return f"jpeg:{self.quality}"

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        levels = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        out = np.empty_like(levels)
        for i, img in enumerate(levels):  # the codec works one image at a time
            out[i] = np.asarray(jpeg_round_trip(Image.fromarray(img), self.quality))
        return torch.from_numpy(out).permute(0, 3, 1, 2).float().div(255).contiguous()


def jpeg_round_trip(image: Image.Image, quality: int) -> Image.Image:
    """``image`` saved as JPEG at ``quality`` (PIL's libjpeg) and decoded again, in its own mode."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert(image.mode)


@dataclasses.dataclass(repr=False)
class BitDepth(Countermeasure):
    """Keep ``bits`` bits per channel (bit-depth reduction, as in ISS and feature squeezing)."""

    name: ClassVar[str] = "bitdepth"
    bits: int = 2

    def __post_init__(self) -> None:
        if not 1 <= int(self.bits) <= 7:
            raise CountermeasureError(f"bitdepth bits must be in [1, 7], got {self.bits}")
        self.bits = int(self.bits)

    @property
    def label(self) -> str:
        return f"bitdepth:{self.bits}"

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        top = 2**self.bits - 1
        return (x * top).round() / top


@dataclasses.dataclass(repr=False)
class Blur(Countermeasure):
    """Gaussian blur of standard deviation ``sigma`` pixels (kernel 2*ceil(2 sigma)+1, reflect padding)."""

    name: ClassVar[str] = "blur"
    sigma: float = 1.0

    def __post_init__(self) -> None:
        if not float(self.sigma) > 0:
            raise CountermeasureError(f"blur sigma must be > 0, got {self.sigma}")
        self.sigma = float(self.sigma)

    @property
    def label(self) -> str:
        return f"blur:{self.sigma:g}"

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        half = math.ceil(2 * self.sigma)
        ax = torch.arange(-half, half + 1, dtype=x.dtype)
        k = torch.exp(-(ax**2) / (2 * self.sigma**2))
        k = k / k.sum()
        c = x.shape[1]
        xp = F.pad(x, (half, half, half, half), mode="reflect")
        out = F.conv2d(xp, k.view(1, 1, 1, -1).expand(c, 1, 1, -1).contiguous(), groups=c)
        return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1).contiguous(), groups=c)


@dataclasses.dataclass(repr=False)
class Frame(Countermeasure):
    """Set an image's dark frame (``core.regions.dark_frame``: grey level at most ``level``, joined to the
    border, through all four corners) to black: the field-of-view masking of medical pipelines (the
    field around a fundus disc), which wipes whatever noise was hidden there. The rest is kept."""

    name: ClassVar[str] = "frame"
    level: float = 20 / 255

    def __post_init__(self) -> None:
        if not 0 < float(self.level) < 1:
            raise CountermeasureError(f"frame level must be in (0, 1), got {self.level}")
        self.level = float(self.level)

    @property
    def label(self) -> str:
        return f"frame:{round(self.level * 255)}/255"

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        background = dark_frame(x, self.level)
        return x.masked_fill(background.unsqueeze(1), 0.0)


@dataclasses.dataclass(repr=False)
class Cutout(Countermeasure):
    """Zero a random ``size`` x ``size`` square (centre anywhere, clipped at the border) per image."""

    name: ClassVar[str] = "cutout"
    size: int = 16

    def __post_init__(self) -> None:
        if int(self.size) < 1:
            raise CountermeasureError(f"cutout size must be >= 1, got {self.size}")
        self.size = int(self.size)

    @property
    def label(self) -> str:
        return f"cutout:{self.size}"

    def apply(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        top = torch.randint(0, h, (n, 1, 1), generator=gen) - self.size // 2
        left = torch.randint(0, w, (n, 1, 1), generator=gen) - self.size // 2
        rows = torch.arange(h).view(1, h, 1)
        cols = torch.arange(w).view(1, 1, w)
        inside = (rows >= top) & (rows < top + self.size) & (cols >= left) & (cols < left + self.size)
        return x * (~inside).unsqueeze(1).to(device=x.device, dtype=x.dtype)

    def loss(self, model, x, y, num_classes, gen):
        return F.cross_entropy(model(self.apply(x, gen)), y)


@dataclasses.dataclass(repr=False)
class Mixup(Countermeasure):
    """Mixup (Zhang et al. 2018): convex pairs within the batch, lambda ~ Beta(alpha, alpha)."""

    name: ClassVar[str] = "mixup"
    alpha: float = 1.0

    def __post_init__(self) -> None:
        if not float(self.alpha) > 0:
            raise CountermeasureError(f"mixup alpha must be > 0, got {self.alpha}")
        self.alpha = float(self.alpha)

    @property
    def label(self) -> str:
        return f"mixup:{self.alpha:g}"

    def mix(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, gen: torch.Generator):
        """Mixed images and soft targets."""
        # lambda ~ Beta(alpha, alpha) from a numpy generator seeded by the run's torch generator
        seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        lam = float(np.random.default_rng(seed).beta(self.alpha, self.alpha))
        perm = torch.randperm(x.shape[0], generator=gen)
        target = F.one_hot(y, num_classes).float()
        return lam * x + (1 - lam) * x[perm], lam * target + (1 - lam) * target[perm]

    def loss(self, model, x, y, num_classes, gen):
        xm, target = self.mix(x, y, num_classes, gen)
        return torch.sum(-target * F.log_softmax(model(xm), dim=1), dim=1).mean()


@dataclasses.dataclass(repr=False)
class AdversarialTraining(Countermeasure):
    """PGD adversarial training (Madry et al.) within L-inf ``radius``; the papers use 4/255 and 8/255.

    ``steps`` PGD steps of ``step_size`` (default radius/4) from a random start, on every batch.
    """

    name: ClassVar[str] = "adv"
    radius: float = 8 / 255
    steps: int = 10
    step_size: float | None = None

    def __post_init__(self) -> None:
        self.radius = float(self.radius)
        self.steps = int(self.steps)
        if not 0 < self.radius <= 1:
            raise CountermeasureError(f"adv radius must be in (0, 1], got {self.radius}")
        if self.steps < 1:
            raise CountermeasureError(f"adv steps must be >= 1, got {self.steps}")

    @property
    def label(self) -> str:
        levels = self.radius * 255
        rad = f"{levels:g}/255" if abs(levels - round(levels)) < 1e-6 else f"{self.radius:g}"
        return f"adv:{rad}" + (f",steps={self.steps}" if self.steps != 10 else "")

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        step = self.step_size or self.radius / 4
        was_training = model.training
        model.eval()  # BN statistics are not updated by the attack
        r = (torch.rand(x.shape, generator=gen).to(x.device) * 2 - 1) * self.radius
        for _ in range(self.steps):
            r.requires_grad_(True)
            loss = F.cross_entropy(model((x + r).clamp(0, 1)), y)
            (g,) = torch.autograd.grad(loss, r)
            r = (r.detach() + step * g.sign()).clamp(-self.radius, self.radius)
        model.train(was_training)
        return (x + r).clamp(0, 1).detach()

    def loss(self, model, x, y, num_classes, gen):
        return F.cross_entropy(model(self.attack(model, x, y, gen)), y)


@dataclasses.dataclass(repr=False)
class PartialProtection(Countermeasure):
    """Only ``fraction`` of the training set is protected (a seeded random subset); the rest is clean."""

    name: ClassVar[str] = "partial"
    needs_clean: ClassVar[bool] = True
    fraction: float = 0.5

    def __post_init__(self) -> None:
        self.fraction = float(self.fraction)
        if not 0 <= self.fraction <= 1:
            raise CountermeasureError(f"partial fraction must be in [0, 1], got {self.fraction}")

    @property
    def label(self) -> str:
        return f"partial:{self.fraction:g}"

    def mix_training_set(self, protected, clean, gen):
        if clean is None:
            raise CountermeasureError("partial protection needs the clean training set (clean=...)")
        n = protected.shape[0]
        keep = torch.randperm(n, generator=gen)[: round(self.fraction * n)]
        mask = torch.zeros(n, dtype=torch.bool)
        mask[keep] = True
        return torch.where(mask[:, None, None, None], protected, clean)


@dataclasses.dataclass(repr=False)
class OrthogonalProjection(Countermeasure):
    """Orthogonal projection (Sandoval-Segura et al., *What Can We Learn from Unlearnable Datasets?*, NeurIPS 2023).

    A bias-free linear softmax classifier is fitted to the flattened protected training images in [0, 1]
    (as the authors' code does: SGD at ``lr`` 0.1 for ``epochs``, x0.1 at half and three quarters of them;
    batch 256, seeded here); the span of its class weight vectors is projected out of every training image,
    x - Q Q^T x with Q an orthonormal basis of that span. A shortcut a linear model can read (class-wise
    patterns above all) lies in that span and is removed. The test images stay as they are (the authors'
    default) or, with ``test=1`` (their ``--project-test``), are projected the same way: a victim trained
    without any variation along those directions may misread test images that still have it. The projected
    images are not clipped to [0, 1] (clipping would put part of the span back).
    """

    name: ClassVar[str] = "orthogonal"
    epochs: int = 20
    lr: float = 0.1
    test: int = 0

    def __post_init__(self) -> None:
        self.epochs = int(self.epochs)
        self.lr = float(self.lr)
        if self.epochs < 1:
            raise CountermeasureError(f"orthogonal epochs must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise CountermeasureError(f"orthogonal lr must be > 0, got {self.lr}")
        if self.test not in (0, 1):
            raise CountermeasureError(f"orthogonal test must be 0 or 1, got {self.test}")
        self.test = int(self.test)
        self._directions: torch.Tensor | None = None

    @property
    def label(self) -> str:
        return "orthogonal" + (f",epochs={self.epochs}" if self.epochs != 20 else "") + (",test=1" if self.test else "")

    def class_directions(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """(features, classes) orthonormal basis of the fitted linear classifier's weight vectors."""
        flat = x.reshape(len(x), -1)
        classes = int(y.max()) + 1
        linear = nn.Linear(flat.shape[1], classes, bias=False)
        with torch.no_grad():  # seeded initialisation (nn.Linear's own draws use the global generator)
            linear.weight.copy_((torch.rand(linear.weight.shape, generator=gen) * 2 - 1) / math.sqrt(flat.shape[1]))
        opt = torch.optim.SGD(linear.parameters(), lr=self.lr)
        decay = torch.optim.lr_scheduler.MultiStepLR(opt, [self.epochs // 2, self.epochs * 3 // 4])
        for _ in range(self.epochs):
            order = torch.randperm(len(flat), generator=gen)
            for i in range(0, len(flat), 256):
                idx = order[i : i + 256]
                loss = F.cross_entropy(linear(flat[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            decay.step()
        q, _ = torch.linalg.qr(linear.weight.detach().T)  # reduced QR: (features, classes)
        return q

    def preprocess_labelled(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        self._directions = self.class_directions(x, y.long(), gen)
        return self._project(x)

    def preprocess_test(self, x: torch.Tensor) -> torch.Tensor:
        if not self.test:
            return x
        if self._directions is None:
            raise CountermeasureError("orthogonal,test=1 projects the test images along the training set's directions: "
                                      "preprocess the training set first")  # fmt: skip
        return self._project(x)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        q = self._directions
        flat = x.reshape(len(x), -1)
        return (flat - (flat @ q) @ q.T).reshape_as(x).contiguous()


COUNTERMEASURES: dict[str, type[Countermeasure]] = {
    c.name: c for c in (Countermeasure, Grayscale, JPEG, BitDepth, Blur, Frame, Cutout, Mixup, AdversarialTraining, PartialProtection,
                        OrthogonalProjection)  # fmt: skip
}
_MAIN_PARAMETER = {"jpeg": "quality", "bitdepth": "bits", "blur": "sigma", "frame": "level", "cutout": "size", "mixup": "alpha",
                   "adv": "radius", "partial": "fraction", "orthogonal": "epochs"}  # fmt: skip


def _number(text: str) -> float:
    text = text.strip()
    try:
        return float(Fraction(text))  # "8/255", "0.5", "10"
    except (ValueError, ZeroDivisionError) as exc:
        raise CountermeasureError(f"not a number: {text!r}") from exc


def parse_countermeasure(spec: str | Countermeasure) -> Countermeasure:
    """``"name"``, ``"name:value"`` or ``"name:value,key=value"`` -> a Countermeasure."""
    if isinstance(spec, Countermeasure):
        return spec
    if not isinstance(spec, str):
        raise CountermeasureError(f"a countermeasure is a string like 'jpeg:10' or a Countermeasure, got {spec!r}")
    cut = min((i for i in (spec.find(":"), spec.find(",")) if i >= 0), default=len(spec))  # "name:v,k=v" or "name,k=v"
    name, rest = spec[:cut].strip().lower(), spec[cut + 1 :]
    if name not in COUNTERMEASURES:
        raise CountermeasureError(f"unknown countermeasure {name!r}; known: {', '.join(COUNTERMEASURES)}")
    cls = COUNTERMEASURES[name]
    kwargs: dict[str, Any] = {}
    fields = {f.name for f in dataclasses.fields(cls)}
    for i, part in enumerate(p for p in rest.split(",") if p.strip()):
        key, eq, value = part.partition("=")
        if not eq:
            if i or name not in _MAIN_PARAMETER:
                raise CountermeasureError(f"{spec!r}: {part!r} needs the form key=value")
            key, value = _MAIN_PARAMETER[name], part
        key = key.strip()
        if key not in fields:
            raise CountermeasureError(f"{spec!r}: {name} has no parameter {key!r} (parameters: {sorted(fields)})")
        kwargs[key] = _number(value)
    return cls(**kwargs)


def split_specs(text: str, is_option: Callable[[str], bool] = lambda token: "=" in token) -> list[str]:
    """``text`` split at commas, each part for which ``is_option`` holds joined to the part before it
    (``"orthogonal,test=1,jpeg:10"`` is two specs); empty parts are dropped.

    >>> split_specs("convnet@orthogonal,test=1,resnet20")
    ['convnet@orthogonal,test=1', 'resnet20']
    """
    parts: list[str] = []
    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        if parts and is_option(token):
            parts[-1] += "," + token
        else:
            parts.append(token)
    return parts


def parse_countermeasures(specs: str | Iterable[str | Countermeasure]) -> list[Countermeasure]:
    """A comma-free list or a ``;``/``,``-separated string: ``"standard,jpeg:10,adv:8/255"``.

    In a string, a part containing ``=`` belongs to the countermeasure before it.
    """
    if isinstance(specs, str):
        specs = split_specs(specs.replace(";", ","), lambda token: "=" in token and ":" not in token)
    out = [parse_countermeasure(s) for s in specs]
    if not out:
        raise CountermeasureError("no countermeasure given (use 'standard' for plain training)")
    return out
