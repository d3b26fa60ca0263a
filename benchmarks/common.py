"""What every benchmark script shares: the command line (``--table`` prints the committed results)."""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).parent / "results"
README = Path(__file__).parent / "README.md"
SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
SHARED_MODELS = SHARED_DATASETS.parent / "models" / "cifar10-resnet"
CUDA_BENCH_KEY = 1_234_567_890_123  # a benchmark key; real users keep theirs secret


def machine_info(**extra) -> dict:
    """What a results file records about the machine it was measured on."""
    import torch

    return {"cpu_threads": torch.get_num_threads(), "cpu": cpu_model(), "platform": platform.platform(), "torch": torch.__version__,
            **extra}  # fmt: skip


def cpu_model() -> str:
    """The CPU's model name: the shared machines are Intel Xeon or AMD EPYC, and a bilevel fit's float path differs
    between the two (the same seed gives other noise), so every results file says which one measured it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_protector(spec: str, preset: str, seed: int, device: str | None = None, **overrides):
    """The protector a benchmark's method name stands for.

    ``spec`` is a registered method (``sem``, ``em``, ``rem``, ``cuda``, ``uc``), ``em-classwise``,
    ``cuda-paper`` (CUDA with the paper's filters whatever ``preset`` says), ``uc-resnet20`` /
    ``uc-resnet56`` (UC with a pretrained CIFAR ResNet of ../shared/models as encoder), any of them with
    ``@N`` for a budget of N/255 instead of the preset's (``sem@16``: SEM at 16/255), and with
    ``+field=value`` config fields (``uc+optimiser=generator``; values are read as JSON when they parse).
    ``overrides`` are further config fields (``kernel_size=5`` for CUDA).
    """
    import uexamples as ue

    spec, *fields = spec.split("+")
    for item in fields:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    seed = int(overrides.pop("seed", seed))  # "+seed=N": another fit seed than the run's
    method, _, budget = spec.partition("@")
    kwargs: dict = {"preset": preset, **overrides}
    if method.startswith("uc-resnet"):
        method, kwargs["encoder"] = "uc", str(SHARED_MODELS / f"resnet{method.removeprefix('uc-resnet')}.safetensors")
    if budget:
        if method == "cuda":
            raise ValueError("CUDA has no L-inf budget: 'cuda@N' means nothing")
        kwargs["epsilon"] = float(budget) / 255
    if method == "cuda-paper":
        method, kwargs["preset"] = "cuda", "paper"
    if method == "cuda":
        return ue.CUDAProtect(key=CUDA_BENCH_KEY + seed, **kwargs)
    if device is not None:
        kwargs["device"] = device
    if method == "em-classwise":
        return ue.EMProtect(seed=seed, noise_type="class-wise", **kwargs)
    return ue.get_method(method)(seed=seed, **kwargs)


def fit_input(protector, train):
    """What ``protector.fit`` gets: a label-free method never sees the labels (only the image column is kept,
    and the captions for a method that needs them)."""
    if protector.needs_labels:
        return train
    keep = {"image", protector.columns_for(train.features).text} if protector.needs_texts else {"image"}
    return train.remove_columns([c for c in train.column_names if c not in keep])


def fit_and_map(protector, train, progress: bool = False, batch_size: int = 512, **map_kwargs):
    """Fit ``protector`` on ``train`` (label-free methods without the labels, :func:`fit_input`) and map the
    whole split; returns (protected, fit seconds, map seconds)."""
    t0 = time.time()
    protector.fit(fit_input(protector, train), progress=progress)
    fit_s = time.time() - t0
    t1 = time.time()
    protected = train.map(protector, batched=True, batch_size=batch_size, load_from_cache_file=False, **map_kwargs)
    return protected, fit_s, time.time() - t1


def keep_other_methods(path: Path, report: dict, rerun: list[str], signature: Callable[[dict], object]) -> dict:
    """The ``methods`` rows of the results file at ``path`` for every method not in ``rerun``.

    For ``--keep-others``: refused (SystemExit) unless ``signature`` of the file's report equals that of
    the new ``report``, so that rows measured under another recipe or machine setting are never mixed.
    """
    old = json.loads(path.read_text())
    if signature(old) != signature(report):
        raise SystemExit(f"--keep-others: {path} was measured under another recipe or setting; run every method")
    return {m: r for m, r in old["methods"].items() if m not in rerun}


def benchmark_parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", action="store_true", help="print the Markdown table of the committed results and exit")
    p.add_argument("--update-readme", action="store_true",
                   help="write that table into benchmarks/README.md (between its <!-- table:NAME --> markers) and exit")
    return p


def dispatch(parser: argparse.ArgumentParser, run: Callable, table: Callable[[], str], argv=None) -> None:
    """Parse ``argv``; print the table with ``--table`` (and write it into benchmarks/README.md with
    ``--update-readme``), else run the benchmark."""
    args = parser.parse_args(argv)
    if args.update_readme:
        name = Path(parser.prog).stem  # the script's name: generalisation.py writes <!-- table:generalisation -->
        splice_table(README, name, table())
        print(f"{README}: the {name} table rewritten from {RESULTS.name}/")
    elif args.table:
        print(table())
    else:
        run(args)


def splice_table(readme: Path, name: str, table: str) -> None:
    """Put ``table`` between the lines ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->`` of ``readme``, so a
    table regenerated from the results files replaces the committed one, with nothing pasted by hand.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "README.md"
    >>> _ = path.write_text("intro\n<!-- table:demo -->\nold\n<!-- /table:demo -->\nafter\n")
    >>> splice_table(path, "demo", "| a |\n|---|\n")
    >>> print(path.read_text(), end="")
    intro
    <!-- table:demo -->
    | a |
    |---|
    <!-- /table:demo -->
    after
    """
    text = readme.read_text(encoding="utf-8")
    start, end = f"<!-- table:{name} -->\n", f"<!-- /table:{name} -->\n"
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise SystemExit(f"{readme}: needs one '{start.strip()}' line, then one '{end.strip()}' line, around the table")
    head, rest = text.split(start)
    readme.write_text(head + start + table.rstrip("\n") + "\n" + end + rest.split(end, 1)[1], encoding="utf-8")
