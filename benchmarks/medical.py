"""Medical images: SALM next to EM, SEM and CUDA, with metrics that mean something on imbalanced sets.

For each method: fit + map the train split (timed), image quality at the stored pixels (fraction of
pixels changed, PSNR, SSIM), for SALM whether every pixel outside its masks is bit-identical to the
original, then victims from scratch on the protected split, one per seed, each against a clean victim
of the same recipe and seed: accuracy, balanced accuracy (chance = 1 / classes) and macro one-vs-rest
AUC (chance = 0.5) on the clean test split. Victims train at the images' own size (28 px for MedMNIST).

    python benchmarks/medical.py --dataset ../shared/datasets/breastmnist --methods salm,em,sem,cuda
    python benchmarks/medical.py --dataset ../shared/datasets/breastmnist --seeds 0 --suffix _ablation \\
        --methods salm+mask_rule=intensity,salm+mask_rule=saliency
    python benchmarks/medical.py --figure   # masks and protected scans beside the originals

Method names as ``common.make_protector`` reads them (``salm+mask_ratio=0.1``). Results:
benchmarks/results/medical_<dataset><suffix>.json; ``--table`` prints the Markdown tables.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import torch

from common import RESULTS, SHARED_DATASETS, benchmark_parser, dispatch, fit_and_map, keep_other_methods, machine_info, make_protector
from uexamples.core.images import NativeImage, load_pil
from uexamples.evaluation import dataset_quality, dataset_to_tensors, train_victim
from uexamples.evaluation.countermeasures import parse_countermeasure


def stored_levels(ds: datasets.Dataset) -> list[np.ndarray]:
    """Each row's stored pixels as integer levels (C, H, W)."""
    raw = ds.cast_column("image", datasets.Image(decode=False))
    return [NativeImage.from_pil(load_pil(c, row=i), row=i).levels for i, c in enumerate(raw["image"])]


def outside_mask_report(clean: datasets.Dataset, protected: datasets.Dataset, masks: list[np.ndarray]) -> dict:
    """Is every changed pixel inside its image's mask? Also the mask's share of the pixels."""
    changed_outside, changed, in_mask = 0, 0, 0
    for o, p, m in zip(stored_levels(clean), stored_levels(protected), masks):
        diff = (o.astype(np.int64) != p).any(0)
        changed += int(diff.sum())
        changed_outside += int((diff & ~m).sum())
        in_mask += int(m.sum())
    total = sum(m.size for m in masks)
    return {"outside_mask_identical": changed_outside == 0, "pixels_changed_outside_mask": changed_outside,
            "mask_fraction": in_mask / total, "changed_fraction_of_mask": changed / max(1, in_mask)}  # fmt: skip


def summary(runs: list[dict]) -> dict:
    out = {"runs": runs}
    for key in ("final_accuracy", "final_balanced_accuracy", "final_auc"):
        vals = [r[key] for r in runs]
        out[key] = {"mean": float(np.mean(vals)), "std": float(np.std(vals))}
    return out


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    name = Path(args.dataset).name
    if "@" in name:  # a variant of a shared dataset (generalisation.py's steps, e.g. retinamnist@binary)
        from generalisation import derive

        train, test = derive(name, "train"), derive(name, "test")
    else:
        train = datasets.load_dataset(args.dataset, split="train")
        test = datasets.load_dataset(args.dataset, split="test")
    res = args.resolution or train[0]["image"].size[0]
    test_x, test_y = dataset_to_tensors(test, res)
    clean_x, clean_y = dataset_to_tensors(train, res)
    seeds = [int(s) for s in args.seeds.split(",")]
    classes = int(max(clean_y.max(), test_y.max())) + 1
    victim = dict(arch=args.victim, epochs=args.epochs, lr=args.lr, num_classes=classes, progress=not args.quiet,
                  countermeasure=parse_countermeasure(args.countermeasure))  # fmt: skip

    def victim_runs(x: torch.Tensor, tag: str, run_seeds: list[int]) -> list[dict]:
        return [train_victim(x, clean_y, test_x, test_y, seed=s, desc=f"{tag} victim seed {s}", **victim).to_dict() for s in run_seeds]

    report = {
        "dataset": name, "train_images": len(train), "test_images": len(test), "classes": classes,
        "preset": args.preset, "victim": {"arch": args.victim, "epochs": args.epochs, "lr": args.lr, "resolution": res,
                                         "countermeasure": victim["countermeasure"].label},
        "seeds": seeds, "fit_per_seed": args.fit_per_seed, "machine": machine_info(), "clean": {}, "methods": {},
    }  # fmt: skip
    # files written before the countermeasure option trained with the standard one
    recipe = lambda r: (r["dataset"], {"countermeasure": "standard", **r["victim"]}, r["seeds"], r["train_images"], r["machine"]["cpu_threads"])  # noqa: E731
    same = [json.loads(f.read_text()) for f in sorted(RESULTS.glob(f"medical_{name}*.json"))] if args.reuse_clean else []
    same = [r for r in same if recipe(r) == recipe(report)]
    # the clean victims are deterministic for a recipe and thread count: measured once, reused on request
    report["clean"] = same[0]["clean"] if same else summary(victim_runs(clean_x, "clean", seeds))
    c = report["clean"]
    print(f"[{name}] clean: acc {c['final_accuracy']['mean']:.3f} balanced {c['final_balanced_accuracy']['mean']:.3f} "
          f"AUC {c['final_auc']['mean']:.3f}", flush=True)  # fmt: skip
    out = RESULTS / f"medical_{name}{args.suffix}.json"
    if args.keep_others and out.exists():  # the clean victims must come out identical (deterministic training)
        report["methods"] = keep_other_methods(out, report, args.methods.split(","), lambda r: (
            r["clean"], r["victim"], r["preset"], r["seeds"], r["train_images"]))  # fmt: skip
    for method in args.methods.split(","):
        # --fit-per-seed: seed s fits its own protector (seed s) for the victim of seed s, so the spread
        # holds the fit's randomness too; otherwise one fit (seed 0) feeds every victim
        fit_seeds = seeds if args.fit_per_seed else [0]
        runs, fits = [], []
        for fit_seed in fit_seeds:
            protector = make_protector(method, args.preset, fit_seed)
            protected, fit_s, map_s = fit_and_map(protector, train, progress=not args.quiet, batch_size=256)
            fits.append({"seed": fit_seed, "fit_seconds": round(fit_s, 1), "map_seconds": round(map_s, 1),
                         "fit_stats": getattr(protector, "fit_stats", None),
                         "rules": protector.rules})  # what the preset's rules decided for this fit (e.g. a drawn class)
            if fit_seed == fit_seeds[0]:  # image quality and the mask check of the first fit
                row = {"config": {k: v for k, v in protector.public_config().items() if k != "key"},
                       "quality": dataset_quality(train, protected, "image", limit=None)}  # fmt: skip
                if protector.method == "salm":
                    row["mask"] = outside_mask_report(train, protected, protector.masks(train))
            px, _ = dataset_to_tensors(protected, res)
            runs += victim_runs(px, method, [fit_seed] if args.fit_per_seed else seeds)
        fit_s = float(np.mean([f["fit_seconds"] for f in fits]))
        map_s = float(np.mean([f["map_seconds"] for f in fits]))
        row.update(fit_seconds=round(fit_s, 1), map_seconds=round(map_s, 1), generation_seconds=round(fit_s + map_s, 1),
                   fit_stats=fits[0]["fit_stats"], rules=fits[0]["rules"], victims=summary(runs))  # fmt: skip
        if args.fit_per_seed:
            row["fits"] = fits
        report["methods"][method] = row
        v = row["victims"]
        print(f"[{name}] {method}: generation {fit_s + map_s:.0f} s, acc {v['final_accuracy']['mean']:.3f} balanced "
              f"{v['final_balanced_accuracy']['mean']:.3f} AUC {v['final_auc']['mean']:.3f}, "
              f"changed {100 * row['quality']['changed_pixels']:.1f} % PSNR {row['quality']['mean_psnr']:.1f}", flush=True)  # fmt: skip
        RESULTS.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=float))
    return report


def _pm(stat: dict, percent: bool = True) -> str:
    if percent:
        return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def table() -> str:
    lines = []
    for path in sorted(RESULTS.glob("medical_*.json")):
        rep = json.loads(path.read_text())
        c = rep["clean"]
        lines += [
            f"**{rep['dataset']}** ({rep['train_images']} train / {rep['test_images']} test, {rep['classes']} classes; "
            f"victim {rep['victim']['arch']} {rep['victim']['epochs']} epochs at {rep['victim']['resolution']} px"
            f"{', countermeasure ' + rep['victim']['countermeasure'] if rep['victim'].get('countermeasure', 'standard') != 'standard' else ''}, "
            f"seeds {','.join(map(str, rep['seeds']))}{' (one fit per seed)' if rep.get('fit_per_seed') else ''}; chance: balanced {100 / rep['classes']:.0f} %, AUC 0.5; "
            f"{rep['machine']['cpu_threads']} threads) - `{path.name}`",
            "",
            "| method | balanced acc. (%) | AUC | accuracy (%) | generation (s) | pixels changed | PSNR (dB) | SSIM | outside mask identical |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|",
            f"| clean | {_pm(c['final_balanced_accuracy'])} | {_pm(c['final_auc'], False)} | {_pm(c['final_accuracy'])} | - | - | - | - | - |",
        ]  # fmt: skip
        for method, m in rep["methods"].items():
            v, q = m["victims"], m["quality"]
            outside = "-" if "mask" not in m else ("yes" if m["mask"]["outside_mask_identical"] else "NO")
            lines.append(
                f"| {method} | {_pm(v['final_balanced_accuracy'])} | {_pm(v['final_auc'], False)} | "
                f"{_pm(v['final_accuracy'])} | {m['generation_seconds']:.0f} | {100 * q['changed_pixels']:.1f} % | "
                f"{q['mean_psnr']:.1f} | {q['mean_ssim']:.3f} | {outside} |"
            )
        lines.append("")
    return "\n".join(lines)


def figure(args) -> None:
    """Originals, SALM masks, protected images and the amplified change, for a few scans of each set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch.set_num_threads(args.threads)
    sets = ["breastmnist", "retinamnist"]
    per_set = 4
    fig, axes = plt.subplots(len(sets) * 4, per_set, figsize=(1.9 * per_set, 1.9 * 4 * len(sets)))
    for s, name in enumerate(sets):
        train = datasets.load_dataset(str(SHARED_DATASETS / name), split="train")
        protector = make_protector(args.methods.split(",")[0] if args.methods.startswith("salm") else "salm", args.preset, 0)
        protector.fit(train, progress=False)
        pick = train.select(range(per_set))
        protected = pick.map(protector, batched=True)
        masks = protector.masks(pick)
        for j, (o, p, m) in enumerate(zip(stored_levels(pick), stored_levels(protected), masks)):
            o, p = o.astype(float) / 255, p.astype(float) / 255
            change = np.abs(p - o).max(0)
            show = [o, m.astype(float), p, change / max(change.max(), 1e-9)]
            titles = ["original", "mask", "protected", "change (scaled)"]
            for r, (img, title) in enumerate(zip(show, titles)):
                ax = axes[4 * s + r, j]
                ax.imshow(img.transpose(1, 2, 0) if img.ndim == 3 and img.shape[0] == 3 else np.squeeze(img),
                          cmap="gray", vmin=0, vmax=1, interpolation="nearest")  # fmt: skip
                ax.set_xticks([]), ax.set_yticks([])
                if j == 0:
                    ax.set_ylabel(f"{name}\n{title}" if r == 0 else title, fontsize=8)
    cfg = protector.public_config()
    fig.suptitle(f"SALM ({cfg['mask_rule']} mask, {100 * cfg['mask_ratio']:g} % of pixels, {round(255 * cfg['epsilon'])}/255)", fontsize=10)
    fig.tight_layout()
    out = RESULTS / "medical_salm.png"
    fig.savefig(out, dpi=110)
    print(out)


def main(argv=None) -> None:
    p = benchmark_parser(__doc__)
    p.add_argument("--dataset", default=str(SHARED_DATASETS / "breastmnist"))
    p.add_argument("--methods", default="salm,em,sem,cuda")
    p.add_argument("--preset", default="fast")
    p.add_argument("--victim", default="convnet")
    p.add_argument("--epochs", type=int, default=40, help="victim epochs (40: the medical tables; 15 left BreastMNIST's clean victim at 58-61 %% balanced)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--fit-per-seed", action="store_true", help="one fit per seed (protector seed = victim seed), not one fit for all")
    p.add_argument("--countermeasure", default="standard", help="what the victims do (frame:20/255: black out the scans' frame)")
    p.add_argument("--resolution", type=int, default=0, help="victim input size (default: the images' own)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--suffix", default="")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--figure", action="store_true", help="draw results/medical_salm.png and exit")
    p.add_argument("--keep-others", action="store_true", help="keep the other methods' rows (clean victims must match)")
    p.add_argument("--reuse-clean", action="store_true",
                   help="take the clean victims from a results file of this dataset with the same recipe and threads")
    args = p.parse_args(argv)
    if args.figure:
        figure(args)
    else:
        dispatch(p, run, table, argv)


if __name__ == "__main__":
    main()
