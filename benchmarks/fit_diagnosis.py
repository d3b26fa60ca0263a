"""Fit diagnosis: does a min-min fit turn the noise into a shortcut the surrogate learns?

Error-minimizing noise protects when the surrogate, trained on the noisy images, reaches (near) perfect
accuracy on them through the noise: EM's paper stops its fit at 99 %. This script fits each method on a
dataset's train split (no map, no victims: seconds to minutes) and records the surrogate's running
accuracy on the noisy fit batches every 10 steps, the steps taken and the fit time. It is how the
medical section found why SALM was weak on RetinaMNIST (benchmarks/README.md, "Medical images: SALM").
With ``--map`` it also maps the train split (the generation time of the medical tables, measured here
one method after the other on a quiet machine rather than between victim trainings).

    python benchmarks/fit_diagnosis.py --dataset ../shared/datasets/retinamnist \
        --methods salm,salm+persistent_noise=false,em
    python benchmarks/fit_diagnosis.py --dataset ../shared/datasets/breastmnist --methods salm,sem --map --suffix _generation

Method names as ``common.make_protector`` reads them. Results: benchmarks/results/fit_diagnosis_<dataset><suffix>.json
(rows merged by method name); ``--table`` prints the Markdown table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import datasets
import torch

from common import RESULTS, benchmark_parser, dispatch, fit_and_map, machine_info, make_protector


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    name = Path(args.dataset).name
    train = datasets.load_dataset(args.dataset, split="train")
    out = RESULTS / f"fit_diagnosis_{name}{args.suffix}.json"
    report = json.loads(out.read_text()) if out.exists() else {"dataset": name, "train_images": len(train), "fits": {}}
    for method in args.methods.split(","):
        protector = make_protector(method, args.preset, args.seed)
        if args.map:  # as the medical tables time it
            _, fit_s, map_s = fit_and_map(protector, train, progress=not args.quiet, batch_size=256)
            map_s = round(map_s, 1)
        else:
            started = time.time()
            protector.fit(train, progress=not args.quiet)
            fit_s, map_s = time.time() - started, None
        stats = dict(protector.fit_stats)
        report["fits"][method] = {
            "seed": args.seed, "preset": args.preset, "wall_seconds": round(fit_s, 1), "map_seconds": map_s,
            "steps": stats["steps"], "planned_steps": stats["planned_steps"], "train_accuracy": stats["train_accuracy"],
            "train_accuracy_every_10_steps": stats["train_accuracy_every_10_steps"], "machine": machine_info(),
        }  # fmt: skip
        print(f"[{name}] {method}: {stats['steps']} steps, surrogate accuracy on the noisy data "
              f"{stats['train_accuracy']:.3f}, fit {fit_s:.0f} s, map {map_s} s", flush=True)  # fmt: skip
        RESULTS.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=float))
    return report


def table() -> str:
    lines = []
    for path in sorted(RESULTS.glob("fit_diagnosis_*.json")):
        rep = json.loads(path.read_text())
        lines += [
            f"**{rep['dataset']}** ({rep['train_images']} train images; fit seed, preset and threads per row) - `{path.name}`",
            "",
            "| method | steps (planned) | surrogate accuracy on noisy data at the end | every 50 steps | fit (s) | map (s) | threads |",
            "|---|---:|---:|---|---:|---:|---:|",
        ]
        for method, f in rep["fits"].items():
            curve = " ".join(f"{a:.2f}" for a in f["train_accuracy_every_10_steps"][::5])
            lines.append(f"| {method} | {f['steps']} ({f['planned_steps']}) | {f['train_accuracy']:.3f} | {curve} | "
                         f"{f['wall_seconds']:.0f} | {'-' if f.get('map_seconds') is None else f['map_seconds']} | "
                         f"{f['machine']['cpu_threads']} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = benchmark_parser(__doc__)
    p.add_argument("--dataset", default="../shared/datasets/retinamnist")
    p.add_argument("--methods", default="salm")
    p.add_argument("--preset", default="fast")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--map", action="store_true", help="also map the train split (timed)")
    p.add_argument("--suffix", default="", help="results file fit_diagnosis_<dataset><suffix>.json")
    p.add_argument("--quiet", action="store_true")
    dispatch(p, run, table, argv)


if __name__ == "__main__":
    main()
