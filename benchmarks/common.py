"""What every benchmark script shares: the command line (``--table`` prints the committed results)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).parent / "results"
SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
CUDA_BENCH_KEY = 1_234_567_890_123  # a benchmark key; real users keep theirs secret


def benchmark_parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", action="store_true", help="print the Markdown table of the committed results and exit")
    return p


def dispatch(parser: argparse.ArgumentParser, run: Callable, table: Callable[[], str], argv=None) -> None:
    """Parse ``argv``; print the table with ``--table``, else run the benchmark."""
    args = parser.parse_args(argv)
    if args.table:
        print(table())
    else:
        run(args)
