"""Image-caption protection against CLIP-style training: retrieval victims on flickr8k-1k.

For each method: fit + map the train split (timed), image quality at the stored pixels (PSNR, SSIM),
then one retrieval victim per seed (a CLIP trained from scratch on the protected pairs,
``uexamples.evaluation.retrieval``), scored on the clean test pairs: R@1/5/10 and median rank in both
directions. ``clean`` trains the same victims on the clean pairs; ``random`` adds uniform noise of the
same bound (what any noise of 8/255 does by itself). One fit (seed 0) feeds every victim seed.

    python benchmarks/image_text.py --methods clean,random,mem --seeds 0,1,2
    python benchmarks/image_text.py --methods clean,mem --victim clip-vit --cache /tmp/it   # other victim, same data
    python benchmarks/image_text.py --table
    python benchmarks/image_text.py --generation-only --methods t2ue,mem,mem+text_triggers=3   # timing, no victims

Method names as ``common.make_protector`` reads them (``mem+final_noise_steps=40``). Each method's row
is written to benchmarks/results/image_text_<dataset>_<method>.json (so that runs on two cores do not
overwrite each other); ``--table`` prints one table per dataset and victim recipe. ``--generation-only``
times fit + map of each method one after the other in this process, with no victim (methods compared
under the same load), into benchmarks/results/generation_time_<dataset><suffix>.json.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import torch

from common import RESULTS, SHARED_DATASETS, benchmark_parser, dispatch, fit_and_map, machine_info, make_protector
from uexamples.evaluation import dataset_quality
from uexamples.evaluation.retrieval import METRICS, chance_levels, load_pairs, relative_recall, train_retrieval_victim

TARGET = 0.4  # the image-text issue's target for MEM: protected R@10 <= chance + 0.4 * (clean - chance), both directions
T2UE_TARGET = 0.5  # the T2UE issue's: at most chance + 0.5 * (clean - chance)


def random_noise(ds: datasets.Dataset, epsilon: float, seed: int) -> datasets.Dataset:
    """Uniform noise of the same bound, stored as PNG: the baseline any 8/255 perturbation reaches."""
    rng = np.random.default_rng(seed)
    levels = round(255 * epsilon)

    def add(batch):
        out = []
        for img in batch["image"]:
            arr = np.asarray(img.convert("RGB")).astype(np.int16)
            arr = np.clip(arr + rng.integers(-levels, levels + 1, arr.shape), 0, 255).astype(np.uint8)
            out.append(PIL.Image.fromarray(arr))
        return {"image": out}

    return ds.map(add, batched=True, batch_size=64, load_from_cache_file=False)


def generation_times(args, name: str, train: datasets.Dataset) -> None:
    """Fit + map of each method in turn, in this process: the same load for each (the 1-minute load average
    before and after each method is recorded, since other jobs on the machine change it)."""
    rows = []
    for method in args.methods.split(","):
        protector = make_protector(method, args.preset, 0)
        load_before = os.getloadavg()[0]
        _, fit_s, map_s = fit_and_map(protector, train, progress=not args.quiet, batch_size=256)
        rows.append({"method": method, "fit_seconds": round(fit_s, 1), "map_seconds": round(map_s, 1),
                     "generation_seconds": round(fit_s + map_s, 1), "fit_steps": (getattr(protector, "fit_stats", None) or {}).get("steps"),
                     "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2)})  # fmt: skip
        print(f"[{name}] {method}: fit {fit_s:.0f} s + map {map_s:.0f} s", flush=True)
    out = RESULTS / f"generation_time_{name}{args.suffix}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"dataset": name, "preset": args.preset, "train_images": len(train),
                               "machine": machine_info(), "rows": rows}, indent=2))  # fmt: skip


def run(args) -> None:
    torch.set_num_threads(args.threads)
    name = Path(args.dataset).name
    train = datasets.load_dataset(args.dataset, split="train")
    if args.generation_only:
        return generation_times(args, name, train)
    test = datasets.load_dataset(args.dataset, split="test")
    seeds = [int(s) for s in args.seeds.split(",")]
    t = load_pairs(test, "test", args.resolution)
    recipe = {"arch": args.victim, "epochs": args.epochs, "resolution": args.resolution, "batch_size": 64, "lr": 5e-4}
    for method in args.methods.split(","):
        row: dict = {"dataset": name, "method": method, "preset": args.preset, "train_images": len(train),
                     "test_images": len(test), "test_captions": sum(len(c) for c in t.captions), "victim": recipe,
                     "seeds": seeds, "machine": machine_info()}  # fmt: skip
        cached = Path(args.cache) / f"{name}_{method}_{args.preset}" if args.cache else None
        if method == "clean":
            protected = train
        elif cached is not None and (cached / "generation.json").is_file():  # another victim recipe, same data
            protected = datasets.load_from_disk(str(cached / "dataset"))
            row.update(json.loads((cached / "generation.json").read_text()))
        else:
            generation: dict = {}
            if method == "random":
                started = time.time()
                protected = random_noise(train, 8 / 255, seed=0)
                generation["generation_seconds"] = round(time.time() - started, 1)
            else:
                protector = make_protector(method, args.preset, 0)
                protected, fit_s, map_s = fit_and_map(protector, train, progress=not args.quiet, batch_size=256)
                generation.update(config=protector.public_config(), rules=protector.rules, fit_stats=protector.fit_stats,
                                  fit_seconds=round(fit_s, 1), map_seconds=round(map_s, 1),
                                  generation_seconds=round(fit_s + map_s, 1))  # fmt: skip
                if not protector.rewrites_captions(protector.public_config()):
                    assert protected["caption"] == train["caption"], "captions changed"
            row.update(generation)
            if cached is not None:
                protected.save_to_disk(str(cached / "dataset"))
                if method not in ("clean", "random"):  # the fitted protector too (T2UE: reused on other data)
                    protector.save_pretrained(cached / "protector")
                (cached / "generation.json").write_text(json.dumps(generation, default=float))
        if method != "clean":
            row["quality"] = dataset_quality(train, protected, "image", limit=None)
        p = load_pairs(protected, method, args.resolution)
        runs = [train_retrieval_victim(p, t, arch=args.victim, epochs=args.epochs, seed=s, progress=not args.quiet,
                                       desc=f"{method} victim seed {s}").to_dict() for s in seeds]  # fmt: skip
        row["runs"] = runs
        row["final"] = {k: {"mean": float(np.mean([r["final"][k] for r in runs])), "std": float(np.std([r["final"][k] for r in runs]))}
                        for k in METRICS}  # fmt: skip
        f = row["final"]
        print(f"[{name}] {method}: R@10 i2t {100 * f['i2t_r10']['mean']:.1f} ± {100 * f['i2t_r10']['std']:.1f}, "
              f"t2i {100 * f['t2i_r10']['mean']:.1f} ± {100 * f['t2i_r10']['std']:.1f}", flush=True)  # fmt: skip
        RESULTS.mkdir(parents=True, exist_ok=True)
        recipe_tag = "" if args.victim == "clip-conv" else f"_{args.victim}"
        (RESULTS / f"image_text_{name}{recipe_tag}_{method.replace('/', '_')}{args.suffix}.json").write_text(json.dumps(row, indent=2, default=float))


def _clean_on_seeds(rows: list[dict], dataset: str, victim: str, seeds: tuple) -> dict | None:
    """The clean row's runs on ``seeds`` (a group of exploration runs has no clean row of its own)."""
    for r in rows:
        if r["method"] == "clean" and r["dataset"] == dataset and json.dumps(r["victim"], sort_keys=True) == victim:
            runs = [run for s, run in zip(r["seeds"], r["runs"]) if s in seeds]
            if len(runs) == len(seeds):
                return {"final": {k: {"mean": float(np.mean([run["final"][k] for run in runs]))} for k in METRICS}}
    return None


def table() -> str:
    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("image_text_*.json"))]
    groups: dict = {}
    for r in rows:
        key = (r["dataset"], json.dumps(r["victim"], sort_keys=True), tuple(r["seeds"]))
        groups.setdefault(key, []).append(r)
    lines = []
    for (dataset, victim, seeds), members in groups.items():
        v = json.loads(victim)
        first = members[0]
        chance = chance_levels(first["test_images"], first["test_captions"])
        clean = next((m for m in members if m["method"] == "clean"), None) or _clean_on_seeds(rows, dataset, victim, seeds)
        lines += [
            f"**{dataset}** ({first['train_images']} train pairs; test {first['test_images']} images / {first['test_captions']} "
            f"captions), victim `{v['arch']}` from scratch, {v['epochs']} epochs at {v['resolution']} px, seeds "
            f"{','.join(map(str, seeds))} (mean ± std of the final epoch); {first['machine']['cpu_threads']} thread(s). "
            f"Relative = (R@10 - chance) / (clean R@10 - chance"
            + (")" if any(m["method"] == "clean" for m in members) else f" of the clean runs with seeds {','.join(map(str, seeds))})")
            + f"; targets in both directions: MEM ≤ {TARGET}, T2UE ≤ {T2UE_TARGET}.",
            "",
            "| method | I→T R@1 | R@5 | R@10 | median rank | T→I R@1 | R@5 | R@10 | median rank | relative R@10 I→T / T→I | generation (s) | PSNR (dB) | SSIM |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]  # fmt: skip
        order = sorted(members, key=lambda m: (m["method"] != "clean", m["method"] != "random", m["method"]))
        for m in order:
            f = m["final"]
            cells = []
            for k in METRICS[:3] + ["i2t_median_rank"] + METRICS[3:6] + ["t2i_median_rank"]:
                cells.append(f"{f[k]['mean']:.0f}" if k.endswith("rank") else f"{100 * f[k]['mean']:.1f} ± {100 * f[k]['std']:.1f}")
            rel = "-"
            if clean is not None and m is not clean:
                parts = [relative_recall(f[f"{d}_r10"]["mean"], clean["final"][f"{d}_r10"]["mean"], chance[f"{d}_r10"]) for d in ("i2t", "t2i")]
                rel = " / ".join("-" if x is None else f"{x:.2f}" for x in parts)
            q = m.get("quality") or {}
            gen = f"{m['generation_seconds']:.0f}" if "generation_seconds" in m else "-"
            psnr = f"{q['mean_psnr']:.1f}" if q else "-"
            ssim = f"{q['mean_ssim']:.3f}" if q else "-"
            lines.append(f"| {m['method']} | " + " | ".join(cells) + f" | {rel} | {gen} | {psnr} | {ssim} |")
        lines.append("| (chance) | " + " | ".join(
            f"{chance[k]:.0f}" if k.endswith("rank") else f"{100 * chance[k]:.1f}"
            for k in METRICS[:3] + ["i2t_median_rank"] + METRICS[3:6] + ["t2i_median_rank"]) + " | 0 / 0 | - | - | - |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def figure(args) -> None:
    """Originals, protected images and the amplified change of a few pairs, with the captions as published."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = Path(args.dataset).name
    train = datasets.load_dataset(args.dataset, split="train")
    method = args.methods.split(",")[-1]
    cached = Path(args.cache or "") / f"{name}_{method}_{args.preset}" / "dataset"
    if not args.cache or not cached.is_dir():
        raise SystemExit(f"--figure reads the protected split from --cache (run the method with --cache first): {cached}")
    protected = datasets.load_from_disk(str(cached))
    rows = [0, 3, 6]
    fig, axes = plt.subplots(len(rows), 3, figsize=(10, 3.3 * len(rows)))
    for r, i in enumerate(rows):
        o = np.asarray(train[i]["image"].convert("RGB"), dtype=float) / 255
        p = np.asarray(protected[i]["image"].convert("RGB"), dtype=float) / 255
        change = np.abs(p - o)
        for c, (img, title) in enumerate(((o, "original"), (p, "protected"), (change / max(change.max(), 1e-9), "change (scaled)"))):
            axes[r, c].imshow(img)
            axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
            axes[r, 0 if c == 0 else c].set_title(title if r == 0 else "", fontsize=9)
        before, after = train[i]["caption"][0], protected[i]["caption"][0]
        text = "caption: " + before if before == after else f"caption, published: {after}"
        axes[r, 1].set_xlabel("\n".join(textwrap.wrap(text, 60)), fontsize=8)
    fig.suptitle(f"{method} on {name}: PSNR of the set in benchmarks/README.md", fontsize=10)
    fig.tight_layout()
    out = RESULTS / f"image_text_{name}_{method}.png"
    fig.savefig(out, dpi=100)
    print(out)


def main(argv=None) -> None:
    p = benchmark_parser(__doc__)
    p.add_argument("--dataset", default=str(SHARED_DATASETS / "flickr8k-1k"))
    p.add_argument("--methods", default="clean,random,mem")
    p.add_argument("--preset", default="fast")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--victim", default="clip-conv", choices=["clip-conv", "clip-vit"])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--suffix", default="")
    p.add_argument("--cache", help="keep each protected split here and reuse it for another victim recipe")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--generation-only", action="store_true", help="time fit + map of each method, one after the other, no victims")
    p.add_argument("--figure", action="store_true", help="draw a few protected pairs of the last method from --cache")
    args = p.parse_args(argv)
    if args.figure:
        figure(args)
    else:
        dispatch(p, run, table, argv)


if __name__ == "__main__":
    main()
