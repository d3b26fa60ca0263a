"""Fit diagnosis: does a min-min fit turn the noise into a shortcut the surrogate learns?

Error-minimizing noise protects when the surrogate, trained on the noisy images, reaches (near) perfect
accuracy on them through the noise: EM's paper stops its fit at 99 %. This script fits each method on a
dataset's train split (no map, no victims: seconds to minutes) and records the surrogate's running
accuracy on the noisy fit batches every 10 steps, the steps taken and the fit time. It is how the
medical section found why SALM was weak on RetinaMNIST (benchmarks/README.md, "Medical images: SALM").
With ``--map`` it also maps the train split (the generation time of the medical tables, measured here
one method after the other on a quiet machine rather than between victim trainings). With ``--probe`` (implies
``--map``; classifier surrogates) it then scores the fitted surrogate, in eval mode, on the train images: clean,
clean plus random sign noise of the budget (does it read the content once *any* noise is there?), protected, and
the protected noise moved to another image of the same class or of the next class (is the noise a class pattern
or tied to the image under it?); and where the noise sits (its mean size on pixels at 0 and elsewhere). It is
how the generalisation section measured why SEM's blind surrogate is weaker on dark grey images.

    python benchmarks/fit_diagnosis.py --dataset ../shared/datasets/retinamnist \
        --methods salm,salm+persistent_noise=false,em
    python benchmarks/fit_diagnosis.py --dataset ../shared/datasets/breastmnist --methods salm,sem --map --suffix _generation
    python benchmarks/fit_diagnosis.py --variant cifar10-10k@L@28@dark --methods sem,sem+train_steps=800 --probe

``--variant`` takes a variant of the generalisation benchmark (``generalisation.derive``) instead of ``--dataset``.

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
from generalisation import derive, moved_noise
from uexamples.evaluation import dataset_to_tensors


def probe(protector, train, protected) -> dict:
    """The fitted surrogate's accuracy (and mean top probability) on the train images, clean and perturbed in the
    ways the module docstring lists, and the noise's mean size on black pixels and elsewhere."""
    res = protector.working_resolution() or train[0][protector._columns.image].size[0]
    x, y = dataset_to_tensors(train, resolution=res)
    px, _ = dataset_to_tensors(protected, resolution=res)
    grey = bool((x[:, 0] == x[:, 1]).all() and (x[:, 1] == x[:, 2]).all())
    eps = float(protector.config.epsilon)
    sign = (torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) > 0.5).float() * 2 - 1
    sign = sign[:, :1].expand_as(x) if grey else sign
    model = protector._model().eval()

    def score(images: torch.Tensor) -> dict:
        with torch.no_grad():
            p = torch.cat([model(images[i:i + 500]).softmax(1) for i in range(0, len(images), 500)])
        return {"accuracy": round(float((p.argmax(1) == y).float().mean()), 4), "top_probability": round(float(p.max(1).values.mean()), 3)}

    noise, black = px - x, x == 0
    return {
        "clean": score(x), "clean+random_sign_noise": score((x + eps * sign).clamp(0, 1)), "protected": score(px),
        "noise_moved_within_class": score(moved_noise(px, x, y, 0)), "noise_from_next_class": score(moved_noise(px, x, y, 1)),
        "black_pixel_share": round(float(black.float().mean()), 4),
        "mean_abs_noise_on_black": round(float(noise.abs()[black].mean()), 5) if bool(black.any()) else None,
        "mean_abs_noise_elsewhere": round(float(noise.abs()[~black].mean()), 5),
    }  # fmt: skip


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    name = args.variant or Path(args.dataset).name
    train = derive(args.variant, "train") if args.variant else datasets.load_dataset(args.dataset, split="train")
    out = RESULTS / f"fit_diagnosis_{name}{args.suffix}.json"
    report = json.loads(out.read_text()) if out.exists() else {"dataset": name, "train_images": len(train), "fits": {}}
    for method in args.methods.split(","):
        protector = make_protector(method, args.preset, args.seed)
        probed = None
        if args.map or args.probe:  # as the medical tables time it
            protected, fit_s, map_s = fit_and_map(protector, train, progress=not args.quiet, batch_size=256)
            probed = probe(protector, train, protected) if args.probe else None
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
            **({"probe": probed} if probed else {}),
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
        probed = {method: f["probe"] for method, f in rep["fits"].items() if "probe" in f}
        if probed:
            lines += [
                "The fitted surrogate on the train images (accuracy / mean top probability; `--probe`):",
                "",
                "| method | clean | clean + random sign noise | protected | noise moved within its class | noise of the next class | mean abs noise on black pixels / elsewhere (x 255) |",
                "|---|---:|---:|---:|---:|---:|---:|",
            ]
            for method, pr in probed.items():
                cells = [f"{pr[k]['accuracy']:.3f} / {pr[k]['top_probability']:.2f}" for k in
                         ("clean", "clean+random_sign_noise", "protected", "noise_moved_within_class", "noise_from_next_class")]
                black = "-" if pr["mean_abs_noise_on_black"] is None else f"{pr['mean_abs_noise_on_black'] * 255:.1f}"
                lines.append(f"| {method} | {' | '.join(cells)} | {black} / {pr['mean_abs_noise_elsewhere'] * 255:.1f} |")
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = benchmark_parser(__doc__)
    p.add_argument("--dataset", default="../shared/datasets/retinamnist")
    p.add_argument("--variant", default="", help="a generalisation variant (cifar10-10k@L@28@dark) instead of --dataset")
    p.add_argument("--methods", default="salm")
    p.add_argument("--preset", default="fast")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--map", action="store_true", help="also map the train split (timed)")
    p.add_argument("--probe", action="store_true", help="map, then score the fitted surrogate on clean, perturbed and protected train images")
    p.add_argument("--suffix", default="", help="results file fit_diagnosis_<dataset><suffix>.json")
    p.add_argument("--quiet", action="store_true")
    dispatch(p, run, table, argv)


if __name__ == "__main__":
    main()
