"""Memory and time on large photos: 4000 x 3000 (12 Mpx) RGB images through ``apply`` (the CLI's path).

Each measurement runs in a fresh process so that the peak resident memory (``ru_maxrss``) belongs to it
alone: the protector is built (SEM is fitted on the embedded sample first), then 6 synthetic photos are
protected. ``batch_pixels`` bounds how many pixels are decoded and processed together; the default
(4 Mpx) is compared with no pixel bound (rows only, as before the reliability issue).

    python benchmarks/large_photos.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from common import RESULTS, benchmark_parser, dispatch, machine_info

CHILD = textwrap.dedent(
    """
    import io, json, resource, sys, time
    import numpy as np, PIL.Image, datasets, torch
    torch.set_num_threads(2)
    datasets.disable_progress_bars()
    import uexamples as ue

    method, batch_pixels, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:3000, 0:4000]
    cells = []
    for i in range(n):  # smooth photo-like content plus sensor noise, stored as PNG
        arr = np.stack([(xx / 16 + i * 20) % 256, (yy / 12) % 256, ((xx + yy) / 28) % 256], -1)
        arr = np.clip(arr + rng.normal(0, 6, arr.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        PIL.Image.fromarray(arr).save(buf, "PNG", compress_level=1)
        cells.append({"bytes": buf.getvalue(), "path": None})
    del arr, yy, xx
    ds = datasets.Dataset.from_dict({"image": cells, "label": [0, 1] * (n // 2)},
                                    features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}))
    if method == "cuda":
        protector = ue.CUDAProtect(key=2**61 + 7, num_classes=10, batch_pixels=batch_pixels)
    else:
        protector = ue.SEMProtect(seed=0, train_steps=20, batch_pixels=batch_pixels).fit(ue.load_sample_dataset(), progress=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    out = protector.apply(ds, load_from_cache_file=False)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert len(out) == n and out[0]["image"].size == (4000, 3000)
    print(json.dumps({"map_seconds": round(seconds, 1), "seconds_per_photo": round(seconds / n, 2),
                      "peak_rss_mb": round(peak), "rss_before_map_mb": round(before)}))
    """
)


def run(args) -> dict:
    report = {"photos": args.photos, "size": [4000, 3000], "raw_mb_per_photo": 36, "machine": machine_info(cpu_threads=2),
              "runs": {}}  # fmt: skip
    for method in args.methods.split(","):
        for label, batch_pixels in (("rows only (no pixel bound)", 2**40), ("batch_pixels 4 Mpx (default)", 2**22)):
            res = subprocess.run([sys.executable, "-c", CHILD, method, str(batch_pixels), str(args.photos)],
                                 capture_output=True, text=True, check=True)  # fmt: skip
            entry = json.loads(res.stdout.strip().splitlines()[-1])
            report["runs"][f"{method} | {label}"] = entry
            print(method, label, entry, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "large_photos.json").write_text(json.dumps(report, indent=2))
    return report


def table() -> str:
    rep = json.loads((RESULTS / "large_photos.json").read_text())
    lines = [f"{rep['photos']} photos of 4000 x 3000 px (36 MB raw each) through `apply`, 2 threads.", "",
             "| method | chunking | peak memory (MB) | before the map (MB) | s / photo |", "|---|---|---:|---:|---:|"]  # fmt: skip
    for name, r in rep["runs"].items():
        method, label = name.split(" | ")
        lines.append(f"| {method} | {label} | {r['peak_rss_mb']} | {r['rss_before_map_mb']} | {r['seconds_per_photo']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = benchmark_parser(__doc__)
    p.add_argument("--methods", default="cuda,sem")
    p.add_argument("--photos", type=int, default=6)
    dispatch(p, run, table, argv)


if __name__ == "__main__":
    main()
