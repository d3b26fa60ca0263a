"""Train a fresh victim from scratch and report its clean-test accuracy per epoch."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.additive import to_working
from ..core.augment import BatchRandom, random_crop_flip
from ..core.columns import detect_columns
from ..core.images import NativeImage, load_pil
from ..surrogates import BUILTIN


def dataset_to_tensors(
    ds: datasets.Dataset, resolution: int = 32, image_column: str | None = None, label_column: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a whole split into (N, 3, R, R) float images in [0, 1] and (N,) labels."""
    cols = detect_columns(ds.features, image_column, label_column, need_label=True, method="a victim")
    raw = ds.cast_column(cols.image, datasets.Image(decode=False))
    xs, ys = [], []
    for start in range(0, len(raw), 1000):
        rows = raw[start : start + 1000]
        natives = [NativeImage.from_pil(load_pil(c, row=start + i)) for i, c in enumerate(rows[cols.image])]
        xs.append(to_working(natives, resolution)[0])
        ys.append(torch.tensor(rows[cols.label], dtype=torch.long))
    return torch.cat(xs), torch.cat(ys)


@dataclass
class VictimResult:
    final_accuracy: float
    best_accuracy: float
    best_epoch: int
    curve: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return correct / max(1, len(x))


def train_victim(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    arch: str = "convnet",
    epochs: int = 15,
    batch_size: int = 128,
    lr: float = 0.05,
    weight_decay: float = 5e-4,
    seed: int = 0,
    progress: bool = True,
    desc: str = "victim",
) -> VictimResult:
    """SGD (momentum 0.9, one-cycle schedule) with random crop + flip, from scratch; clean-test accuracy per epoch."""
    torch.manual_seed(seed)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    model = BUILTIN[arch](num_classes).to(memory_format=torch.channels_last)  # faster on CPU
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    steps_per_epoch = (len(train_x) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.25)
    curve: list[float] = []
    start = time.time()
    bar = tqdm(range(epochs), desc=desc, disable=not progress)
    for _ in bar:
        model.train()
        order = torch.randperm(len(train_x), generator=gen)
        for i in range(0, len(train_x), batch_size):
            idx = order[i : i + batch_size]
            x = random_crop_flip(train_x[idx], BatchRandom(gen, len(idx)))
            loss = F.cross_entropy(model(x), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        curve.append(accuracy(model, test_x, test_y))
        bar.set_postfix(test_acc=f"{curve[-1]:.3f}")
    best = int(np.argmax(curve))
    return VictimResult(curve[-1], curve[best], best + 1, curve, time.time() - start)
