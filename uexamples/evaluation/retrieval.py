"""Retrieval victims: did image-text protection work? CLIP-style models trained from scratch.

For image-caption datasets (no class labels) a victim is a small CLIP trained contrastively on the
protected pairs and scored by retrieval on the *clean* test pairs, against the same recipe and seed
trained on the clean pairs: recall at 1, 5 and 10 and the median rank, image-to-text (an image finds
any of its captions among all test captions) and text-to-image (a caption finds its image among all
test images), with the chance level of each beside it.

Victims: ``"clip-vit"`` (a transformers ``CLIPModel`` from a small ``CLIPConfig``: ViT 64 px, patch 8,
4 layers of width 192; text: 2 layers of width 128), ``"clip-conv"`` (the conv-net image tower of the
default MEM surrogate, :class:`~uexamples.surrogates.contrastive.ConvCLIP`). Recipe: AdamW (lr 5e-4,
weight decay 0.1), warm-up + cosine, batch 64, one caption drawn per image and step, random
crop + flip; the tokenizer's vocabulary comes from the training captions.

>>> import torch
>>> img = torch.eye(3)
>>> m = retrieval_metrics(img, torch.cat([img, img]), owners=torch.tensor([0, 1, 2, 0, 1, 2]))
>>> m["i2t_r1"], m["t2i_r1"], m["i2t_median_rank"]
(1.0, 1.0, 1.0)
>>> round(chance_levels(200, 1000)["i2t_r10"], 3), chance_levels(200, 1000)["t2i_r10"]
(0.049, 0.05)
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import datasets
import numpy as np
import torch

from .. import __version__
from ..core.batch import caption_of
from ..core.columns import detect_columns
from ..core.loading import load_split
from ..surrogates.contrastive import ConvCLIP, caption_tokenizer, fresh_transformers_clip, train_clip
from .countermeasures import Countermeasure, parse_countermeasures
from .metrics import dataset_quality
from .report import ReportFiles
from .victim import resolve_device

KS = (1, 5, 10)
RETRIEVAL_VICTIMS = ("clip-vit", "clip-conv")
METRICS = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in KS] + ["i2t_median_rank", "t2i_median_rank"]


class RetrievalError(ValueError):
    """Inputs that cannot be evaluated by retrieval (no captions, mismatched sets, a countermeasure
    that only makes sense for classifiers)."""


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, owners: torch.Tensor) -> dict[str, float]:
    """R@1/5/10 and median rank (1 = first) in both directions; ``owners[j]``: the image of caption j."""
    sim = image_emb.float() @ text_emb.float().t()  # (N images, M captions)
    n = sim.shape[0]
    owners = owners.long()
    mine = owners.unsqueeze(0) == torch.arange(n).unsqueeze(1)  # (N, M): caption j belongs to image i
    # image -> text: rank of the best-placed own caption = 1 + captions of others scoring above it
    best_own = sim.masked_fill(~mine, float("-inf")).max(1).values
    i2t_rank = 1 + (sim.masked_fill(mine, float("-inf")) > best_own.unsqueeze(1)).sum(1)
    # text -> image: rank of the caption's own image among all images
    own = sim[owners, torch.arange(sim.shape[1])]
    t2i_rank = 1 + (sim > own.unsqueeze(0)).sum(0)
    out = {}
    for name, rank in (("i2t", i2t_rank), ("t2i", t2i_rank)):
        for k in KS:
            out[f"{name}_r{k}"] = float((rank <= k).float().mean())
        out[f"{name}_median_rank"] = float(rank.float().quantile(0.5))  # the middle two averaged (torch.median: the lower)
    return out


def chance_levels(images: int, captions: int) -> dict[str, float]:
    """What a model that ranks at random scores (each image owning captions / images captions)."""
    per = captions / images
    out = {}
    for k in KS:
        # at least one of `per` own captions among k drawn without replacement from `captions`
        miss = math.prod((captions - per - i) / (captions - i) for i in range(k)) if captions - per >= k else 0.0
        out[f"i2t_r{k}"] = 1 - miss
        out[f"t2i_r{k}"] = min(1.0, k / images)
    # rank of the first own caption = 1 + X, X = others ranked above all `per` own ones; median of 1 + X
    others, above = captions - per, 1.0
    for x in range(int(others) + 1):
        above *= (others - x) / (captions - x)  # P(X > x)
        if above <= 0.5:
            out["i2t_median_rank"] = float(x + 1)
            break
    out["t2i_median_rank"] = (images + 1) / 2
    return out


def build_retrieval_victim(spec: str, tokenizer, resolution: int = 64) -> torch.nn.Module:
    """A freshly initialised CLIP-style victim (see the module docstring)."""
    if spec == "clip-vit":
        return fresh_transformers_clip(tokenizer, image_size=resolution)
    if spec == "clip-conv":
        return ConvCLIP(tokenizer, image_tower="convnet")
    raise RetrievalError(f"unknown retrieval victim {spec!r}; choose from {list(RETRIEVAL_VICTIMS)}")


@dataclass
class PairedSplit:
    """Images at the victim's resolution, every caption as token ids, and which image each belongs to."""

    images: torch.Tensor
    captions: list[list[str]]
    image_column: str = "image"  # the column the images were read from (detected or given)

    def tokens(self, tokenizer, max_length: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        flat = [c for caps in self.captions for c in caps]
        owners = torch.tensor([i for i, caps in enumerate(self.captions) for _ in caps])
        ids = tokenizer(flat, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
        return ids, owners


def load_pairs(ds: datasets.Dataset, name: str, resolution: int, image_column: str | None = None,
               text_column: str | None = None, progress: bool = False) -> PairedSplit:  # fmt: skip
    try:
        cols = detect_columns(ds.features, image_column, None, text_column, need_text=True, method="a retrieval victim")
    except Exception as exc:
        raise RetrievalError(f"{name} set: {exc}") from exc
    images = load_split(ds, cols.image, resolution, desc=f"Loading {name}", progress=progress).images
    caps = [caption_of(v, r) for r, v in enumerate(ds[cols.text])]
    return PairedSplit(images, [[c] if isinstance(c, str) else list(c) for c in caps], cols.image)


@dataclass
class RetrievalResult:
    final: dict[str, float]
    best: dict[str, float]  # each metric's best epoch (R@K highest, median rank lowest)
    curve: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@torch.no_grad()
def _embed(model, x: torch.Tensor, ids: torch.Tensor, device, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    img = torch.cat([model(x[i : i + batch].to(device)).cpu() for i in range(0, len(x), batch)])
    txt = torch.cat([model.encode_text(ids[i : i + batch].to(device)).cpu() for i in range(0, len(ids), batch)])
    return img, txt


def train_retrieval_victim(
    train: PairedSplit,
    test: PairedSplit,
    arch: str = "clip-vit",
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 5e-4,
    weight_decay: float = 0.1,
    seed: int = 0,
    countermeasure: Countermeasure | None = None,
    device: str | torch.device | None = "auto",
    progress: bool = True,
    desc: str = "retrieval victim",
) -> RetrievalResult:
    """Train a CLIP-style victim from scratch on ``train`` pairs; retrieval on the ``test`` pairs per epoch."""
    cm = countermeasure or Countermeasure()
    dev = resolve_device(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tokenizer = caption_tokenizer(train.captions)
    model = build_retrieval_victim(arch, tokenizer, train.images.shape[-1]).to(dev)
    test_ids, test_owner = test.tokens(tokenizer)
    curve: list[dict[str, float]] = []
    started = time.time()

    def score(m) -> str:
        img, txt = _embed(m, test.images, test_ids, dev)
        curve.append(retrieval_metrics(img, txt, test_owner))
        return f"r10={curve[-1]['i2t_r10']:.3f}/{curve[-1]['t2i_r10']:.3f}"

    train_clip(model, tokenizer, cm.preprocess(train.images), train.captions, epochs, batch_size, lr, weight_decay, gen,
               dev, progress, desc, on_epoch=score)  # fmt: skip
    best = {k: (min if k.endswith("median_rank") else max)(c[k] for c in curve) for k in METRICS}
    return RetrievalResult(curve[-1], best, curve, time.time() - started)


def _summary(runs: list[RetrievalResult]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in METRICS:
        finals = [r.final[k] for r in runs]
        out[k] = {"mean": float(np.mean(finals)), "std": float(np.std(finals)),
                  "best_mean": float(np.mean([r.best[k] for r in runs]))}  # fmt: skip
    out["curve_r10_mean"] = np.mean([[(c["i2t_r10"] + c["t2i_r10"]) / 2 for c in r.curve] for r in runs], 0).tolist()
    out["runs"] = [r.to_dict() for r in runs]
    return out


def relative_recall(protected: float, clean: float, chance: float) -> float | None:
    """Where the protected victim sits between chance (0) and the clean victim (1)."""
    return None if clean - chance <= 0 else (protected - chance) / (clean - chance)


@dataclass
class RetrievalReport(ReportFiles):
    """What ``evaluate_retrieval`` measured: one entry per countermeasure, chance levels beside them."""

    config: dict[str, Any]
    quality: dict[str, Any] | None
    chance: dict[str, float]
    results: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "quality": self.quality, "chance": self.chance, "results": self.results}

    def to_markdown(self) -> str:
        seeds = len(self.config["seeds"])
        lines = [
            f"Retrieval victim `{self.config['victim']}` (a CLIP trained from scratch for {self.config['epochs']} epochs, "
            f"{seeds} seed{'s' if seeds > 1 else ''}) on the training pairs; retrieval on the clean test pairs "
            f"({self.config['test_images']} images, {self.config['test_captions']} captions). Final epoch, "
            f"{'mean ± std over seeds' if seeds > 1 else 'one seed'}; relative = (protected - chance) / (clean - chance) of R@10.",
            "",
            "| countermeasure | trained on | I→T R@1 | R@5 | R@10 | median rank | T→I R@1 | R@5 | R@10 | median rank | relative R@10 I→T / T→I |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]

        def cell(s: dict, k: str) -> str:
            if k.endswith("median_rank"):
                return f"{s[k]['mean']:.0f}" + (f" ± {s[k]['std']:.0f}" if seeds > 1 else "")
            return f"{100 * s[k]['mean']:.1f}" + (f" ± {100 * s[k]['std']:.1f}" if seeds > 1 else "")

        ch = self.chance
        for r in self.results:
            for side in ("protected", "clean"):
                s = r[side]
                if s is None:
                    continue
                rel = "-"
                if side == "protected" and r["clean"] is not None:
                    parts = [relative_recall(s[f"{d}_r10"]["mean"], r["clean"][f"{d}_r10"]["mean"], ch[f"{d}_r10"]) for d in ("i2t", "t2i")]
                    rel = " / ".join("-" if v is None else f"{v:.2f}" for v in parts)
                lines.append(f"| {r['countermeasure']} | {side} | " + " | ".join(cell(s, k) for k in METRICS[:3]) + f" | {cell(s, 'i2t_median_rank')} | "
                             + " | ".join(cell(s, k) for k in METRICS[3:6]) + f" | {cell(s, 't2i_median_rank')} | {rel} |")  # fmt: skip
        lines.append("| (chance) | random ranking | " + " | ".join(f"{100 * ch[k]:.1f}" for k in METRICS[:3])
                     + f" | {ch['i2t_median_rank']:.0f} | " + " | ".join(f"{100 * ch[k]:.1f}" for k in METRICS[3:6])
                     + f" | {ch['t2i_median_rank']:.0f} | 0 |")  # fmt: skip
        if self.quality:
            q = self.quality
            lines += ["", f"Image quality of the protected set: L-inf {q['linf_levels']} levels, PSNR {q['mean_psnr']:.2f} dB, "
                          f"SSIM {q['mean_ssim']:.4f}, {100 * q['changed_pixels']:.1f} % of pixels changed."]  # fmt: skip
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Mean R@10 (both directions) per epoch, protected against clean, chance as a dashed line."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = len(self.results)
        fig, axes = plt.subplots(1, n, figsize=(4 * n, 3), squeeze=False, sharey=True)
        chance = 100 * (self.chance["i2t_r10"] + self.chance["t2i_r10"]) / 2
        for ax, r in zip(axes.flat, self.results):
            for key, colour, label in (("clean", "tab:blue", "trained on clean"), ("protected", "tab:red", "trained on protected")):
                if r[key] is not None:
                    curve = 100 * np.array(r[key]["curve_r10_mean"])
                    ax.plot(np.arange(1, len(curve) + 1), curve, color=colour, label=label, marker="o", markersize=2)
            ax.axhline(chance, color="grey", linestyle="--", label="chance")
            ax.set_title(r["countermeasure"], fontsize=10)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        axes[0, 0].set_ylabel("test R@10, mean of I→T and T→I (%)")
        axes[0, 0].legend(fontsize=8)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _preprocess_only(cms: list[Countermeasure]) -> None:
    """Retrieval victims take countermeasures that change the images (grayscale, JPEG, blur, bit depth)."""
    for cm in cms:
        kind = type(cm)
        if any(getattr(kind, hook) is not getattr(Countermeasure, hook) for hook in ("loss", "mix_training_set", "preprocess_labelled", "preprocess_test")):
            raise RetrievalError(f"countermeasure {cm.label!r} changes a classifier's training loss or set, or needs class labels; retrieval victims "
                                 "take the image-only ones: standard, grayscale, jpeg:Q, bitdepth:B, blur:S")  # fmt: skip


def evaluate_retrieval(
    protected: datasets.Dataset,
    test: datasets.Dataset,
    clean: datasets.Dataset | None = None,
    victim: str = "clip-vit",
    countermeasures: str | Iterable[str | Countermeasure] = ("standard",),
    epochs: int = 30,
    seeds: Sequence[int] = (0,),
    batch_size: int = 64,
    lr: float = 5e-4,
    image_column: str | None = None,
    text_column: str | None = None,
    resolution: int = 64,
    device: str | None = "auto",
    quality: bool = True,
    progress: bool = True,
) -> RetrievalReport:
    """Retrieval victims trained on ``protected`` pairs (and on ``clean``, same recipe and seeds),
    scored on the clean ``test`` pairs. ``uexamples.evaluate`` calls this for captioned data without labels.

    >>> import datasets, PIL.Image, numpy as np
    >>> rng = np.random.default_rng(0)
    >>> rows = {"image": [PIL.Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(8)],
    ...         "caption": [["a red thing", "red"], ["a blue thing"]] * 4}
    >>> ds = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    >>> r = evaluate_retrieval(ds, ds, victim="clip-conv", epochs=1, batch_size=4, resolution=16, progress=False)
    >>> r.chance["t2i_r1"], sorted(r.results[0]["protected"])[:2]
    (0.125, ['curve_r10_mean', 'i2t_median_rank'])
    """
    if victim not in RETRIEVAL_VICTIMS:
        raise RetrievalError(f"unknown retrieval victim {victim!r}; choose from {list(RETRIEVAL_VICTIMS)}")
    if epochs < 1:
        raise RetrievalError(f"epochs must be >= 1, got {epochs}")
    seeds = list(seeds)
    if not seeds:
        raise RetrievalError("seeds is empty")
    cms = parse_countermeasures(countermeasures)
    _preprocess_only(cms)
    if clean is not None and len(clean) != len(protected):
        raise RetrievalError(f"the clean set has {len(clean)} rows and the protected set {len(protected)}: pass the same split")
    load: dict[str, Any] = dict(resolution=resolution, image_column=image_column, text_column=text_column, progress=progress)
    p = load_pairs(protected, "protected", **load)
    t = load_pairs(test, "test", **load)
    c = load_pairs(clean, "clean", **load) if clean is not None else None
    test_captions = sum(len(x) for x in t.captions)
    report = RetrievalReport(
        config={"victim": victim, "epochs": epochs, "seeds": seeds, "batch_size": batch_size, "lr": lr,
                "resolution": resolution, "train_images": len(protected), "test_images": len(test),
                "test_captions": test_captions, "countermeasures": [cm.label for cm in cms], "uexamples": __version__,
                "torch": torch.__version__, "platform": platform.platform(),
                "captions_changed": c is not None and c.captions != p.captions},  # fmt: skip
        quality=dataset_quality(clean, protected, p.image_column) if (quality and clean is not None) else None,
        chance=chance_levels(len(test), test_captions),
    )
    common = dict(arch=victim, epochs=epochs, batch_size=batch_size, lr=lr, device=device, progress=progress)
    for cm in cms:
        runs = {side: [train_retrieval_victim(data, t, seed=s, countermeasure=cm, desc=f"{cm.label} | {side} | seed {s}", **common)
                       for s in seeds] for side, data in (("protected", p), ("clean", c)) if data is not None}  # fmt: skip
        report.results.append({"countermeasure": cm.label, "protected": _summary(runs["protected"]),
                               "clean": _summary(runs["clean"]) if "clean" in runs else None})  # fmt: skip
    return report


__all__ = ["RetrievalReport", "RetrievalResult", "chance_levels", "evaluate_retrieval", "relative_recall",
           "retrieval_metrics", "train_retrieval_victim"]  # fmt: skip
