"""Generalisation: does a preset protect on data it was not tuned on, and what does its fit cost there?

Datasets are the shared ones and variants derived from them by a spec ``BASE[@T[@T...]]``:

- ``@L``: grayscale (mode L), as many user datasets are;
- ``@28``, ``@64`` ...: every image resized (bicubic) to that many pixels a side;
- ``@RGBA``: an alpha channel added (fully opaque), as PNG exports often carry one;
- ``@I16``: 16-bit grey (mode I;16), as scientific and medical scans are stored;
- ``@c5``: only the rows of the first 5 classes (another class count; labels unchanged);
- ``@binary``: class 0 against every other class (a two-class task on the same images; ``retinamnist@binary``);
- ``@shuffle``: both splits in a seeded random order (seed 0), before ``@n``/``@t`` on a split stored
  sorted by class (cifar10-jpeg: its first 8,000 train rows are two classes);
- ``@n500``: the first 500 rows of the train split (the test split is kept whole);
- ``@t2000``: the first 2,000 rows of the test split (a cheaper score on a big test split);
- ``@xtest``: the train rows come from the test split, after the rows ``@tN`` keeps for testing
  (``cifar10-jpeg@xtest@shuffle@t2000@n8000``: train and test both from one split, as in cifar10-10k);
- ``@o8000``: the train split without its first 8,000 rows, so ``@shuffle@o8000@n8000`` is another 8,000
  images of the same source, disjoint from ``@shuffle@n8000`` (how much of a cell is which images);
- ``@jpeg``: every image through a JPEG round trip at quality 75 (PIL's libjpeg, 4:2:0), as cifar10-jpeg
  was stored: the tune images with the confirm photos' storage, to tell that storage from their content;
- ``@dark``: everything outside a central disc (radius 0.4 of the side, half the image) set to black,
  the way scans, fundus photos and product shots sit on a black, flat background where the pixels
  are at 0 and noise can only go up;
- ``@flat``: the same disc on a mid-grey (128) background: flat like ``@dark``, but the noise can move both
  ways there (tells the one-way pixels from the flat region).

    python benchmarks/generalisation.py --variants cifar10-10k@n500,cifar10-10k@n2000 --methods sem,sem+train_epochs=null
    python benchmarks/generalisation.py --variants cifar10-10k@L@28 --methods sem,sem+resolution=native

For each variant: a clean victim and, per method, fit + map of the train split (timed, with the fit
steps taken) and a victim trained on the protected split, both scored on the clean test split (final
and best accuracy). Victims: ``--victims`` (default ``convnet,resnet20``), seed 0; small train splits get more
epochs so that every victim takes about as many SGD steps as one on 8,000 images (at most 100 epochs).
Method names as ``common.make_protector`` reads them (``sem+train_epochs=null`` is SEM with a fixed
fit length).

``--protect-at N`` (a diagnostic, not a product path) protects each train image resized to N px and
enlarges the protected image back to the variant's size (bicubic both ways); the method ``none`` then
measures what the two resizes alone cost the victim. On enlarged images (``@64``) it asks whether a
method's protection at the images' original size would survive at the larger one, and so whether a
shortfall comes from the method at that size or from the victim.

Every victim records its final model's recall per class and the share of the test images it gives each class.
``--monitor N`` (a diagnostic) also scores the first N training images after every victim epoch, clean and
protected: when a victim learns the shortcut, and how much of the real images it learns beside it.
``--shuffle-noise within|next-class`` (a diagnostic) also trains the victims on the same stored noises moved onto
other images of their class, or onto the images of the previous class with the labels kept
(``--moved-noise-only``: only those). ``--diagnosis`` prints the table of the monitored victims:

    python benchmarks/generalisation.py --variants cifar10-10k --methods sem --victims convnet --monitor 2000 \
        --shuffle-noise within --suffix _shuffle_cifar10k

    python benchmarks/generalisation.py --diagnosis

``--saturate-noise`` (a diagnostic) also trains the victims on the stored noise pushed to +-epsilon in its own signs
(``METHOD@saturated_noise``): the same pattern at full strength, to ask whether the noise's energy is what is missing.

Results: benchmarks/results/generalisation<suffix>.json (one entry per variant, merged with the file's
other variants); ``--table`` prints the Markdown table.
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image

from common import RESULTS, SHARED_DATASETS, benchmark_parser, dispatch, fit_and_map, machine_info, make_protector
from uexamples.evaluation import dataset_quality, dataset_to_tensors, parse_countermeasure, train_victim
from uexamples.evaluation.countermeasures import jpeg_round_trip, split_specs

REFERENCE_IMAGES = 8000  # victims on smaller splits train for proportionally more epochs


def derive(spec: str, split: str) -> datasets.Dataset:
    """The split of the variant ``spec`` (see the module docstring); deterministic."""
    base, *steps = spec.split("@")
    train_from_test = "xtest" in steps and split == "train"
    ds = datasets.load_dataset(str(SHARED_DATASETS / base), split="test" if train_from_test else split)
    for step in steps:
        if step in PER_IMAGE:
            transform, what = PER_IMAGE[step]
            ds = each_image(ds, transform, f"{spec}: {what}")
        elif step.isdigit():
            size = int(step)
            ds = each_image(ds, lambda im: im.resize((size, size), Image.BICUBIC), f"{spec}: {size} px")
        elif step[0] == "o" and step[1:].isdigit():
            if split == "train":  # another window of a large train split: @o8000@n8000 is rows 8,000-15,999
                ds = without_first(ds, int(step[1:]))
        elif step[0] in "nt" and step[1:].isdigit():
            n = int(step[1:])
            if train_from_test and step[0] == "t":  # @xtest: the test rows are the split's first n, train on the rest
                ds = without_first(ds, n)
            elif split == {"n": "train", "t": "test"}[step[0]]:
                ds = ds.select(range(min(n, len(ds))))
        elif step == "xtest":
            pass  # it chose the split loaded above
        elif step[0] == "c" and step[1:].isdigit():
            k = int(step[1:])
            ds = ds.filter(lambda b: [y < k for y in b["label"]], batched=True, desc=f"{spec}: {k} classes")
        elif step == "shuffle":
            ds = ds.shuffle(seed=0).flatten_indices()
        elif step == "binary":  # class 0 against every other class (a two-class task on the same images)
            names = ds.features["label"].names if hasattr(ds.features["label"], "names") else ["0"]
            ds = ds.map(lambda b: {"label": [int(y > 0) for y in b["label"]]}, batched=True, desc=f"{spec}: binary")
            ds = ds.cast_column("label", datasets.ClassLabel(names=[names[0], "not " + names[0]]))
        else:
            raise ValueError(f"unknown variant step {step!r} in {spec!r} ({', '.join(PER_IMAGE)}, shuffle, binary, xtest, a size in px, cK, oN, nN or tN)")
    return ds


def without_first(ds: datasets.Dataset, n: int) -> datasets.Dataset:
    """``ds`` without its first ``n`` rows (``@oN``, and ``@xtest``'s train rows after the test window)."""
    return ds.select(range(min(n, len(ds)), len(ds)))


def each_image(ds: datasets.Dataset, transform, desc: str) -> datasets.Dataset:
    """``ds`` with ``transform`` applied to every image."""
    return ds.map(lambda b: {"image": [transform(im) for im in b["image"]]}, batched=True, desc=desc)


def grey16(image: Image.Image) -> Image.Image:
    """``image`` as 16-bit grey (mode I;16, values 0-65535, as scientific and medical scans are stored): the
    8-bit grey value v becomes 257 * v, so 0 and 255 map to the ends of the 16-bit range."""
    a = np.asarray(image.convert("L")).astype(np.uint16) * 257
    return Image.fromarray(a)  # uint16 gives mode I;16


def black_background(image: Image.Image, level: int = 0) -> Image.Image:
    """``image`` with everything outside a central disc of radius 0.4 * side at exactly 0 (``@dark``), or at
    ``level`` (``@flat``: mid-grey 128, a flat background the noise can move both ways, so that the dark variant's
    one-way pixels and its flat region can be told apart)."""
    w, h = image.size
    yy, xx = np.mgrid[:h, :w]
    inside = (xx + 0.5 - w / 2) ** 2 + (yy + 0.5 - h / 2) ** 2 <= (0.4 * min(w, h)) ** 2
    a = np.asarray(image)
    return Image.fromarray(np.where(inside.reshape(h, w, *[1] * (a.ndim - 2)), a, level).astype(a.dtype), mode=image.mode)


# variant steps that change every image alone: name -> (transform, what the progress bar says)
PER_IMAGE = {
    "L": (lambda im: im.convert("L"), "grey"),
    "RGBA": (lambda im: im.convert("RGBA"), "RGBA"),
    "I16": (grey16, "16-bit grey"),
    "dark": (black_background, "dark"),
    "flat": (lambda im: black_background(im, 128), "mid-grey background"),
    "jpeg": (lambda im: jpeg_round_trip(im, 75), "JPEG q75 round trip"),  # as cifar10-jpeg was stored
}


def victim_epochs(base_epochs: int, images: int) -> int:
    """About as many SGD steps as ``base_epochs`` on 8,000 images, at most 100 epochs."""
    return int(min(100, max(base_epochs, math.ceil(base_epochs * REFERENCE_IMAGES / images))))


def victim_spec(name: str) -> dict:
    """``ARCH[@COUNTERMEASURE][#SEED]`` -> train_victim's arguments: ``convnet`` (seed 0), ``convnet@orthogonal``
    (under a countermeasure), ``convnet#1`` (victim seed 1: how much of a cell's spread is the victim's own)."""
    name, _, seed = name.partition("#")
    arch, _, countermeasure = name.partition("@")
    return {"arch": arch, "countermeasure": parse_countermeasure(countermeasure) if countermeasure else None,
            "seed": int(seed) if seed else 0}  # fmt: skip


def victim_names(text: str) -> list[str]:
    """The ``--victims`` list: comma-separated, a ``key=value`` part belonging to the name before it
    (``convnet,convnet@orthogonal,test=1#1`` is two victims)."""
    return split_specs(text, lambda part: "=" in part.split("#")[0])


def measured_clean(spec: str, arch: str, epochs: int, with_curves: bool = False) -> dict | None:
    """The clean victim of this variant and recipe if a results file already holds it (runs side by side
    write different files; the seeded 1-thread victim gives the same numbers every time); ``with_curves``: only
    one recorded with ``--monitor``."""
    for path in sorted(RESULTS.glob("generalisation*.json")):
        entry = json.loads(path.read_text())["variants"].get(spec)
        if entry and entry.get("victim_epochs") == epochs and arch in entry.get("clean", {}):
            if with_curves and "curves" not in entry["clean"][arch]:
                continue
            return entry["clean"][arch]
    return None


def run(args) -> dict:
    if args.diagnosis:
        print(diagnosis_table())
        return {}
    if args.figure:
        print(figure())
        return {}
    if args.moved_noise_only and not (args.shuffle_noise or args.saturate_noise):
        raise SystemExit("--moved-noise-only needs --shuffle-noise within|next-class or --saturate-noise (else no victim would train)")
    torch.set_num_threads(args.threads)
    if args.quiet:
        datasets.disable_progress_bars()
    out = RESULTS / f"generalisation{args.suffix}.json"
    report = json.loads(out.read_text()) if out.exists() else {"variants": {}}
    report["machine"] = machine_info()
    RESULTS.mkdir(parents=True, exist_ok=True)
    for spec in args.variants.split(","):
        train, test = derive(spec, "train"), derive(spec, "test")
        res = train[0]["image"].size[0]
        test_x, test_y = dataset_to_tensors(test, res)
        clean_x, clean_y = dataset_to_tensors(train, res)
        epochs = victim_epochs(args.epochs, len(train))
        entry = {"suite": args.suite, "train_images": len(train), "test_images": len(test), "size": res,
                 "mode": train[0]["image"].mode, "victim_epochs": epochs, "clean": {}, "methods": {}}  # fmt: skip
        old = report["variants"].get(spec)
        victims = victim_names(args.victims)
        for arch in victims:
            measured = measured_clean(spec, arch, epochs, with_curves=bool(args.monitor))
            if measured is not None:
                entry["clean"][arch] = measured  # deterministic: measured once for this recipe, in any results file
            else:
                r = train_victim(clean_x, clean_y, test_x, test_y, epochs=epochs, progress=not args.quiet,
                                 desc=f"{spec} clean {arch}", monitor=monitors(args.monitor, clean_x, clean_y),
                                 **victim_spec(arch))  # fmt: skip
                entry["clean"][arch] = victim_row(r)
            print(f"[{spec}] clean {arch}: {entry['clean'][arch]['final']:.4f}", flush=True)
        if old:
            entry["methods"] = {m: v for m, v in old.get("methods", {}).items() if m not in args.methods.split(",")}
        report["variants"][spec] = entry
        out.write_text(json.dumps(report, indent=2, default=float))  # the clean victims, for runs side by side
        for method in args.methods.split(","):
            protector, protected, fit_s, map_s = protect(method, args, train, res)
            if args.protect_at:
                method = f"{method}@protect_at={args.protect_at}"
            px, _ = dataset_to_tensors(protected, res)
            row = {"fit_seconds": round(fit_s, 1), "map_seconds": round(map_s, 1),
                   "fit_steps": (getattr(protector, "fit_stats", None) or {}).get("steps"),
                   "rules": getattr(protector, "rules", None) or {},  # what the preset's rules decided for this data
                   # the surrogate's running accuracy on the noisy fit batches at the end: did the noise become a shortcut?
                   "fit_train_accuracy": (getattr(protector, "fit_stats", None) or {}).get("train_accuracy"),
                   "quality": dataset_quality(train, protected, "image", limit=200), "victims": {}}  # fmt: skip
            trained_on = [] if args.moved_noise_only else [(method, px, row)]
            if args.shuffle_noise:
                moved, shift = MOVED_NOISE[args.shuffle_noise]
                trained_on.append((f"{method}@{moved}", moved_noise(px, clean_x, clean_y, shift=shift), dict(row, victims={})))
            if args.saturate_noise:
                eps = float(protector.config.epsilon)
                trained_on.append((f"{method}@saturated_noise", saturated_noise(px, clean_x, eps), dict(row, victims={})))
            for name, images, out_row in trained_on:
                for arch in victims:
                    r = train_victim(images, clean_y, test_x, test_y, epochs=epochs, progress=not args.quiet,
                                     desc=f"{spec} {name} {arch}", monitor=monitors(args.monitor, clean_x, clean_y, images),
                                     **victim_spec(arch))  # fmt: skip
                    out_row["victims"][arch] = victim_row(r)
                    print(f"[{spec}] {name} {arch}: final {r.final_accuracy:.4f} ({r.final_accuracy / entry['clean'][arch]['final']:.2f}"
                          f" of clean), fit {fit_s:.0f} s ({row['fit_steps']} steps), map {map_s:.0f} s", flush=True)  # fmt: skip
                entry["methods"][name] = out_row
                report["variants"][spec] = entry
                out.write_text(json.dumps(report, indent=2, default=float))  # after every victim set: a long run keeps its rows
    return report


# --shuffle-noise: the results row's name and the class shift of moved_noise ("within": each noise onto another
# image of its class; "next-class": each image a noise made for the next class, labels kept)
MOVED_NOISE = {"within": ("shuffled_noise", 0), "next-class": ("noise_of_next_class", 1)}


def saturated_noise(protected_x: torch.Tensor, clean_x: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``--saturate-noise``: every changed value pushed to the bound in the direction it moved (+-epsilon, clipped to
    [0, 1]), unchanged values left: the same signs at full strength (is the noise's energy what the victim lacks?)."""
    return (clean_x + epsilon * torch.sign(protected_x - clean_x)).clamp(0, 1)


def moved_noise(protected_x: torch.Tensor, clean_x: torch.Tensor, y: torch.Tensor, shift: int = 0, seed: int = 0) -> torch.Tensor:
    """``--shuffle-noise``: every image gets the stored noise of a random image of class (its class + ``shift``) mod
    classes (a seeded draw; ``shift=0``: a permutation within each class), clipped to [0, 1]; the labels stay.
    shift 0: the noise still tells the class but no longer belongs to the image under it (does a protected victim's
    leftover accuracy come from noise that follows its image's content?); shift 1: the noise a class's images carry
    was made for the next class (does a class's noise look to a victim like that class's real images?)."""
    noise = protected_x - clean_x
    classes = int(y.max()) + 1
    gen = torch.Generator().manual_seed(seed)
    order = torch.arange(len(y))
    for c in range(classes):
        rows, donors = (y == c).nonzero().flatten(), (y == (c + shift) % classes).nonzero().flatten()
        # within a class a permutation (every noise used once); from another class a draw (class sizes differ)
        pick = torch.randperm(len(rows), generator=gen) if shift == 0 else torch.randint(len(donors), (len(rows),), generator=gen)
        order[rows] = donors[pick]
    return (clean_x + noise[order]).clamp(0, 1)


def monitors(rows: int, clean_x: torch.Tensor, y: torch.Tensor, protected_x: torch.Tensor | None = None) -> dict:
    """``--monitor N``: the first N training images scored after every victim epoch, clean (what the victim learns
    of the real images it trains on) and, for a protected victim, as protected (when it learns the shortcut)."""
    if not rows:
        return {}
    sets = {"clean_train": (clean_x[:rows], y[:rows])}
    if protected_x is not None:
        sets["protected_train"] = (protected_x[:rows], y[:rows])
    return sets


def victim_row(r) -> dict:
    """A victim's entry: final and best test accuracy, and what its final model predicts per class on the test
    split (recall of each class, share of the test images given each class); with ``--monitor`` the curves."""
    row = {"final": r.final_accuracy, "best": r.best_accuracy, "recall_per_class": r.final_recall_per_class,
           "prediction_share": r.final_prediction_share}  # fmt: skip
    if r.monitor_curves:
        row["curves"] = {"test": r.curve, **r.monitor_curves}
    return row


def protect(method: str, args, train: datasets.Dataset, res: int):
    """(protector, protected train split, fit s, map s); with ``--protect-at`` through the smaller size and back."""
    if not args.protect_at:
        protector = make_protector(method, args.preset, 0)
        return (protector, *fit_and_map(protector, train, progress=not args.quiet))
    small = each_image(train, lambda im: im.resize((args.protect_at,) * 2, Image.BICUBIC), f"to {args.protect_at} px")
    if method == "none":  # the resizes alone
        protector, protected, fit_s, map_s = None, small, 0.0, 0.0
    else:
        protector = make_protector(method, args.preset, 0)
        protected, fit_s, map_s = fit_and_map(protector, small, progress=not args.quiet)
    return protector, each_image(protected, lambda im: im.resize((res, res), Image.BICUBIC), f"back to {res} px"), fit_s, map_s


def results_variants():
    """Every variant entry of every committed results file, in file order: (file name, variant spec, entry)."""
    for path in sorted(RESULTS.glob("generalisation*.json")):
        for spec, e in json.loads(path.read_text())["variants"].items():
            yield path.name, spec, e


def table() -> str:
    """One table per suite, every results file merged: a row per dataset and method, a column per victim."""
    rows: dict[str, dict] = {}
    for name, spec, e in results_variants():
        for method, m in e["methods"].items():
            # a later file replaces a row of the same victims (a re-run); other victims get their own row
            rows.setdefault(e.get("suite", "tune"), {})[(spec, method, tuple(sorted(m["victims"])))] = (e, m, name)
    lines = []
    for suite in ("tune", "confirm"):
        if suite not in rows:
            continue
        # a fixed column order (the two base victims, then the others by name), so a new file adds a column, never reorders
        archs = sorted({a for e, m, _ in rows[suite].values() for a in m["victims"]}, key=lambda a: (a != "convnet", a != "resnet20", a))
        lines += [f"**{suite}** suite: victim final accuracy on the clean test split (fraction of the clean victim's), best epoch after the slash", "",
                  "| dataset | images | method | fit steps | fit + map (s) | " + " | ".join(archs) + " | clean " + " / ".join(archs) + " | file |",
                  "|---|---:|---|---:|---:|" + "---:|" * len(archs) + "---:|---|"]  # fmt: skip
        for (spec, method, _), (e, m, name) in rows[suite].items():
            cells = []
            for a in archs:
                v, c = m["victims"].get(a), e["clean"].get(a)
                cells.append(f"{100 * v['final']:.1f} % ({v['final'] / c['final']:.2f}) / {100 * v['best']:.1f}" if v else "-")
            clean = " / ".join(f"{100 * e['clean'][a]['final']:.1f}" if a in e["clean"] else "-" for a in archs)
            lines.append(f"| {spec} ({e['size']} px {e['mode']}) | {e['train_images']} | {method} | {m['fit_steps'] or '-'} | "
                         f"{m['fit_seconds'] + m['map_seconds']:.0f} | " + " | ".join(cells) + f" | {clean} | `{name}` |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


PRESET_ROW = re.compile(r"^(sem|em|cuda)(\+seed=\d+)?$")  # a fast preset as it is today, one fit (or key) per seed
SAME_AS_PRESET = {"cuda+filter_scale=auto": "cuda"}  # rows run with the preset's own value spelt out (key 0 at 64 px)


def confirm_points() -> tuple[dict[tuple[str, str, str], list[float]], dict[str, dict]]:
    """Per confirm cell, preset and victim, each fit's score as the issue's target reads it: the fraction of the clean
    victim's accuracy, or on a set of K < 10 classes the share of the margin above chance (its translated target);
    and each confirm cell's entry (size, mode, images) for the figure's labels."""
    rows: dict[tuple[str, str, str], tuple[str, float]] = {}  # (cell, preset row, victim) -> (preset, score)
    cells: dict[str, dict] = {}
    for _, spec, e in results_variants():
        if e.get("suite") != "confirm":
            continue
        cells[spec] = e
        classes = classes_of(spec)
        for method, m in e["methods"].items():
            method = SAME_AS_PRESET.get(method, method)
            match = PRESET_ROW.match(method)
            if not match:
                continue
            for arch, v in m["victims"].items():
                if arch in ("convnet", "resnet20") and arch in e["clean"]:
                    clean, chance = e["clean"][arch]["final"], 1 / classes
                    score = v["final"] / clean if classes == 10 else (v["final"] - chance) / (clean - chance)
                    rows[(spec, method, arch)] = (match.group(1), score)  # a later file's re-run replaces the row
    points: dict[tuple[str, str, str], list[float]] = {}
    for (spec, _, arch), (preset, score) in rows.items():
        points.setdefault((spec, preset, arch), []).append(score)
    return points, cells


def classes_of(spec: str) -> int:
    """Classes of a variant: ``@cK`` keeps the first K, every shared set of this suite has 10."""
    found = re.search(r"@c(\d+)", spec)
    return int(found.group(1)) if found else 10


def cell_label(spec: str, e: dict) -> str:
    """A short name for a confirm cell, from what the variant changes."""
    words = [f"{e['size']} px {'grey' if e['mode'] in ('L', 'I;16') else e['mode']}", f"{e['train_images']:,} images"]
    words += [w for step, w in (("@dark", "black surround"), ("@o", "second window"), ("@xtest", "test photos"), ("@I16", "16-bit"))
              if step in spec]  # fmt: skip
    if classes_of(spec) != 10:
        words.append(f"{classes_of(spec)} classes")
    return "\n".join(words)


def figure() -> Path:
    """benchmarks/results/generalisation_confirm.png: every confirm cell, the fast presets (SEM, EM, CUDA) against
    each victim, one dot per fit or key and a bar at their mean, with the issue's target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, entries = confirm_points()
    cells = sorted({spec for spec, _, _ in points}, key=lambda s: (entries[s]["size"], entries[s]["mode"] != "RGB", entries[s]["train_images"], s))
    slots = [(m, a) for m in ("sem", "em", "cuda") for a in ("convnet", "resnet20")]
    colours = {"sem": "tab:blue", "em": "tab:orange", "cuda": "tab:green"}
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(cells)), 4.6))
    width = 0.8 / len(slots)
    for i, spec in enumerate(cells):
        for j, (method, arch) in enumerate(slots):
            scores = points.get((spec, method, arch))
            if not scores:
                continue
            x = i - 0.4 + width * (j + 0.5)
            ax.bar(x, np.mean(scores), width * 0.9, color=colours[method], alpha=0.35 if arch == "resnet20" else 0.7,
                   hatch="//" if arch == "resnet20" else None, edgecolor=colours[method])  # fmt: skip
            ax.plot([x] * len(scores), scores, "k.", markersize=4)
        target = 0.25 if classes_of(spec) == 10 else 0.125
        ax.plot([i - 0.45, i + 0.45], [target, target], "r-", linewidth=1.5)
    ax.set_xticks(range(len(cells)), [cell_label(s, entries[s]) for s in cells], fontsize=7)
    ax.set_ylabel("victim / clean victim\n(5 classes: share of the margin above chance)", fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[m], alpha=0.7) for m in colours]
    handles += [plt.Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="grey", hatch="//"), plt.Line2D([], [], color="r")]
    ax.legend(handles, ["SEM", "EM", "CUDA", "resnet20 victim (plain: convnet)", "target"], fontsize=7, ncol=5, loc="upper left")
    ax.set_title("Fast presets on the confirm suite (never tuned on): one dot per fit or key, bars at the mean", fontsize=9)
    fig.tight_layout()
    out = RESULTS / "generalisation_confirm.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


@functools.lru_cache(maxsize=None)
def class_names(base: str) -> list[str]:
    """The label names of a shared dataset (its test split's ClassLabel), or none."""
    feature = datasets.load_dataset(str(SHARED_DATASETS / base), split="test").features.get("label")
    return list(getattr(feature, "names", None) or [])


def diagnosis_table() -> str:
    """The victims recorded with ``--monitor``: per epoch, accuracy on the first N training images clean (what the
    victim learns of the real images) and protected (the shortcut), the test accuracy, and at the end the classes
    the final model gives most of the test images (a protected victim falls back on a few)."""
    lines = ["| dataset | victim | epoch: test / train clean / train protected (%) | final test | most predicted classes (share of test) | file |",
             "|---|---|---|---:|---|---|"]  # fmt: skip
    shown = set()
    for name, spec, e in results_variants():
        runs = [(f"clean {a}", v) for a, v in e["clean"].items()]
        runs += [(f"{method} {a}", v) for method, m in e["methods"].items() for a, v in m["victims"].items()]
        for who, v in runs:
            if "curves" not in v or (spec, who) in shown and who.startswith("clean"):
                continue  # a clean victim reused by later files is shown once
            shown.add((spec, who))
            c = v["curves"]
            epochs = len(c["test"])
            marks = sorted({1, 2, 3, epochs // 2, epochs})
            cells = ", ".join(
                f"{k}: {100 * c['test'][k - 1]:.0f} / {100 * c['clean_train'][k - 1]:.0f}"
                + (f" / {100 * c['protected_train'][k - 1]:.0f}" if "protected_train" in c else "")
                for k in marks
            )
            share = v.get("prediction_share") or []
            top = sorted(range(len(share)), key=lambda k: -share[k])[:3]
            names = class_names(spec.split("@")[0])
            most = ", ".join(f"{names[k] if k < len(names) else k} {100 * share[k]:.0f} %" for k in top)
            lines.append(f"| {spec} | {who} | {cells} | {100 * v['final']:.1f} % | {most} | `{name}` |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = benchmark_parser(__doc__)
    p.add_argument("--variants", default="cifar10-10k@n500,cifar10-10k@n2000")
    p.add_argument("--methods", default="sem,em")
    p.add_argument("--preset", default="fast")
    p.add_argument("--victims", default="convnet,resnet20",
                   help="victim architectures; ARCH@COUNTERMEASURE trains it under a countermeasure (convnet@orthogonal), "
                        "ARCH#SEED with another victim seed (convnet#1; default 0)")
    p.add_argument("--suite", default="tune", choices=("tune", "confirm"),
                   help="which suite the variants belong to: presets are chosen on 'tune' and only measured on 'confirm'")
    p.add_argument("--epochs", type=int, default=12, help="victim epochs on 8,000 images (more on smaller splits)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--suffix", default="", help="results file generalisation<suffix>.json (runs side by side)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--monitor", type=int, default=0, metavar="N",
                   help="diagnostic: score the first N training images after every victim epoch, clean and protected "
                        "(when the shortcut is learned, how much of the real images beside it); the clean victim is retrained "
                        "unless a results file holds one recorded with curves")
    p.add_argument("--shuffle-noise", choices=tuple(MOVED_NOISE),
                   help="diagnostic: also train the victims on the same noises moved onto other images of their class "
                        "(within: row METHOD@shuffled_noise) or onto the images of the previous class, labels kept "
                        "(next-class: METHOD@noise_of_next_class)")
    p.add_argument("--saturate-noise", action="store_true",
                   help="diagnostic: also train the victims on the noise pushed to +-epsilon in its own signs (METHOD@saturated_noise)")
    p.add_argument("--moved-noise-only", action="store_true",
                   help="with --shuffle-noise or --saturate-noise: only those victims (the method's own were measured before)")
    p.add_argument("--protect-at", type=int, default=0, metavar="N",
                   help="diagnostic: protect the images resized to N px, then enlarge them back (method 'none': resizes only)")
    p.add_argument("--diagnosis", action="store_true", help="print the table of the victims recorded with --monitor and exit")
    p.add_argument("--figure", action="store_true",
                   help="draw results/generalisation_confirm.png (the fast presets on the confirm suite, every fit) and exit")
    dispatch(p, run, table, argv)


if __name__ == "__main__":
    main()
