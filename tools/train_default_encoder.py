"""Train the offline default encoder of UC's ``fast`` preset (shipped as ``uexamples/data/encoders/``).

A CIFAR "option A" ResNet-20 (the architecture of ``uexamples.surrogates.CifarResNet``) trained with
labels on the 50,000-image train split of ``../shared/datasets/cifar10-jpeg`` (the CIFAR-10 *train*
set; the benchmark set cifar10-10k is the CIFAR-10 *test* set, which this encoder never sees).
Seeded, so a re-run on the same machine gives the same weights::

    python tools/train_default_encoder.py --epochs 15 --out uexamples/data/encoders/uexamples-cifar-resnet20.safetensors

Why a shipped encoder: UC clusters images in an encoder's feature space and the clusters must follow
the classes a victim will be trained on; an encoder learned from scratch during fit on an unlabelled
set clusters by colour and layout (purity near chance) and protects nothing. A 1 MB CIFAR-trained
net works on a fresh machine with no download; users with network pass a CLIP or ViT Hub id instead.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F

from uexamples.core.augment import BatchRandom, random_crop_flip
from uexamples.core.loading import load_split
from uexamples.surrogates.builtin import CifarResNet

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(SHARED / "cifar10-jpeg"))
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="uexamples/data/encoders/uexamples-cifar-resnet20.safetensors")
    args = p.parse_args()
    from safetensors.torch import save_file

    ds = datasets.load_dataset(args.data)
    train = load_split(ds["train"], "image", 32, "label", progress=True, desc="Loading train")
    test = load_split(ds["test"], "image", 32, "label", progress=True, desc="Loading test")
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = CifarResNet(20, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    n = train.images.shape[0]
    steps = args.epochs * (n // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.15)
    started, history = time.time(), []
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(n, generator=gen)
        for i in range(n // args.batch_size):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            x = random_crop_flip(train.images[idx], BatchRandom(gen, len(idx)))
            loss = F.cross_entropy(model(x), train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(test.images[i : i + 1000]).argmax(1) for i in range(0, len(test.images), 1000)])
        acc = float((pred == test.labels).float().mean())
        history.append(acc)
        print(f"epoch {epoch + 1}: test accuracy {acc:.4f} ({time.time() - started:.0f} s)", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"data": "cifar10-jpeg train (CIFAR-10 train set)", "epochs": str(args.epochs), "seed": str(args.seed),
            "test_accuracy_cifar10_jpeg": f"{history[-1]:.4f}"}  # fmt: skip
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out), metadata=meta)
    print(json.dumps({"out": str(out), **meta, "seconds": round(time.time() - started)}))


if __name__ == "__main__":
    main()
