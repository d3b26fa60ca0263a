"""``evaluate()``: did the protection work? Victims trained from scratch, under countermeasures.

For every countermeasure and seed, one victim is trained on the protected training set and one on
the clean training set (same recipe, same seed, same run), and both are scored on the clean test
set. The report holds final and best accuracy, per-epoch curves, mean +- std over seeds, and the
image quality of the protected set; it writes JSON, a plot PNG and a Markdown table.

>>> import uexamples as ue
>>> train, test = ue.load_sample_dataset("train"), ue.load_sample_dataset("test")
>>> protected = train.map(ue.CUDAProtect(key=7, allow_weak_key=True).fit(train), batched=True)
>>> report = ue.evaluate(protected, test, clean=train, victim="tinycnn", epochs=1, progress=False)
>>> sorted(report.results[0])
['clean', 'countermeasure', 'labels', 'num_classes', 'protected', 'ratio']
>>> report.quality["linf_levels"] > 0
True
"""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import datasets
import numpy as np
import torch

from .. import __version__
from ..core.columns import detect_columns
from ..core.loading import load_split
from .countermeasures import Countermeasure, PartialProtection, parse_countermeasures
from .metrics import dataset_quality
from .report import ReportFiles
from .retrieval import RetrievalReport, evaluate_retrieval
from .victim import VictimResult, VictimSpec, train_victim


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated together (mismatched features, bad labels, empty sets)."""


Relabel = Callable[[int], int] | Mapping[int, int]


@dataclass(frozen=True)
class NamedRelabel:
    """A labelling of a benchmark set that a protector never sees: ``mapping[old class] = new class``.

    ``source_names``: the class names of the dataset it applies to (checked against a ClassLabel).
    """

    name: str
    help: str
    source_names: tuple[str, ...]
    mapping: tuple[int, ...]
    names: tuple[str, ...]

    def __call__(self, label: int) -> int:
        return self.mapping[label]


CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
RETINA_GRADES = ("0", "1", "2", "3", "4")
RELABELINGS: dict[str, NamedRelabel] = {
    r.name: r
    for r in (
        NamedRelabel("cifar10-vehicles-animals", "CIFAR-10 as 2 classes: animals (0) vs vehicles (1)", CIFAR10_NAMES,
                     (1, 1, 0, 0, 0, 0, 0, 0, 1, 1), ("animal", "vehicle")),
        NamedRelabel("cifar10-pairs", "CIFAR-10 as 5 classes: neighbouring class pairs merged (label // 2)",
                     CIFAR10_NAMES, (0, 0, 1, 1, 2, 2, 3, 3, 4, 4),
                     ("airplane+automobile", "bird+cat", "deer+dog", "frog+horse", "ship+truck")),
        NamedRelabel("retinamnist-any-disease", "RetinaMNIST as 2 classes: grade 0 (0) vs grades 1-4 (1)",
                     RETINA_GRADES, (0, 1, 1, 1, 1), ("healthy", "disease")),
    )
}  # fmt: skip


def resolve_relabel(spec: str | Relabel) -> tuple[str, Relabel]:
    """(name, labelling) of a built-in name from :data:`RELABELINGS`, a mapping or a function."""
    if isinstance(spec, str):
        if spec not in RELABELINGS:
            raise EvaluationError(f"unknown relabelling {spec!r}; built-in: {sorted(RELABELINGS)} (or pass a function)")
        return spec, RELABELINGS[spec]
    if isinstance(spec, Mapping):
        return "mapping", spec
    if callable(spec):
        return getattr(spec, "__name__", "relabel"), spec
    raise EvaluationError(f"relabel must be a built-in name, a mapping or a function, got {spec!r}")


def _summary(runs: list[VictimResult]) -> dict[str, Any]:
    finals = [r.final_accuracy for r in runs]
    bests = [r.best_accuracy for r in runs]
    curves = np.array([r.curve for r in runs])
    balanced = [r.final_balanced_accuracy for r in runs]
    aucs = [r.final_auc for r in runs]
    return {
        "final_mean": float(np.mean(finals)),
        "final_std": float(np.std(finals)),
        "balanced_mean": float(np.mean(balanced)),
        "balanced_std": float(np.std(balanced)),
        "auc_mean": float(np.mean(aucs)),
        "auc_std": float(np.std(aucs)),
        "best_mean": float(np.mean(bests)),
        "best_std": float(np.std(bests)),
        "curve_mean": curves.mean(0).tolist(),
        "curve_std": curves.std(0).tolist(),
        "runs": [r.to_dict() for r in runs],
    }


@dataclass
class EvaluationReport(ReportFiles):
    """What ``evaluate`` measured. ``results``: one entry per countermeasure."""

    config: dict[str, Any]
    quality: dict[str, Any] | None
    results: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "quality": self.quality, "results": self.results}

    def to_markdown(self) -> str:
        """A table fragment for a dataset card: accuracy on the clean test set, protected vs clean training."""
        seeds = len(self.config.get("seeds", [0]))
        pm = " ± " if seeds > 1 else ""

        def fmt(s: dict | None, key: str) -> str:
            if s is None:
                return "-"
            v = f"{100 * s[key + '_mean']:.1f}"
            return v + (f"{pm}{100 * s[key + '_std']:.1f}" if pm else "") + " %"

        def pair(r: dict, key: str, percent: bool) -> str:
            """protected / clean of a final-model metric (balanced accuracy in %, AUC in [0, 1])."""
            vals = []
            for side in ("protected", "clean"):
                v = (r[side] or {}).get(key + "_mean")
                vals.append("-" if v is None or not np.isfinite(v) else f"{100 * v:.1f} %" if percent else f"{v:.3f}")
            return " / ".join(vals)

        lines = [
            f"Victim `{self.config['victim']}` trained from scratch for {self.config['epochs']} epochs "
            f"({seeds} seed{'s' if seeds > 1 else ''}); accuracy on the clean test set; balanced accuracy "
            "(mean recall over classes; chance = 1 / classes) and macro one-vs-rest AUC (chance = 0.5) of the final model.",
            "",
            "| countermeasure | trained on protected: final | best | trained on clean: final | best | protected / clean "
            "| balanced accuracy: protected / clean | AUC: protected / clean |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        relabelled = any(r.get("labels", "own") != "own" for r in self.results)
        if relabelled:  # the label-agnostic check: which labels the victims were trained on, first
            lines[-2:] = ["| labels (classes) " + lines[-2], "|---" + lines[-1]]
        for r in self.results:
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
            labels = f"| {r.get('labels', 'own')} ({r.get('num_classes', '?')}) " if relabelled else ""
            lines.append(
                f"{labels}| {r['countermeasure']} | {fmt(r['protected'], 'final')} | {fmt(r['protected'], 'best')} | "
                f"{fmt(r['clean'], 'final')} | {fmt(r['clean'], 'best')} | {ratio} | "
                f"{pair(r, 'balanced', percent=True)} | {pair(r, 'auc', percent=False)} |"
            )
        for r in self.results:  # a clean victim at chance learned nothing: its ratio proves nothing either
            clean, k = (r["clean"] or {}).get("balanced_mean"), r.get("num_classes")
            if clean is not None and k and np.isfinite(clean) and clean <= 1 / k + 0.05:
                lines += ["", f"**Warning** ({r['countermeasure']}): the victim trained on clean data reached a balanced "
                          f"accuracy of {100 * clean:.1f} % (chance {100 / k:.1f} %): it learned almost nothing, so the "
                          "protected / clean ratio says nothing about the protection. Train longer (epochs=) or with "
                          "more data before reading it."]  # fmt: skip
        if self.quality:
            q = self.quality
            lines += [
                "",
                f"Image quality of the protected set: L-inf {q['linf_levels']} levels, mean L2 {q['mean_l2']:.3f}, "
                f"PSNR {q['mean_psnr']:.2f} dB, SSIM {q['mean_ssim']:.4f}, {100 * q['changed_pixels']:.1f} % of pixels changed.",
            ]
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Accuracy curves (mean over seeds, band = std), protected against clean, one panel per countermeasure."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        n = len(self.results)
        cols = min(4, n)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False, sharey=True)
        for ax, r in zip(axes.flat, self.results):
            for key, colour, label in (("clean", "tab:blue", "trained on clean"), ("protected", "tab:red", "trained on protected")):
                s = r[key]
                if s is None:
                    continue
                mean, std = np.array(s["curve_mean"]), np.array(s["curve_std"])
                epochs = np.arange(1, len(mean) + 1)
                ax.plot(epochs, 100 * mean, color=colour, label=label, marker="o", markersize=3)
                ax.fill_between(epochs, 100 * (mean - std), 100 * (mean + std), color=colour, alpha=0.2)
            labels = r.get("labels", "own")
            ax.set_title(r["countermeasure"] + ("" if labels == "own" else f" | {labels}"), fontsize=10)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch")
            ax.set_ylim(0, 100)
            ax.grid(alpha=0.3)
        for ax in axes.flat[n:]:
            ax.axis("off")
        for ax in axes[:, 0]:
            ax.set_ylabel("clean-test accuracy (%)")
        axes.flat[0].legend(fontsize=8, loc="lower right")
        fig.suptitle(f"Victim {self.config['victim']}: protected vs clean training", fontsize=11)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


# ---------------------------------------------------------------------- input checks
def _columns(ds: datasets.Dataset, name: str, image_column: str | None, label_column: str | None):
    try:
        return detect_columns(ds.features, image_column, label_column, need_label=True, method="evaluation")
    except Exception as exc:
        raise EvaluationError(f"{name} set: {exc}") from exc


def _check_features(ref: datasets.Dataset, ref_cols, other: datasets.Dataset, other_cols, name: str) -> None:
    if not isinstance(other.features[other_cols.image], datasets.Image):
        raise EvaluationError(f"{name} set: column {other_cols.image!r} is not an Image feature")
    a, b = ref.features[ref_cols.label], other.features[other_cols.label]
    if isinstance(a, datasets.ClassLabel) and isinstance(b, datasets.ClassLabel) and a.names != b.names:
        raise EvaluationError(f"label classes differ between the protected and the {name} set: {a.names} vs {b.names}")
    if isinstance(a, datasets.ClassLabel) != isinstance(b, datasets.ClassLabel):
        kinds = f"{type(a).__name__} vs {type(b).__name__}"
        raise EvaluationError(f"label column types differ between the protected and the {name} set ({kinds})")


def _apply_relabel(labels: torch.Tensor, relabel: Relabel | None) -> torch.Tensor:
    if relabel is None:
        return labels
    fn = relabel.__getitem__ if isinstance(relabel, Mapping) else relabel
    try:
        return torch.tensor([int(fn(int(v))) for v in labels.tolist()], dtype=torch.long)
    except (KeyError, IndexError) as exc:
        raise EvaluationError(f"the relabelling has no new class for label {exc.args[0]!r}") from exc


def _check_source_names(relabel: Relabel, feature: Any) -> None:
    """A built-in relabelling applies only to the classes it was written for."""
    if isinstance(relabel, NamedRelabel) and isinstance(feature, datasets.ClassLabel):
        if tuple(feature.names) != relabel.source_names:
            raise EvaluationError(f"relabelling {relabel.name!r} is for the classes {list(relabel.source_names)}, "
                                  f"this dataset has {feature.names}")  # fmt: skip


def _check_range(labels: torch.Tensor, num_classes: int, name: str) -> None:
    bad = ((labels < 0) | (labels >= num_classes)).nonzero()
    if len(bad):
        row = int(bad[0])
        raise EvaluationError(f"{name} set: label {int(labels[row])} at row {row} is outside [0, {num_classes})")


# ---------------------------------------------------------------------- evaluate
def evaluate(
    protected: datasets.Dataset,
    test: datasets.Dataset,
    clean: datasets.Dataset | None = None,
    victim: VictimSpec | None = None,
    countermeasures: str | Iterable[str | Countermeasure] = ("standard",),
    epochs: int | None = None,
    seeds: Sequence[int] = (0,),
    batch_size: int | None = None,
    lr: float | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    relabel: str | Relabel | Sequence[str | Relabel] | None = None,
    num_classes: int | None = None,
    resolution: int | None = None,
    device: str | None = "auto",
    quality: bool = True,
    progress: bool = True,
    text_column: str | None = None,
) -> EvaluationReport | RetrievalReport:
    """Train victims on ``protected`` (and on ``clean``, same run) and score them on ``test``.

    protected / clean: the training split after and before protection (rows aligned; ``clean`` is
        needed for the baseline, the image-quality numbers and ``partial``).
    test: the clean test split.
    victim: "convnet" (CPU, the default), "resnet18" (the papers'), "vit", any transformers config, or a callable.
        Captioned data without class labels gets retrieval victims instead (``evaluate_retrieval``:
        "clip-vit" by default, or "clip-conv"; 30 epochs, batch 64, 64 px unless set) and a ``RetrievalReport``.
    epochs / batch_size / resolution: default 15 / 128 / 32 px for classifier victims.
    countermeasures: see ``uexamples.evaluation.countermeasures``: "standard", "cutout", "mixup",
        "grayscale", "jpeg:10", "bitdepth:2", "blur:1", "adv:4/255", "adv:8/255", "partial:0.5", "orthogonal".
    label_column: train and score the victim on another label column than the one the protector saw.
    relabel: the label-agnostic check. One or several labellings the protector never saw: a built-in
        name (:data:`RELABELINGS`, e.g. ``"cifar10-vehicles-animals"``), a mapping or a function
        old class -> new class. The report then holds the victims on the dataset's own labels and on
        each relabelling (``results[i]["labels"]``), clean and protected alike.
    seeds: one victim per seed; results are mean +- std over seeds.
    """
    try:
        found = detect_columns(protected.features, image_column, label_column, text_column)
    except Exception as exc:
        raise EvaluationError(f"protected set: {exc}") from exc
    if found.label is None and found.text is not None:  # image-caption pairs: CLIP-style victims, retrieval metrics
        if relabel is not None or num_classes is not None:
            raise EvaluationError("relabel= and num_classes= are for class labels; this dataset has captions and no labels")
        return evaluate_retrieval(
            protected, test, clean, victim=victim or "clip-vit", countermeasures=countermeasures, epochs=epochs or 30,
            seeds=seeds, batch_size=batch_size or 64, lr=lr or 5e-4, image_column=image_column, text_column=found.text,
            resolution=resolution or 64, device=device, quality=quality, progress=progress,
        )  # fmt: skip
    victim, epochs, batch_size, resolution = victim or "convnet", epochs or 15, batch_size or 128, resolution or 32
    cms = parse_countermeasures(countermeasures)
    seeds = list(seeds)
    if not seeds:
        raise EvaluationError("seeds is empty")
    if epochs < 1:
        raise EvaluationError(f"epochs must be >= 1, got {epochs}")
    for name, ds in (("protected", protected), ("test", test), ("clean", clean)):
        if ds is not None and len(ds) == 0:
            raise EvaluationError(f"the {name} set is empty")
    pcols = _columns(protected, "protected", image_column, label_column)
    tcols = _columns(test, "test", image_column, label_column)
    _check_features(protected, pcols, test, tcols, "test")
    ccols = None
    if clean is not None:
        ccols = _columns(clean, "clean", image_column, label_column)
        _check_features(protected, pcols, clean, ccols, "clean")
        if len(clean) != len(protected):
            raise EvaluationError(
                f"the clean set has {len(clean)} rows and the protected set {len(protected)}: pass the same split before and after protection"
            )
    if clean is None and any(c.needs_clean for c in cms):
        raise EvaluationError("partial protection needs the clean training set: pass clean=...")

    load = dict(resolution=resolution, progress=progress)
    p = load_split(protected, pcols.image, label_column=pcols.label, desc="Loading protected", **load)
    t = load_split(test, tcols.image, label_column=tcols.label, desc="Loading test", **load)
    c = load_split(clean, ccols.image, label_column=ccols.label, desc="Loading clean", **load) if clean is not None else None
    label_feature = protected.features[pcols.label]
    specs = [] if relabel is None else [relabel] if isinstance(relabel, (str, Mapping)) or callable(relabel) else list(relabel)
    labellings: list[tuple[str, Relabel | None]] = [("own", None)] + [resolve_relabel(r) for r in specs]
    prepared = []
    for name, fn in labellings:
        if fn is not None:
            _check_source_names(fn, label_feature)
        py, ty = _apply_relabel(p.labels, fn), _apply_relabel(t.labels, fn)
        cy = _apply_relabel(c.labels, fn) if c is not None else None
        if c is not None and not torch.equal(cy, py):
            row = int((cy != py).nonzero()[0])
            raise EvaluationError(f"labels of the clean and protected sets differ (first at row {row}): they must be the same split")
        n = num_classes if (num_classes is not None and fn is None) else None
        if n is None:
            if isinstance(label_feature, datasets.ClassLabel) and fn is None:
                n = label_feature.num_classes
            elif isinstance(fn, NamedRelabel):
                n = len(fn.names)
            else:
                n = int(max(py.max(), ty.max())) + 1
        _check_range(py, n, "protected")
        _check_range(ty, n, "test")
        prepared.append((name, py, ty, cy, n))

    report = EvaluationReport(
        config={
            "victim": victim if isinstance(victim, str) else repr(victim),
            "epochs": epochs,
            "seeds": seeds,
            "batch_size": batch_size,
            "lr": lr,
            "resolution": resolution,
            "num_classes": prepared[0][4],
            "label_column": pcols.label,
            "relabelled": len(prepared) > 1,
            "labellings": {name: {"num_classes": n} for name, _, _, _, n in prepared},
            "train_images": len(protected),
            "test_images": len(test),
            "countermeasures": [cm.label for cm in cms],
            "uexamples": __version__,
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
        quality=dataset_quality(clean, protected, pcols.image) if (quality and clean is not None) else None,
    )
    for name, py, ty, cy, n in prepared:
        common = dict(arch=victim, epochs=epochs, batch_size=batch_size, lr=lr, num_classes=n, device=device, progress=progress)
        tag = "" if name == "own" else f" | {name}"
        clean_runs: dict[str, list[VictimResult]] = {}  # partial's baseline is plain clean training: train it once
        for cm in cms:
            prot_runs = [
                train_victim(p.images, py, t.images, ty, seed=s, countermeasure=cm, clean_x=c.images if c is not None else None,
                             desc=f"{cm.label}{tag} | protected | seed {s}", **common)  # fmt: skip
                for s in seeds
            ]
            clean_summary = None
            if c is not None:
                base = Countermeasure() if isinstance(cm, PartialProtection) else cm
                if base.label not in clean_runs:
                    clean_runs[base.label] = [
                        train_victim(c.images, cy, t.images, ty, seed=s, countermeasure=base,
                                     desc=f"{base.label}{tag} | clean | seed {s}", **common)  # fmt: skip
                        for s in seeds
                    ]
                clean_summary = _summary(clean_runs[base.label])
            prot_summary = _summary(prot_runs)
            ratio = None
            if clean_summary is not None and clean_summary["final_mean"] > 0:
                ratio = prot_summary["final_mean"] / clean_summary["final_mean"]
            report.results.append({"countermeasure": cm.label, "labels": name, "num_classes": n, "protected": prot_summary,
                                   "clean": clean_summary, "ratio": ratio})  # fmt: skip
    return report
