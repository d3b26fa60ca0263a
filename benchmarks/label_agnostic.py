"""Label-agnostic protection: victims trained on the true labels and on relabellings no protector saw.

For each method: fit (label-free methods on the train split with its label column *removed*), map,
then victims from scratch on (a) the dataset's own labels and (b) every ``--relabel`` labelling,
each against a clean victim of the same recipe trained in the same run. Also: image quality (PSNR,
SSIM at the stored pixels) and, for UC, the purity of its clusters against each labelling (the
fraction of images whose cluster's majority label is their own: what cluster-wise noise can exploit).

    python benchmarks/label_agnostic.py --dataset ../shared/datasets/cifar10-10k --methods uc,uc-resnet20,sem,em \\
        --relabel cifar10-vehicles-animals
    python benchmarks/label_agnostic.py --dataset ../shared/datasets/retinamnist --methods uc-resnet20,uc \\
        --relabel retinamnist-any-disease

Method names: as ``common.make_protector`` reads them: a registered method with its ``--preset``,
``uc-resnet20`` (UC with the pretrained CIFAR ResNet-20 of ../shared/models as encoder),
``em-classwise``, ``name@N`` (N/255), ``name+field=value`` (``uc+optimiser=generator``).
Results: benchmarks/results/label_agnostic_<dataset>.json; ``--table`` prints the Markdown table.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import torch

from common import (RESULTS, SHARED_DATASETS, benchmark_parser, dispatch, fit_and_map, keep_other_methods, machine_info,
                    make_protector)
from uexamples.evaluation import RELABELINGS, dataset_quality, dataset_to_tensors, train_victim

def purity(clusters: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of images whose cluster's most common label is their own label."""
    return float(sum(np.bincount(labels[clusters == k]).max() for k in np.unique(clusters)) / len(labels))


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    name = Path(args.dataset).name
    train = datasets.load_dataset(args.dataset, split="train")
    test = datasets.load_dataset(args.dataset, split="test")
    test_x, test_y = dataset_to_tensors(test)
    clean_x, clean_y = dataset_to_tensors(train)
    relabels = [r for r in args.relabel.split(",") if r]
    labellings = {"own": (clean_y, test_y)}
    for r in relabels:
        fn = RELABELINGS[r]
        labellings[r] = (torch.tensor([fn(int(v)) for v in clean_y]), torch.tensor([fn(int(v)) for v in test_y]))
    victim = dict(arch=args.victim, epochs=args.epochs, lr=args.lr, seed=args.seed, progress=not args.quiet)
    report = {
        "dataset": name, "train_images": len(train), "test_images": len(test), "preset": args.preset,
        "victim": {k: v for k, v in victim.items() if k != "progress"}, "machine": machine_info(),
        "labellings": {k: int(max(y.max(), ty.max())) + 1 for k, (y, ty) in labellings.items()},
        "clean": {}, "methods": {},
    }  # fmt: skip
    out = RESULTS / f"label_agnostic_{name}{args.suffix}.json"
    recipe = lambda r: (r["victim"], r["preset"], r["train_images"], r["test_images"], r["labellings"])  # noqa: E731
    old = json.loads(out.read_text()) if out.exists() else None
    same = [json.loads(f.read_text()) for f in sorted(RESULTS.glob(f"label_agnostic_{name}*.json"))]
    same = [r for r in same if recipe(r) == recipe(report) and r["machine"] == report["machine"]]
    if args.reuse_clean and same:
        report["clean"] = same[0]["clean"]  # the clean victims are deterministic: measured once for this recipe
    else:
        for lab, (y, ty) in labellings.items():
            res = train_victim(clean_x, y, test_x, ty, desc=f"clean victim | {lab}", **victim)
            report["clean"][lab] = res.to_dict()
    for lab, res in report["clean"].items():
        print(f"[{name}] clean | {lab}: final {res['final_accuracy']:.4f}", flush=True)
    if args.keep_others and old is not None:
        report["methods"] = keep_other_methods(out, report, args.methods.split(","), lambda r: (
            {k: v["curve"] for k, v in r["clean"].items()}, recipe(r)))  # fmt: skip
    for method in args.methods.split(","):
        protector = make_protector(method, args.preset, args.seed)
        protected, fit_s, map_s = fit_and_map(protector, train, progress=not args.quiet)
        quality = dataset_quality(train, protected, "image", limit=None)
        px, _ = dataset_to_tensors(protected)
        row = {
            "fit_seconds": round(fit_s, 1), "map_seconds": round(map_s, 1), "quality": quality,
            "fit_stats": getattr(protector, "fit_stats", None), "victims": {},
        }  # fmt: skip
        if hasattr(protector, "clusters_of"):
            clusters = protector.clusters_of(train)
            row["cluster_purity"] = {lab: round(purity(clusters, y.numpy()), 4) for lab, (y, _) in labellings.items()}
        for lab, (y, ty) in labellings.items():
            res = train_victim(px, y, test_x, ty, desc=f"{method} victim | {lab}", **victim)
            row["victims"][lab] = res.to_dict()
            clean = report["clean"][lab]["final_accuracy"]
            print(f"[{name}] {method} | {lab}: final {res.final_accuracy:.4f} (clean {clean:.4f}, "
                  f"ratio {res.final_accuracy / clean:.2f})", flush=True)  # fmt: skip
        report["methods"][method] = row
        RESULTS.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
    return report


def table() -> str:
    lines = []
    for path in sorted(RESULTS.glob("label_agnostic_*.json")):
        rep = json.loads(path.read_text())
        labs = list(rep["clean"])
        head = " | ".join(f"{lab} ({rep['labellings'][lab]} cl.): victim / clean" for lab in labs)
        lines += [
            f"**{rep['dataset']}**{path.stem.removeprefix('label_agnostic_' + rep['dataset'])} ({rep['train_images']} train, victim {rep['victim']['arch']} "
            f"{rep['victim']['epochs']} epochs; clean: "
            + ", ".join(f"{lab} {100 * rep['clean'][lab]['final_accuracy']:.1f} %" for lab in labs) + ")",
            "",
            f"| method | {head} | cluster purity | PSNR (dB) | SSIM | fit + map (s) |",
            "|---|" + "---:|" * (len(labs) + 4),
        ]
        for method, m in rep["methods"].items():
            cells = []
            for lab in labs:
                acc, clean = m["victims"][lab]["final_accuracy"], rep["clean"][lab]["final_accuracy"]
                cells.append(f"{100 * acc:.1f} % ({acc / clean:.2f})")
            pur = m.get("cluster_purity")
            pur_s = " / ".join(f"{pur[lab]:.2f}" for lab in labs) if pur else "-"
            q = m["quality"]
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {pur_s} | {q['mean_psnr']:.2f} | {q['mean_ssim']:.4f} | "
                         f"{m['fit_seconds'] + m['map_seconds']:.0f} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = benchmark_parser(__doc__)
    p.add_argument("--dataset", default=str(SHARED_DATASETS / "cifar10-10k"))
    p.add_argument("--methods", default="uc,uc-resnet20,sem,em")
    p.add_argument("--relabel", default="cifar10-vehicles-animals", help="comma-separated built-in relabellings")
    p.add_argument("--preset", default="fast")
    p.add_argument("--victim", default="convnet")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--keep-others", action="store_true", help="keep the other methods' rows (same clean curves required)")
    p.add_argument("--suffix", default="", help="results file label_agnostic_<dataset><suffix>.json (runs side by side)")
    p.add_argument("--reuse-clean", action="store_true",
                   help="take the clean victims from the results file when its recipe and machine are this run's")  # fmt: skip
    dispatch(p, run, table, argv)


if __name__ == "__main__":
    main()
