"""Effectiveness: does a fresh victim trained on the protected train split fail on the clean test split?

For each method: fit + map the whole train split (timed), then train a victim from scratch on the
protected images and report its clean-test accuracy (final and best epoch) next to the clean
baseline trained in the same run with the same recipe.

    python benchmarks/effectiveness.py --dataset ../shared/datasets/cifar10-10k --methods em,sem,cuda
    python benchmarks/effectiveness.py --dataset ../shared/datasets/retinamnist --methods em,sem,cuda --epochs 20
    python benchmarks/effectiveness.py --dataset ../shared/datasets/retinamnist --methods cuda --keep-others
    python benchmarks/effectiveness.py --methods t2ue --keep-others         # captions from the class names
    python benchmarks/effectiveness.py --methods t2ue-transfer --protector DIR --keep-others   # fitted elsewhere
    python benchmarks/effectiveness.py --methods fixed-classwise-pixels,fixed-classwise-blocks8 --reuse-clean

``fixed-classwise-*`` are references, not methods: one fixed random pattern of +-8/255 per class, added
to every image of the class (what the simplest class-wise shortcut does with this victim): ``pixels``
an independent sign per pixel and channel, ``blocksK`` signs on a K x K grid repeated over blocks of
pixels, ``smoothK`` a K x K Gaussian grid bilinearly up-sampled and pushed through a steep tanh (smooth
blobs of nearly full amplitude, as T2UE's generator makes them).

With ``--keep-others`` only the named methods are re-measured; the clean baseline is still trained
again and must come out identical (the training is deterministic), else the run stops.

Results go to benchmarks/results/effectiveness_<dataset>.json; ``--table`` prints the Markdown table
of every results file (pasted into benchmarks/README.md).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F

from common import RESULTS, SHARED_DATASETS, benchmark_parser, dispatch, fit_and_map, keep_other_methods, machine_info, make_protector
import uexamples as ue
from uexamples.evaluation import dataset_to_tensors, train_victim


def fixed_classwise(kind: str, x: torch.Tensor, y: torch.Tensor, seed: int, epsilon: float = 8 / 255) -> torch.Tensor:
    """``x`` (N, C, H, W in [0, 1]) plus one fixed random pattern per class (``fixed-classwise-<kind>``, see the
    module docstring), rounded to the stored 8-bit levels."""
    g = torch.Generator().manual_seed(seed)
    classes, (c, h, w) = int(y.max()) + 1, x.shape[1:]
    if kind == "pixels":
        pattern = torch.randint(0, 2, (classes, c, h, w), generator=g).float() * 2 - 1
    elif kind.startswith("blocks"):
        k = int(kind.removeprefix("blocks"))
        pattern = F.interpolate(torch.randint(0, 2, (classes, c, k, k), generator=g).float() * 2 - 1, size=(h, w), mode="nearest")
    elif kind.startswith("smooth"):
        k = int(kind.removeprefix("smooth"))
        grid = F.interpolate(torch.randn(classes, c, k, k, generator=g), size=(h, w), mode="bilinear", align_corners=False)
        pattern = torch.tanh(4 * grid / grid.std())
    else:
        raise SystemExit(f"unknown fixed class-wise pattern {kind!r}: pixels, blocksK or smoothK")
    return ((x + epsilon * pattern[y]).clamp(0, 1) * 255).round() / 255


def protect(method: str, train: datasets.Dataset, args) -> tuple[torch.Tensor, torch.Tensor, float, float, dict]:
    """The protected train split of ``method`` as tensors, fit and map seconds, and what its results row
    records about how it was made."""
    if args.protector:  # a protector fitted elsewhere (T2UE transfer): map only, `method` names the row
        protector = ue.Protector.from_pretrained(args.protector)
    else:
        protector = make_protector(method, args.preset, args.seed)
    source = train
    if protector.needs_texts and protector.config.text_column is None and not any(
            c in train.column_names for c in ("caption", "captions", "text", "sentences")):  # fmt: skip
        # T2UE on a labelled set: captions from the class names, as the paper's supervised experiments
        source = ue.captions_from_labels(train, sample_wise=args.class_captions == "sample-wise", seed=args.seed)
    if args.protector:
        t0 = time.time()
        protected = source.map(protector, batched=True, batch_size=512, load_from_cache_file=False)
        fit_s, map_s = 0.0, time.time() - t0
    else:
        protected, fit_s, map_s = fit_and_map(protector, source, progress=not args.quiet)
    px, py = dataset_to_tensors(protected)
    row = {"fit_stats": getattr(protector, "fit_stats", None),
           "captions": None if source is train else f"{args.class_captions} from the class names",
           "protector": args.protector}  # fmt: skip
    return px, py, fit_s, map_s, row


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    name = Path(args.dataset).name
    train = datasets.load_dataset(args.dataset, split="train")
    test = datasets.load_dataset(args.dataset, split="test")
    if args.limit:
        train = train.select(range(min(args.limit, len(train))))
    test_x, test_y = dataset_to_tensors(test)
    victim = dict(arch=args.victim, epochs=args.epochs, lr=args.lr, seed=args.seed, progress=not args.quiet)

    clean_x, clean_y = dataset_to_tensors(train)
    committed = RESULTS / f"effectiveness_{name}.json"
    if args.reuse_clean and committed.exists():  # the committed clean victim of this recipe (deterministic training)
        old = json.loads(committed.read_text())
        if old["victim"] != {k: v for k, v in victim.items() if k != "progress"} or old["train_images"] != len(train):
            raise SystemExit(f"--reuse-clean: {committed} was measured with another recipe")
        from uexamples.evaluation.victim import VictimResult

        clean = VictimResult(**old["clean"])
        clean_from = {"file": committed.name, "machine": old["machine"]}  # it may have been another CPU
    else:
        clean = train_victim(clean_x, clean_y, test_x, test_y, desc="clean victim", **victim)
        clean_from = None
    print(f"[{name}] clean: final {clean.final_accuracy:.4f} best {clean.best_accuracy:.4f}", flush=True)
    report = {
        "dataset": name,
        "train_images": len(train),
        "test_images": len(test),
        "preset": args.preset,
        "victim": {k: v for k, v in victim.items() if k != "progress"},
        "machine": machine_info(),
        "clean": clean.to_dict(),
        "methods": {},
    }
    if clean_from is not None:
        report["clean_reused_from"] = clean_from
    out = RESULTS / f"effectiveness_{name}{args.suffix}.json"
    if args.keep_others and out.exists():  # re-measure some methods; the clean curve must come out identical
        report["methods"] = keep_other_methods(out, report, args.methods.split(","), lambda r: (
            r["clean"]["curve"], r["victim"], r["preset"], r["train_images"], r["test_images"]))  # fmt: skip
    for method in args.methods.split(","):
        if method.startswith("fixed-classwise-"):  # a reference pattern, no protector
            px, py = fixed_classwise(method.removeprefix("fixed-classwise-"), clean_x, clean_y, args.seed), clean_y
            fit_s = map_s = 0.0
            row = {"reference": "one fixed random pattern per class (not a method)"}
        else:
            px, py, fit_s, map_s, row = protect(method, train, args)
        linf = int(((px - clean_x).abs().max() * 255).round())
        res = train_victim(px, py, test_x, test_y, desc=f"{method} victim", **victim)
        report["methods"][method] = {
            "fit_seconds": round(fit_s, 1),
            "map_seconds": round(map_s, 1),
            "generation_seconds": round(fit_s + map_s, 1),
            "linf_levels": linf,
            **row,
            "victim": res.to_dict(),
        }
        print(
            f"[{name}] {method}: generation {fit_s + map_s:.0f} s, victim final {res.final_accuracy:.4f} "
            f"best {res.best_accuracy:.4f} (clean {clean.final_accuracy:.4f})",
            flush=True,
        )
        RESULTS.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
    return report


def table() -> str:
    lines = [
        "| dataset | method | generation (s) | L-inf | victim final | victim best (epoch) | clean final | clean best |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for path in sorted(RESULTS.glob("effectiveness_*.json")):
        rep = json.loads(path.read_text())
        c = rep["clean"]
        for method, m in rep["methods"].items():
            v = m["victim"]
            lines.append(
                f"| {rep['dataset']} ({rep['train_images']} train) | {method} | {m['generation_seconds']:.0f} | "
                f"{m['linf_levels']} | {100 * v['final_accuracy']:.1f} % | {100 * v['best_accuracy']:.1f} % ({v['best_epoch']}) | "
                f"{100 * c['final_accuracy']:.1f} % | {100 * c['best_accuracy']:.1f} % |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = benchmark_parser(__doc__)
    p.add_argument("--dataset", default=str(SHARED_DATASETS / "cifar10-10k"))
    p.add_argument("--methods", default="em,sem,cuda")
    p.add_argument("--preset", default="fast")
    p.add_argument("--victim", default="convnet")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="use only the first N training images")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--class-captions", choices=["class-wise", "sample-wise"], default="class-wise",
                   help="captions a caption-driven method (T2UE) gets on a labelled set without captions")  # fmt: skip
    p.add_argument("--protector", help="map with this fitted protector (no fit) instead of fitting one")
    p.add_argument("--reuse-clean", action="store_true", help="take the clean victim from the committed results file")
    p.add_argument("--suffix", default="", help="results file effectiveness_<dataset><suffix>.json (runs side by side)")
    p.add_argument("--keep-others", action="store_true",
                   help="keep the other methods' rows of the results file (its clean baseline must come out identical)")  # fmt: skip
    dispatch(p, run, table, argv)


if __name__ == "__main__":
    main()
