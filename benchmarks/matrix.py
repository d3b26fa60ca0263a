"""The effectiveness matrix: methods x countermeasures, each against the clean baseline of the same run.

Protected training sets are generated once (timed, cached under benchmarks/.cache), then for every
countermeasure one victim is trained from scratch on the clean training set and one on each
method's protected set, with the same recipe and seed, and scored on the clean test set.

CPU scale (this 2-core machine; run two halves in parallel, one thread each)::

    python benchmarks/matrix.py --countermeasures standard,cutout,mixup,grayscale,jpeg:10 --part a
    python benchmarks/matrix.py --countermeasures bitdepth:2,blur:1,adv:4/255,adv:8/255,partial:0.5 --part b

GPU scale (a lent GPU: CIFAR-10 50k JPEG source, CIFAR ResNet-18, the papers' presets)::

    python benchmarks/matrix.py --scale gpu

Results: benchmarks/results/matrix_<dataset>_<part>.json; ``--table`` prints the merged Markdown table
and draws the heatmap results/matrix_<dataset>.png.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import datasets
import numpy as np
import torch

from common import RESULTS, SHARED_DATASETS, benchmark_parser, dispatch, fit_and_map, machine_info, make_protector
from uexamples.core.loading import load_split
from uexamples.evaluation import dataset_quality, parse_countermeasures, train_victim
from uexamples.evaluation.countermeasures import Countermeasure, PartialProtection

HERE = Path(__file__).parent
CACHE = HERE / ".cache"

COLUMN_ORDER = ["sem", "em", "cuda", "cuda-paper", "rem", "sem@16"]  # table and heatmap columns; others follow
ALL = "standard,cutout,mixup,grayscale,jpeg:10,bitdepth:2,blur:1,adv:4/255,adv:8/255,partial:0.5"

SCALES = {
    # adversarial training uses 2 PGD steps on CPU (10 in the papers) to fit the machine; see README
    "cpu": dict(dataset="cifar10-10k", methods="sem,em,cuda", preset="fast", victim="smallcnn", epochs=10,
                batch_size=128, adv_steps=2, device="cpu"),  # fmt: skip
    "gpu": dict(dataset="cifar10-jpeg", methods="sem,em,rem,cuda", preset="paper", victim="resnet18", epochs=40,
                batch_size=128, adv_steps=10, device="cuda"),  # fmt: skip
}


def protected_split(train: datasets.Dataset, name: str, method: str, preset: str, seed: int, device: str):
    """Generate (or reuse from the cache) the protected training split; returns it and its generation record.

    The cache folder is named by a hash of the protector's public config, so that a changed preset is
    generated again rather than read back stale.
    """
    prot = make_protector(method, preset, seed, device)
    config = json.dumps({k: v for k, v in prot.public_config().items() if k != "device"}, sort_keys=True, default=str)
    folder = CACHE / name / f"{method}-{preset}-seed{seed}-n{len(train)}-{hashlib.sha256(config.encode()).hexdigest()[:10]}"
    record_path = folder / "generation.json"
    if record_path.is_file():
        return datasets.load_from_disk(str(folder / "dataset")), json.loads(record_path.read_text())
    out, fit_s, map_s = fit_and_map(prot, train, progress=True, desc=f"Protecting ({method})")
    record = {"fit_seconds": round(fit_s, 1), "map_seconds": round(map_s, 1), "generation_seconds": round(fit_s + map_s, 1),
              "cpu_threads": torch.get_num_threads(), "fit_stats": getattr(prot, "fit_stats", None)}  # fmt: skip
    out.save_to_disk(str(folder / "dataset"))
    record["quality"] = dataset_quality(train, out, "image")
    record_path.write_text(json.dumps(record, indent=2))
    return datasets.load_from_disk(str(folder / "dataset")), record


def run(args) -> None:
    torch.set_num_threads(args.threads)
    scale = dict(SCALES[args.scale])
    for key in ("dataset", "methods", "victim", "epochs", "adv_steps", "device"):
        if getattr(args, key) is not None:
            scale[key] = getattr(args, key)
    path = Path(scale["dataset"])
    if not path.is_dir():
        path = SHARED_DATASETS / scale["dataset"]
    name = path.name
    train = datasets.load_dataset(str(path), split="train")
    test = datasets.load_dataset(str(path), split="test")
    if args.limit:
        train = train.select(range(min(args.limit, len(train))))
    methods = scale["methods"].split(",")
    generation, protected = {}, {}
    for m in methods:
        ds, generation[m] = protected_split(train, name, m, scale["preset"], args.seed, scale["device"])
        protected[m] = load_split(ds, "image", 32, "label").images
    if args.generate_only:
        print(json.dumps(generation, indent=2))
        return
    clean = load_split(train, "image", 32, "label")
    tst = load_split(test, "image", 32, "label")
    cms = parse_countermeasures(args.countermeasures)
    for cm in cms:  # CPU scale: fewer PGD steps (stated in the results)
        if cm.name == "adv" and "steps=" not in args.countermeasures:
            cm.steps = int(scale["adv_steps"])
    out_path = RESULTS / f"matrix_{name}_{args.part}.json"
    report = {
        "dataset": name,
        "scale": args.scale,
        "train_images": len(train),
        "test_images": len(test),
        "preset": scale["preset"],
        "victim": {"arch": scale["victim"], "epochs": scale["epochs"], "batch_size": scale["batch_size"], "seed": args.seed},
        "machine": machine_info(device=str(scale["device"])),
        "generation": generation,
        "results": {},
    }
    victim = dict(arch=scale["victim"], epochs=scale["epochs"], batch_size=scale["batch_size"], seed=args.seed,
                  device=scale["device"], num_classes=10, progress=not args.quiet)  # fmt: skip
    clean_cache: dict[str, dict] = {}
    if args.reuse_clean:  # the merged table shows the first part's clean row anyway
        parts = [p for p in sorted(RESULTS.glob(f"matrix_{name}_*.json")) if p != out_path]
        same_recipe = [p for p in parts if json.loads(p.read_text())["victim"] == report["victim"]]
        if same_recipe:
            clean_cache = {label: row["clean"] for label, row in merged(same_recipe)[2].items()}
    for cm in cms:
        base = Countermeasure() if isinstance(cm, PartialProtection) else cm
        if base.label not in clean_cache:
            clean_cache[base.label] = train_victim(clean.images, clean.labels, tst.images, tst.labels, countermeasure=base,
                                                   desc=f"{base.label} | clean", **victim).to_dict()  # fmt: skip
        row = {"clean": clean_cache[base.label], "methods": {}}
        for m in methods:
            res = train_victim(protected[m], clean.labels, tst.images, tst.labels, countermeasure=cm, clean_x=clean.images,
                               desc=f"{cm.label} | {m}", **victim)  # fmt: skip
            row["methods"][m] = res.to_dict()
            print(f"[{cm.label}] {m}: final {res.final_accuracy:.4f} (clean {row['clean']['final_accuracy']:.4f})", flush=True)
        report["results"][cm.label] = row
        RESULTS.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=2))


def merged(dataset_files) -> tuple[dict, dict, dict]:
    """(first report, generation per method, rows per countermeasure) of one dataset's result parts."""
    reps = [json.loads(p.read_text()) for p in dataset_files]
    # parts may hold other methods for the same countermeasures: merge them row by row
    generation = {m: g for rep in reps for m, g in rep["generation"].items()}
    rows: dict[str, dict] = {}
    for rep in reps:
        for label, row in rep["results"].items():
            merged_row = rows.setdefault(label, {"clean": row["clean"], "methods": {}})
            merged_row["methods"].update(row["methods"])
    return reps[0], generation, rows


def table() -> str:
    """The Markdown table of every dataset's results; also redraws results/matrix_<dataset>.png."""
    blocks = []
    for dataset_files in _group(sorted(RESULTS.glob("matrix_*.json"))):
        first, generation, rows = merged(dataset_files)
        methods = sorted(generation, key=lambda m: COLUMN_ORDER.index(m) if m in COLUMN_ORDER else len(COLUMN_ORDER))
        v = first["victim"]
        gen = ", ".join(f"{m} {generation[m]['generation_seconds']:.0f} s" for m in methods)
        lines = [
            f"**{first['dataset']}** ({first['train_images']} train / {first['test_images']} test, {first['scale']} scale, "
            f"preset {first['preset']}), victim {v['arch']} {v['epochs']} epochs, seed {v['seed']}; generation: {gen}. "
            "Final-epoch clean-test accuracy (best epoch in brackets); **bold** = at most half the clean baseline.",
            "",
            "| countermeasure | clean | " + " | ".join(methods) + " | best method / clean |",
            "|---|---:|" + "---:|" * len(methods) + "---:|",
        ]
        ratio = ratios(methods, rows)
        for i, (label, row) in enumerate(rows.items()):
            cells, best = [], 1.0
            for j, m in enumerate(methods):
                r = row["methods"].get(m)
                if r is None:
                    cells.append("-")
                    continue
                text = f"{100 * r['final_accuracy']:.1f} ({100 * r['best_accuracy']:.1f})"
                cells.append(f"**{text}**" if ratio[i, j] <= 0.5 else text)
                best = min(best, ratio[i, j])
            clean = row["clean"]
            lines.append(f"| {label} | {100 * clean['final_accuracy']:.1f} ({100 * clean['best_accuracy']:.1f}) | "
                         + " | ".join(cells) + f" | {best:.2f} |")  # fmt: skip
        blocks.append("\n".join(lines))
        heatmap(first["dataset"], methods, list(rows), ratio, RESULTS / f"matrix_{first['dataset']}.png")
    return "\n\n".join(blocks)


def ratios(methods: list[str], rows: dict) -> np.ndarray:
    """Victim final accuracy / clean final accuracy, countermeasures x methods (NaN where not run)."""
    ratio = np.full((len(rows), len(methods)), np.nan)
    for i, row in enumerate(rows.values()):
        for j, m in enumerate(methods):
            if m in row["methods"]:
                ratio[i, j] = row["methods"][m]["final_accuracy"] / row["clean"]["final_accuracy"]
    return ratio


def heatmap(dataset: str, methods: list[str], labels: list[str], ratio: np.ndarray, path: Path) -> None:
    """The ``ratios`` as a picture: at most 0.5 (green) is the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(0.9 * len(methods) + 3.2, 0.45 * len(labels) + 1.2))
    im = ax.imshow(ratio, cmap="RdYlGn_r", vmin=0, vmax=1, aspect="auto")
    for i in range(len(labels)):
        for j in range(len(methods)):
            if not np.isnan(ratio[i, j]):
                ax.text(j, i, f"{ratio[i, j]:.2f}", ha="center", va="center", fontsize=9,
                        fontweight="bold" if ratio[i, j] <= 0.5 else "normal")  # fmt: skip
    ax.set_xticks(range(len(methods)), methods)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_title(f"{dataset}: victim acc. / clean acc.\n(target <= 0.5, blank = not run)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _group(paths):
    groups: dict[str, list] = {}
    for p in paths:
        groups.setdefault(p.stem.rsplit("_", 1)[0], []).append(p)
    return groups.values()


def main(argv=None) -> None:
    p = benchmark_parser(__doc__)
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--dataset")
    p.add_argument("--methods")
    p.add_argument("--victim")
    p.add_argument("--epochs", type=int)
    p.add_argument("--adv-steps", type=int)
    p.add_argument("--device")
    p.add_argument("--countermeasures", default=ALL)
    p.add_argument("--part", default="all", help="name of this slice of the matrix (its results file)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--generate-only", action="store_true", help="only generate (cache) the protected sets")
    p.add_argument("--reuse-clean", action="store_true",
                   help="take the clean baselines from the other parts of the same dataset and victim recipe")  # fmt: skip
    dispatch(p, run, table, argv)


if __name__ == "__main__":
    main()
