"""CUDA's strength against its visibility: victim accuracy and image quality per filter setting.

CUDA has two knobs (Sadasivan et al., CVPR 2023): the filter size k and the blur parameter p_b (each
tap ~ U(0, p_b), one tap set to 1). The paper's CIFAR-10 setting is k=3, p_b=0.3. This sweep trains
one victim per setting on the CUDA-protected cifar10-10k train split (the matrix's CPU victim:
smallcnn, 10 epochs) next to the clean baseline of the same run, and reports PSNR/SSIM of the
protected images, so that a preset can be chosen by measurement rather than by guess.

    python benchmarks/cuda_strength.py --settings 3:0.3,3:0.6,3:1.0,5:0.3,5:0.6

Results: benchmarks/results/cuda_strength.json; ``--table`` prints the table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import datasets
import torch

from common import RESULTS, SHARED_DATASETS, benchmark_parser, dispatch, machine_info, make_protector
from uexamples.core.loading import load_split
from uexamples.evaluation import train_victim
from uexamples.evaluation.metrics import dataset_quality

OUT = RESULTS / "cuda_strength.json"


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
        k, p_b = setting.split(":")
        protector = make_protector("cuda", "fast", args.seed, kernel_size=int(k), max_weight=float(p_b))
        t0 = time.time()
        protected = train.map(protector.fit(train, progress=False), batched=True, load_from_cache_file=False)
        seconds = time.time() - t0
        quality = dataset_quality(train, protected, "image", limit=1000)
        px = load_split(protected, "image", 32, "label").images
        res = train_victim(px, clean.labels, tst.images, tst.labels, desc=f"cuda {setting}", **victim)
        report["settings"][setting] = {"kernel_size": int(k), "max_weight": float(p_b), "generation_seconds": round(seconds, 1),
                                       "quality": quality, "victim": res.to_dict()}  # fmt: skip
        print(f"[{setting}] final {res.final_accuracy:.4f} psnr {quality['mean_psnr']:.1f}", flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(report, indent=2))


def table() -> str:
    rep = json.loads(OUT.read_text())
    c, v = rep["clean"], rep["victim"]
    lines = [
        f"{rep['dataset']} ({rep['train_images']} train), victim {v['arch']} {v['epochs']} epochs, seed {v['seed']}; "
        f"clean baseline {100 * c['final_accuracy']:.1f} % final. PSNR/SSIM: mean over the first 1,000 protected images.",
        "",
        "| k | p_b | victim final | victim best | final / clean | PSNR (dB) | SSIM |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in rep["settings"].values():
        r, q = s["victim"], s["quality"]
        lines.append(f"| {s['kernel_size']} | {s['max_weight']} | {100 * r['final_accuracy']:.1f} % | {100 * r['best_accuracy']:.1f} % | "
                     f"{r['final_accuracy'] / c['final_accuracy']:.2f} | {q['mean_psnr']:.1f} | {q['mean_ssim']:.3f} |")  # fmt: skip
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
    dispatch(p, run, table, argv)


if __name__ == "__main__":
    main()
