"""Speed: images per second of fit and map for each method, and the min-min engine's overhead.

Overhead = wall time / (forward+backward passes the algorithm needs x measured time of one surrogate
forward+backward at that batch size). 1.0 means the engine costs nothing beyond the surrogate's own
compute; the target is at most 1.5.

    python benchmarks/speed.py --images 2000
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F

from common import (RESULTS, SHARED_DATASETS, benchmark_parser, dispatch, fit_input, keep_other_methods, machine_info,
                    make_protector)
from uexamples.methods.minmin import to_fast_layout
from uexamples.surrogates import build_surrogate



def time_pass(model: torch.nn.Module, batch: int, num_classes: int, repeats: int = 15) -> float:
    """Seconds of one forward+backward (gradient to the input, as in the noise phase) at ``batch``.

    The median of ``repeats`` timings: this shared 2-core machine's speed drifts by 10-15 % between
    runs, and a single mean was dominated by it.
    """
    model = to_fast_layout(model).eval()
    x = torch.rand(batch, 3, 32, 32)
    y = torch.randint(0, num_classes, (batch,))

    def once():
        xx = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(xx), y), xx)

    for _ in range(3):
        once()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        once()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    train = datasets.load_dataset(args.dataset, split="train").select(range(args.images))
    report = {
        "dataset": Path(args.dataset).name,
        "images": args.images,
        "machine": machine_info(),
        "methods": {},
    }
    out = RESULTS / "speed.json"
    if args.keep_others and out.exists():  # re-measure the named methods, keep the other rows
        report["methods"] = keep_other_methods(out, report, args.methods.split(","),
                                               lambda r: (r["dataset"], r["images"], r["machine"]))  # fmt: skip
    for method in args.methods.split(","):
        prot = make_protector(method, "fast", 0)
        train_m = fit_input(prot, train)
        engine = hasattr(prot.config, "surrogate")  # the min-min engine's overhead is measured against its surrogate
        if engine:  # pass time of the same (untrained) architecture, just before the run
            fresh, _ = build_surrogate(prot.config.surrogate, 10)
            before = (time_pass(fresh, prot.config.train_batch_size, 10), time_pass(fresh, min(prot.config.batch_size, args.images), 10))
        t0 = time.perf_counter()
        prot.fit(train_m, progress=False)
        fit_s = time.perf_counter() - t0
        fit_passes = getattr(prot, "passes", 0)
        t1 = time.perf_counter()
        train_m.map(prot, batched=True, batch_size=512, load_from_cache_file=False)
        map_s = time.perf_counter() - t1
        entry = {
            "fit_seconds": round(fit_s, 2),
            "map_seconds": round(map_s, 2),
            "fit_images_per_s": round(args.images / fit_s, 1),
            "map_images_per_s": round(args.images / map_s, 1),
        }
        if engine:
            cfg = prot.config
            model = prot._model()
            # mean of the pass time measured just before and just after the run
            t_fit = (before[0] + time_pass(model, cfg.train_batch_size, prot.num_classes)) / 2
            t_map = (before[1] + time_pass(model, min(cfg.batch_size, args.images), prot.num_classes)) / 2
            steps = prot.fit_stats["steps"]
            ideal_fit = steps * prot.passes_per_sample_step() * t_fit
            map_batches = args.images / min(cfg.batch_size, args.images)
            ideal_map = map_batches * prot.passes_per_mapped_image() * t_map
            entry.update(
                passes_per_sample_step=prot.passes_per_sample_step(),
                passes_per_mapped_image=prot.passes_per_mapped_image(),
                passes_counted_in_fit_per_step=round(fit_passes / steps / cfg.train_batch_size, 2),
                seconds_per_pass_fit_batch=round(t_fit, 5),
                seconds_per_pass_map_batch=round(t_map, 5),
                fit_overhead=round(prot.fit_stats["seconds"] / ideal_fit, 3),
                map_overhead=round(map_s / ideal_map, 3),
            )
        report["methods"][method] = entry
        print(method, json.dumps(entry), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return report


def table() -> str:
    rep = json.loads((RESULTS / "speed.json").read_text())
    lines = [
        f"{rep['images']} images of {rep['dataset']}, {rep['machine']['cpu_threads']} CPU threads, preset fast.",
        "",
        "| method | fit img/s | map img/s | passes/img/step (fit) | passes/img (map) | fit overhead | map overhead |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method, m in rep["methods"].items():
        lines.append(
            f"| {method} | {m['fit_images_per_s']} | {m['map_images_per_s']} | {m.get('passes_per_sample_step', '-')} | "
            f"{m.get('passes_per_mapped_image', '-')} | {m.get('fit_overhead', '-')} | {m.get('map_overhead', '-')} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = benchmark_parser(__doc__)
    p.add_argument("--dataset", default=str(SHARED_DATASETS / "cifar10-10k"))
    p.add_argument("--methods", default="cuda,em,sem,rem")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keep-others", action="store_true", help="keep the other methods' rows of results/speed.json")
    dispatch(p, run, table, argv)


if __name__ == "__main__":
    main()
