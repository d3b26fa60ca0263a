"""Protect a dataset split on one or many processes, resumably, and publish it with a dataset card.

    python hub_scripts/protect.py --dataset user/images --method sem --output out/
    accelerate launch -m uexamples.hub_scripts.protect ...    # the same script from a pip install
    accelerate launch --num_processes 4 hub_scripts/protect.py --dataset user/images --method sem \\
        --output out/ --push-to-hub user/images-protected
    # two CPU processes on one machine:
    ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 \\
        hub_scripts/protect.py --dataset ../shared/datasets/cifar10-10k --method cuda --output out/

Takes the options of ``uexamples protect`` (``--streaming`` included: one process, parquet shards, bounded
memory; with ``--push-to-hub`` each finished shard is uploaded and deleted, so the disk holds one at a time)
plus ``--push-to-hub REPO_ID``, ``--private``,
``--chunk-size``, ``--fit-checkpoint-steps`` and ``--evaluation DIR`` (a ``uexamples evaluate`` output to put
in the card).

How the work is split: the fit is data-parallel (the surrogate trains through
``Accelerator.prepare``; every process computes the noise of its part of each batch); the map cuts
the split into chunks of ``--chunk-size`` rows and each process maps one contiguous run of chunks;
the chunks are concatenated in the original order. Noise depends only on the image, the seed and
the fitted surrogate, so the dataset does not depend on the number of processes or the batch size.

Resuming: the state lives in ``OUTPUT.work/`` (a checkpoint of the unfinished fit every
``--fit-checkpoint-steps`` steps, the fitted protector and every finished chunk, each written to a
temporary name and renamed when complete). Launching the same command again after a
crash reuses them; different arguments are refused. The final folder is assembled as
``OUTPUT.partial`` and renamed, and a rerun with a finished ``OUTPUT`` only (re)tries the push. After
success ``OUTPUT.work/`` keeps only ``run.json`` (the run's arguments, no secret): the chunks and the fit
are deleted.

The token comes from the usual Hugging Face sources (``HF_TOKEN``, ``hf auth login``); it and the
CUDA key are never printed, logged or written.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from accelerate import Accelerator  # created first: a bare PartialState ignores ACCELERATE_USE_CPU


def parse_args(argv=None) -> argparse.Namespace:
    from uexamples.cli import CLIError, add_protect_arguments, method_from_argv

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                conflict_handler="resolve")  # fmt: skip
    try:
        add_protect_arguments(p, method_from_argv(argv))  # the method's own options come from its config
    except CLIError as exc:
        p.error(str(exc))
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="publish the protected split and its card to this dataset repo")
    p.add_argument("--private", action="store_true", help="create the Hub repository as private")
    p.add_argument("--chunk-size", type=int, default=1000, help="rows per map chunk (the unit of resuming)")
    p.add_argument("--fit-checkpoint-steps", type=int, default=100,
                   help="save the unfinished fit every N steps, so that a killed fit goes on from there (default 100)")  # fmt: skip
    p.add_argument("--evaluation", help="a `uexamples evaluate` output folder whose table goes into the card")
    args = p.parse_args(argv)
    if args.splits:
        p.error("this script protects one split per run (--split; its chunks and resuming are per split): run it once per "
                "split, or use `uexamples protect --splits` for several splits in one dataset")  # fmt: skip
    if args.protector:
        args.method = method_from_argv(argv)  # the saved protector's
    if args.chunk_size < 1:
        p.error("--chunk-size must be >= 1")
    if args.fit_checkpoint_steps < 1:
        p.error("--fit-checkpoint-steps must be >= 1")
    return args


def run_identity(args: argparse.Namespace, secrets: dict) -> dict:
    """What must match for a rerun to reuse the state: the arguments, secrets as their salted fingerprints."""
    from uexamples import __version__, get_method
    from uexamples.core.protector import secret_fingerprint

    secret_names = set(get_method(args.method).secret_names())
    skip = {"quiet", "overwrite", "push_to_hub", "private", "evaluation", "output", "device", "fit_checkpoint_steps"}
    ident = {k: v for k, v in sorted(vars(args).items()) if k not in skip | secret_names}
    for name in sorted(secret_names):
        ident[f"{name}_fingerprint"] = secret_fingerprint(secrets[name]) if name in secrets else None
    ident["uexamples"] = __version__
    return ident


def chunk_ranges(n_rows: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk_size, n_rows)) for a in range(0, n_rows, chunk_size)]


def my_chunks(n_chunks: int, rank: int, world: int) -> range:
    """One contiguous run of chunks per process."""
    return range(rank * n_chunks // world, (rank + 1) * n_chunks // world)


def atomic_save(ds, final: Path) -> None:
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ds.save_to_disk(str(tmp))
    tmp.rename(final)


def generate(args, accelerator, out_dir: Path, work: Path, secrets: dict) -> None:
    import datasets
    import torch

    from uexamples import Protector
    from uexamples.cli import CLIError, build_protector, load_any_dataset, load_protector, write_output

    main_process = accelerator.is_main_process
    if args.streaming:  # the stream is read once, in order, by one process: parquet shards, bounded memory
        if accelerator.num_processes > 1:
            raise CLIError("--streaming runs on one process (a stream is read in order; its rows cannot be cut into "
                           "chunks without reading it): launch without --num_processes, or drop --streaming")  # fmt: skip
        from uexamples.cli import protect_streaming

        work.mkdir(parents=True, exist_ok=True)
        (work / "run.json").write_text(json.dumps(run_identity(args, secrets), indent=2))
        uploader = None
        if args.push_to_hub:  # each finished shard goes to the Hub and leaves the disk: larger-than-disk datasets
            from uexamples.hub import ShardUploader

            uploader = ShardUploader(args.push_to_hub, private=args.private)
        protect_streaming(args, out_dir, on_shard=uploader)
        return
    ds = load_any_dataset(args.dataset, args.config, args.split)
    if len(ds) == 0:
        raise CLIError("the dataset is empty (0 rows): nothing to protect")
    if args.device is None:
        args.device = str(accelerator.device)
    if main_process:
        work.mkdir(parents=True, exist_ok=True)
        (work / "run.json").write_text(json.dumps(run_identity(args, secrets), indent=2))
    accelerator.wait_for_everyone()

    # ---------------------------------------------------------------- fit (or reuse its checkpoint)
    fit_dir = work / "fit"
    fit_s = 0.0
    runtime = dict(secrets)  # a saved protector needs its secrets again (never written in work/)
    if not fit_dir.is_dir() and args.protector:  # a protector fitted elsewhere (T2UE: from captions alone): no fit
        if main_process:
            load_protector(args).save_pretrained(work / "fit.tmp")
            (work / "fit.tmp").rename(fit_dir)
        accelerator.wait_for_everyone()
    if not fit_dir.is_dir():
        protector = build_protector(args)
        if hasattr(protector.config, "fit_shards") and getattr(args, "fit_shards", None) is None:
            # the method's own --fit-shards wins; the default is fixed (2) so that 1 and 2 processes agree
            protector.config.fit_shards = max(2, accelerator.num_processes)
        t0 = time.time()
        protector.fit(ds, progress=not args.quiet and main_process, accelerator=accelerator,
                      checkpoint_dir=work / "fit-progress", checkpoint_every=args.fit_checkpoint_steps)  # fmt: skip
        fit_s = time.time() - t0
        if main_process:
            tmp = work / "fit.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            protector.save_pretrained(tmp)
            stats = getattr(protector, "fit_stats", None)  # steps, surrogate accuracy, step a resumed fit began at
            (tmp / "fit_stats.json").write_text(json.dumps(stats, default=str))
            tmp.rename(fit_dir)
        accelerator.wait_for_everyone()
    # every process maps with the saved protector: a resumed run is the same as a fresh one
    protector = Protector.from_pretrained(fit_dir, device=args.device, **runtime)

    # ---------------------------------------------------------------- map: my contiguous chunks
    chunks = chunk_ranges(len(ds), args.chunk_size)
    chunk_dir = work / "chunks"
    chunk_dir.mkdir(exist_ok=True)
    accelerator.wait_for_everyone()
    t_map = time.time()
    reused = 0
    for c in my_chunks(len(chunks), accelerator.process_index, accelerator.num_processes):
        final = chunk_dir / f"chunk-{c:06d}"
        if final.is_dir():
            reused += 1
            continue
        a, b = chunks[c]
        part = protector.apply(ds.select(range(a, b)), batch_size=args.map_batch_size, load_from_cache_file=False,
                               desc=f"Protecting chunk {c + 1}/{len(chunks)} (process {accelerator.process_index})")  # fmt: skip
        atomic_save(part, final)
    accelerator.wait_for_everyone()
    map_s = time.time() - t_map
    reused = int(accelerator.reduce(torch.tensor([reused], device=accelerator.device), reduction="sum").item())
    if not main_process:
        return

    # ---------------------------------------------------------------- assemble in the original order
    parts = [datasets.load_from_disk(str(chunk_dir / f"chunk-{c:06d}")) for c in range(len(chunks))]
    protected = datasets.concatenate_datasets(parts)
    stats_file = fit_dir / "fit_stats.json"
    fit_stats = json.loads(stats_file.read_text()) if stats_file.is_file() else None
    write_output(out_dir, args, ds, protected, protector, processes=accelerator.num_processes, chunks=len(chunks),
                 chunks_reused=reused, fit_seconds=round(fit_s, 2), map_seconds=round(map_s, 2), fit=fit_stats)  # fmt: skip
    # the output is complete: the chunks (a second copy of the dataset) and the fit are needed no more; run.json
    # stays so that the same command later knows this output is its own and only (re)tries the push
    for leftover in ("chunks", "fit", "fit-progress"):
        shutil.rmtree(work / leftover, ignore_errors=True)
    print(f"protected {len(ds)} images on {accelerator.num_processes} process(es): map {map_s:.1f} s -> {out_dir}", flush=True)


def main(argv=None) -> int:
    accelerator = Accelerator()
    args = parse_args(argv)
    import datasets

    from accelerate.utils import broadcast_object_list

    from uexamples.cli import CLIError, method_class, secret_values
    from uexamples.hub import PublishError, publish
    from uexamples.outputs import OutputError, OutputLock, check_output

    if args.quiet or not accelerator.is_main_process:
        datasets.disable_progress_bars()
    out_dir = Path(args.output)
    work = out_dir.with_name(out_dir.name + ".work")
    lock = None
    try:
        secrets = secret_values(method_class(args.method), args)
        problem = [None]
        if accelerator.is_main_process:  # one run per output: a second one is refused, not mixed in
            try:
                check_output(out_dir, overwrite=True)  # a finished output may be reused: emptiness is judged below
                lock = OutputLock(out_dir).acquire()
            except OutputError as exc:
                problem[0] = str(exc)
        if accelerator.num_processes > 1:
            broadcast_object_list(problem)
        if problem[0]:
            raise CLIError(problem[0])
        if args.overwrite and accelerator.is_main_process:
            shutil.rmtree(work, ignore_errors=True)  # the old output stays until the new one replaces it atomically
        accelerator.wait_for_everyone()
        saved = work / "run.json"
        if saved.is_file() and json.loads(saved.read_text()) != run_identity(args, secrets):
            raise CLIError(f"{work} holds a run with other arguments; pass --overwrite to start again")
        done = (out_dir / "summary.json").is_file() and saved.is_file()
        if not done:
            if out_dir.exists() and any(out_dir.iterdir()) and not args.overwrite:
                raise CLIError(f"output folder {out_dir} is not empty and was not made by this run; pass --overwrite")
            generate(args, accelerator, out_dir, work, secrets)
        elif accelerator.is_main_process:
            print(f"{out_dir} is complete: nothing to generate", flush=True)
        accelerator.wait_for_everyone()
        if args.push_to_hub and accelerator.is_main_process:
            url = publish(out_dir, args.push_to_hub, private=args.private, evaluation=args.evaluation)
            print(f"published: {url}", flush=True)
    except (CLIError, PublishError, ValueError, FileNotFoundError) as exc:
        print(f"protect.py: error: {exc}", file=sys.stderr, flush=True)
        return 2 if not isinstance(exc, PublishError) else 3
    finally:
        if lock is not None:
            lock.release()
        accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
