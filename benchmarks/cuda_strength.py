"""CUDA's strength against its visibility: victim accuracy and image quality per filter setting.

CUDA has two knobs (Sadasivan et al., CVPR 2023): the filter size k and the blur parameter p_b (each
tap ~ U(0, p_b), one tap set to 1). The paper's CIFAR-10 setting is k=3, p_b=0.3. This sweep trains
one victim per setting on the CUDA-protected cifar10-10k train split (the matrix's CPU victim:
smallcnn, 10 epochs) next to the clean baseline of the same run, and reports PSNR/SSIM of the
protected images, so that a preset can be chosen by measurement rather than by guess.

A setting is ``k:p_b`` or ``k:p_b:draws`` (``filter_draws``), with ``#n`` for the n-th other
benchmark key: CUDA's filters are drawn from the key, so the spread over keys says how much of a
result is the key's luck.

    python benchmarks/cuda_strength.py --settings 3:0.3,3:0.6,3:1.0,5:0.3,5:0.6
    python benchmarks/cuda_strength.py --resume --settings 3:0.3#1,3:0.3#2

Results: benchmarks/results/cuda_strength.json; ``--table`` prints the table; ``--picture`` draws
results/cuda_strength.png (the same images under the clean, paper, fast and k=5 settings);
``--scale-picture`` results/cuda_scale_64.png (images enlarged to 64 px: 3x3 taps against the scaled filter).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import datasets
import PIL.Image
import torch

from common import RESULTS, SHARED_DATASETS, benchmark_parser, dispatch, machine_info, make_protector
from uexamples.core.loading import load_split
from uexamples.evaluation import train_victim
from uexamples.evaluation.metrics import dataset_quality

OUT = RESULTS / "cuda_strength.json"
PICTURE_ROWS = {"clean": None, "paper (k=3, p_b=0.3)": dict(preset="paper"), "fast (k=3, p_b=1, 64 draws)": dict(preset="fast"),
                "k=5, p_b=0.3": dict(preset="paper", kernel_size=5), "k=7, p_b=0.3": dict(preset="paper", kernel_size=7)}  # fmt: skip
# the same images enlarged to 64 px (bicubic), as generalisation.py's @64 variants: the filter's scale
SCALE_PICTURE_ROWS = {"clean, enlarged to 64 px": None, "fast, 3x3 taps 1 px apart (filter_scale=1, before)": dict(preset="fast", filter_scale=1),
                      "fast, taps 2 px apart, tent between (filter_scale='auto', the preset)": dict(preset="fast"),
                      "taps 2 px apart, zeros between (filter_resampling='dilate')": dict(preset="fast", filter_resampling="dilate")}  # fmt: skip


def picture(dataset: str, n: int = 10, rows: dict | None = None, size: int | None = None, name: str = "cuda_strength.png") -> Path:
    """The first ``n`` training images under each row's filters, one row per setting, labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = PICTURE_ROWS if rows is None else rows
    train = datasets.load_dataset(dataset, split="train").select(range(n))
    if size is not None:
        train = train.map(lambda r: {"image": r["image"].convert("RGB").resize((size, size), PIL.Image.BICUBIC)})
    scale = 1 if size is None else size / 32
    fig, axes = plt.subplots(len(rows), 1, figsize=(n * 0.9 * scale, len(rows) * 1.05 * scale))
    for ax, (label, kwargs) in zip(axes, rows.items()):
        ds = train
        if kwargs is not None:
            overrides = {k: v for k, v in kwargs.items() if k != "preset"}
            protector = make_protector("cuda", kwargs["preset"], 0, **overrides)
            ds = train.map(protector.fit(train, progress=False), batched=True, load_from_cache_file=False)
        ax.imshow(np.concatenate([np.asarray(im.convert("RGB")) for im in ds["image"]], axis=1), interpolation="nearest")
        ax.set_title(label, fontsize=9, loc="left")
        ax.axis("off")
    fig.tight_layout()
    path = RESULTS / name
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def run(args) -> None:
    torch.set_num_threads(args.threads)
    path = Path(args.dataset)
    train = datasets.load_dataset(str(path), split="train")
    test = datasets.load_dataset(str(path), split="test")
    clean = load_split(train, "image", 32, "label")
    tst = load_split(test, "image", 32, "label")
    victim = dict(arch=args.victim, epochs=args.epochs, seed=args.seed, num_classes=10, progress=not args.quiet)
    report = json.loads(OUT.read_text()) if OUT.exists() and args.resume else None
    if report is None:
        base = train_victim(clean.images, clean.labels, tst.images, tst.labels, desc="clean", **victim)
        report = {
            "dataset": path.name,
            "train_images": len(train),
            "victim": {k: v for k, v in victim.items() if k != "progress"},
            "machine": machine_info(),
            "clean": base.to_dict(),
            "settings": {},
        }
    for setting in args.settings.split(","):
        if setting in report["settings"]:
            continue
        filters, _, key_index = setting.partition("#")
        k, p_b, draws = (filters + ":1").split(":")[:3]
        key_seed = args.seed + int(key_index or 0)  # the victim's seed stays args.seed
        protector = make_protector("cuda", "fast", key_seed, kernel_size=int(k), max_weight=float(p_b),
                                   filter_draws=int(draws))  # fmt: skip
        t0 = time.time()
        protected = train.map(protector.fit(train, progress=False), batched=True, load_from_cache_file=False)
        seconds = time.time() - t0
        quality = dataset_quality(train, protected, "image", limit=1000)
        px = load_split(protected, "image", 32, "label").images
        res = train_victim(px, clean.labels, tst.images, tst.labels, desc=f"cuda {setting}", **victim)
        entry = {"kernel_size": int(k), "max_weight": float(p_b), "filter_draws": int(draws), "key_index": int(key_index or 0),
                 "generation_seconds": round(seconds, 1), "quality": quality, "victim": res.to_dict()}  # fmt: skip
        print(f"[{setting}] final {res.final_accuracy:.4f} psnr {quality['mean_psnr']:.1f}", flush=True)
        save_setting(report, setting, entry)


def save_setting(report: dict, setting: str, entry: dict) -> None:
    """Add one setting to the results file, re-reading it first: two sweeps may share the file."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    if OUT.exists():
        on_disk = json.loads(OUT.read_text())
        if on_disk["clean"] == report["clean"]:
            report["settings"] = {**on_disk["settings"], **report["settings"]}
    report["settings"][setting] = entry
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(OUT)


def table() -> str:
    rep = json.loads(OUT.read_text())
    c, v = rep["clean"], rep["victim"]
    settings = sorted(rep["settings"].values(), key=lambda s: (s["kernel_size"], s["max_weight"], s.get("filter_draws", 1), s.get("key_index", 0)))  # fmt: skip
    lines = [
        f"{rep['dataset']} ({rep['train_images']} train), victim {v['arch']} {v['epochs']} epochs, seed {v['seed']}; "
        f"clean baseline {100 * c['final_accuracy']:.1f} % final. PSNR/SSIM: mean over the first 1,000 protected images. "
        "draws: candidates per class (1 = the paper's independent draws); key: benchmark key index.",
        "",
        "| k | p_b | draws | key | victim final | victim best | final / clean | PSNR (dB) | SSIM |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in settings:
        r, q = s["victim"], s["quality"]
        lines.append(f"| {s['kernel_size']} | {s['max_weight']} | {s.get('filter_draws', 1)} | {s.get('key_index', 0)} | "
                     f"{100 * r['final_accuracy']:.1f} % | {100 * r['best_accuracy']:.1f} % | "
                     f"{r['final_accuracy'] / c['final_accuracy']:.2f} | {q['mean_psnr']:.1f} | {q['mean_ssim']:.3f} |")  # fmt: skip
    groups: dict[tuple, list[dict]] = {}
    for s in settings:
        groups.setdefault((s["kernel_size"], s["max_weight"], s.get("filter_draws", 1)), []).append(s)
    lines += ["", "Settings measured with several keys (mean, min-max of the final accuracy):", "",
              "| k | p_b | draws | keys | victim final, mean | min - max | PSNR mean (dB) |", "|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for (k, p_b, draws), group in groups.items():
        if len(group) < 2:
            continue
        acc = [g["victim"]["final_accuracy"] for g in group]
        psnr = sum(g["quality"]["mean_psnr"] for g in group) / len(group)
        lines.append(f"| {k} | {p_b} | {draws} | {len(group)} | {100 * sum(acc) / len(acc):.1f} % | "
                     f"{100 * min(acc):.1f} - {100 * max(acc):.1f} % | {psnr:.1f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> None:
    p = benchmark_parser(__doc__)
    p.add_argument("--dataset", default=str(SHARED_DATASETS / "cifar10-10k"))
    p.add_argument("--settings", default="3:0.3,3:0.6,3:1.0,5:0.3,5:0.6")
    p.add_argument("--victim", default="smallcnn")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resume", action="store_true", help="keep the settings already in the results file")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--picture", action="store_true", help="only draw results/cuda_strength.png")
    p.add_argument("--scale-picture", action="store_true", help="only draw results/cuda_scale_64.png (images enlarged to "
                   "64 px under the 3x3 filter and under the scaled one)")  # fmt: skip
    args = p.parse_args(argv)
    if args.picture or args.scale_picture:
        print(picture(args.dataset) if args.picture else picture(args.dataset, 8, SCALE_PICTURE_ROWS, 64, "cuda_scale_64.png"))
        return
    dispatch(p, run, table, argv)


if __name__ == "__main__":
    main()
