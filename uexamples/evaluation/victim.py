"""Train a fresh victim from scratch and report its clean-test accuracy per epoch.

Victims: the built-in nets (``"convnet"`` for CPU, ``"resnet18"`` as in the papers, ...), ``"vit"``
(a small ViT for 32 px images), any transformers image-classification architecture from its config
(a ``PretrainedConfig``, a dict with ``model_type``, or a Hub id / folder whose config.json is read;
weights are never loaded: victims start from scratch), or a callable ``num_classes -> nn.Module``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import datasets
import numpy as np
import torch
import torch.nn as nn

from ..core.augment import BatchRandom, random_crop_flip
from ..core.columns import detect_columns
from ..core.loading import load_split
from ..core.progress import progress_bar
from ..core.schedules import warmup_cosine  # noqa: F401  (importable from here as before)
from ..surrogates import BUILTIN, transformers_from_config
from .countermeasures import Countermeasure
from .metrics import balanced_accuracy, macro_auc, recall_per_class

VictimSpec = Any  # str | transformers.PretrainedConfig | dict | Callable[[int], nn.Module]

# A ViT sized for 32x32 images (patch 4 -> 64 tokens), about 2.7 M parameters.
SMALL_VIT = dict(model_type="vit", image_size=32, patch_size=4, hidden_size=192, num_hidden_layers=6,
                 num_attention_heads=3, intermediate_size=768)  # fmt: skip


def build_victim(spec: VictimSpec, num_classes: int, resolution: int = 32) -> nn.Module:
    """A freshly initialised victim network taking RGB in [0, 1]."""
    if isinstance(spec, str) and spec in BUILTIN:
        return BUILTIN[spec](num_classes)
    if isinstance(spec, str) and spec == "vit":
        return transformers_from_config(dict(SMALL_VIT, image_size=resolution), num_classes, resolution)
    if isinstance(spec, nn.Module):
        raise TypeError("a victim must be trained from scratch: pass a callable num_classes -> nn.Module, not an instance")
    if callable(spec):
        return spec(num_classes)
    if isinstance(spec, (str, dict)) or hasattr(spec, "model_type"):
        return transformers_from_config(spec, num_classes, resolution)
    raise ValueError(
        f"unknown victim {spec!r}: use one of {sorted(BUILTIN) + ['vit']}, a transformers config, or a callable"
    )


def is_transformers_victim(spec: VictimSpec) -> bool:
    return not (isinstance(spec, str) and spec in BUILTIN) and not callable(spec)


def dataset_to_tensors(
    ds: datasets.Dataset, resolution: int = 32, image_column: str | None = None, label_column: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a whole split into (N, 3, R, R) float images in [0, 1] and (N,) labels."""
    cols = detect_columns(ds.features, image_column, label_column, need_label=True, method="a victim")
    split = load_split(ds, cols.image, resolution, cols.label)
    return split.images, split.labels


@dataclass
class VictimResult:
    final_accuracy: float
    best_accuracy: float
    best_epoch: int
    curve: list[float] = field(default_factory=list)
    seconds: float = 0.0
    # of the final model: what means something on imbalanced (medical) test sets, where plain accuracy
    # stays near the majority rate whatever the victim learnt
    final_balanced_accuracy: float | None = None
    final_auc: float | None = None
    # what the final model predicts on the test split: per true class, its recall; per class, the share of
    # test images predicted as it (a protected victim falls back on a few classes where the shortcut is absent)
    final_recall_per_class: list[float | None] = field(default_factory=list)  # None: no test image of the class
    final_prediction_share: list[float] = field(default_factory=list)
    # accuracy per epoch on each ``monitor`` set (e.g. the protected training images and the same images clean:
    # when the shortcut is learned, and how much of the real images is learned beside it)
    monitor_curves: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500, device: str = "cpu") -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = model(x[i : i + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == y[i : i + batch_size]).sum())
    return correct / max(1, len(x))


@torch.no_grad()
def class_probabilities(model: nn.Module, x: torch.Tensor, batch_size: int = 500, device: str = "cpu") -> torch.Tensor:
    """Softmax outputs (N, C) of ``model`` on ``x``, in eval mode."""
    model.eval()
    return torch.cat([model(x[i : i + batch_size].to(device)).float().softmax(1).cpu() for i in range(0, len(x), batch_size)])


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def train_victim(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    arch: VictimSpec = "convnet",
    epochs: int = 15,
    batch_size: int = 128,
    lr: float | None = None,
    weight_decay: float = 5e-4,
    seed: int = 0,
    countermeasure: Countermeasure | None = None,
    clean_x: torch.Tensor | None = None,
    num_classes: int | None = None,
    device: str | torch.device | None = "auto",
    progress: bool = True,
    desc: str = "victim",
    on_epoch: Callable[[int, float], None] | None = None,
    monitor: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> VictimResult:
    """Train ``arch`` from scratch on (train_x, train_y) under ``countermeasure``; clean-test accuracy per epoch.

    Built-in nets: SGD (momentum 0.9, Nesterov, lr 0.05). transformers victims: AdamW
    (lr 1e-3), which trains ViTs from scratch far better than SGD; both
    with a warm-up + cosine schedule. Always random crop +
    flip; the countermeasure adds its preprocessing, its training-set mix and its loss. ``monitor``: named
    (images, labels) sets scored after every epoch as they are (no augmentation, no countermeasure), in
    ``monitor_curves``.
    """
    cm = countermeasure or Countermeasure()
    dev = resolve_device(device)
    torch.manual_seed(seed)  # weight initialisation
    gen = torch.Generator().manual_seed(seed)
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    model = build_victim(arch, num_classes, train_x.shape[-1]).to(dev).to(memory_format=torch.channels_last)
    x_all = cm.preprocess_labelled(cm.mix_training_set(train_x, clean_x, gen), train_y, gen)
    test_x = cm.preprocess_test(test_x)
    if is_transformers_victim(arch):
        lr = lr or 1e-3
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    else:
        lr = lr or 0.05
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    steps_per_epoch = (len(x_all) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(epochs * steps_per_epoch))
    curve: list[float] = []
    monitor_curves: dict[str, list[float]] = {}
    start = time.time()
    bar = progress_bar(range(epochs), desc=desc, progress=progress)
    for epoch in bar:
        model.train()
        order = torch.randperm(len(x_all), generator=gen)
        for i in range(0, len(x_all), batch_size):
            idx = order[i : i + batch_size]
            x = random_crop_flip(x_all[idx], BatchRandom(gen, len(idx))).to(dev)
            loss = cm.loss(model, x, train_y[idx].to(dev), num_classes, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        curve.append(accuracy(model, test_x, test_y, device=dev))
        for name, (mx, my) in (monitor or {}).items():
            monitor_curves.setdefault(name, []).append(accuracy(model, mx, my, device=dev))
        bar.set_postfix(test_acc=f"{curve[-1]:.3f}")
        if on_epoch is not None:
            on_epoch(epoch + 1, curve[-1])
    best = int(np.argmax(curve))
    probs = class_probabilities(model, test_x, device=dev).numpy()
    y, predicted = test_y.numpy(), probs.argmax(1)
    recall = recall_per_class(y, predicted, range(num_classes))
    share = (np.bincount(predicted, minlength=num_classes) / max(1, len(y))).tolist()
    return VictimResult(curve[-1], curve[best], best + 1, curve, time.time() - start,
                        balanced_accuracy(y, predicted), macro_auc(y, probs), recall, share, monitor_curves)  # fmt: skip
