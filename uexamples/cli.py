"""The ``uexamples`` command.

    uexamples protect --method sem --output out/            # the embedded CIFAR-10 sample
    uexamples protect --dataset user/images --split train --method cuda --output out/   # key from UEXAMPLES_CUDA_KEY
    uexamples protect --method em --help                    # the options of one method (from its config fields)
    uexamples evaluate --protected out/ --countermeasures standard,jpeg:10 --epochs 10 --output eval/
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import datasets

from . import __version__
from . import logging as ue_logging
from .core.columns import ColumnError
from .core.images import ImageDecodeError
from .core.options import cli_fields, field_help, field_type, number, secret_fields
from .core.registry import get_method, list_methods
from .outputs import OutputError, OutputLock, check_output, move_into_place, partial_dir
from .cards import protection_summary



class CLIError(Exception):
    """A user error reported in one line, without a traceback."""


def load_any_dataset(name: str | None, config: str | None, split: str) -> datasets.Dataset:
    """A Hub id, a local dataset repo folder, a ``save_to_disk`` folder, or (None) the embedded sample."""
    if name is None:
        from .data import load_sample_dataset

        return load_sample_dataset(split)
    path = Path(name)
    saved_by_datasets = (path / "state.json").exists() or (path / "dataset_dict.json").exists()
    if path.is_dir() and saved_by_datasets:
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise CLIError(f"split {split!r} not in {name} (splits: {list(ds)})")
            ds = ds[split]
        return ds
    try:
        return datasets.load_dataset(name, config, split=split)
    except ValueError as exc:
        raise CLIError(f"cannot load split {split!r} of {name}: {exc}") from exc
    except FileNotFoundError as exc:
        raise CLIError(f"dataset {name!r} not found (a Hub id, a local folder, or a save_to_disk folder): {exc}") from exc


def method_class(name: str) -> type:
    try:
        return get_method(name)
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def secret_values(klass: type, args: argparse.Namespace) -> dict[str, Any]:
    """The method's secrets (the CUDA key), from their hidden option or, preferably, their environment variable.

    A bad value is reported without echoing it.
    """
    values = {}
    for f in secret_fields(klass.config_class):
        raw = getattr(args, f.name, None)
        if raw is not None and f.metadata.get("env"):
            print(f"uexamples: warning: --{f.name.replace('_', '-')} on the command line is visible to every user of "
                  f"this machine (ps, shell history); prefer the {f.metadata['env']} environment variable",
                  file=sys.stderr)  # fmt: skip
        if raw is None and f.metadata.get("env"):
            raw = os.environ.get(f.metadata["env"])
        if raw is None:
            continue
        convert = field_type(f)
        try:
            values[f.name] = convert(raw)
        except ValueError:
            kind = {int: "an integer", number: "a number"}.get(convert, "valid")
            raise CLIError(f"the {klass.method.upper()} {f.name} must be {kind}") from None  # never echo the value
    return values


def build_protector(args: argparse.Namespace):
    """The protector the options describe: every option is a field of the method's config."""
    klass = method_class(args.method)
    kwargs: dict[str, Any] = {}
    for f in cli_fields(klass.config_class):
        value = getattr(args, f.name, None)
        if value is not None:
            kwargs[f.name] = value
    preset = kwargs.pop("preset", "fast")
    kwargs.update(secret_values(klass, args))
    return klass(preset=preset, **kwargs)


def saved_method(path: str) -> str:
    """The method of a protector saved with ``save_pretrained`` (read before the parser is built)."""
    from .core.protector import CONFIG_NAME, protector_folder

    try:
        folder = protector_folder(path)  # a folder, or a protector pushed to the Hub
    except FileNotFoundError as exc:
        raise CLIError(f"--protector {path}: {exc} (a folder written by save_pretrained, the protector/ folder of a "
                       "`uexamples protect` output, or a Hub repo id)") from None  # fmt: skip
    return str(json.loads((folder / CONFIG_NAME).read_text())["method"])


def load_protector(args: argparse.Namespace):
    """A fitted protector from ``--protector``: its saved config is kept; only run-time options may be given."""
    from .core.protector import Protector

    klass = method_class(args.method)
    runtime = {f.name: getattr(args, f.name) for f in cli_fields(klass.config_class)
               if f.name in klass.RUNTIME_OPTIONS and getattr(args, f.name, None) is not None}  # fmt: skip
    fixed = [f.name for f in cli_fields(klass.config_class)
             if f.name not in klass.RUNTIME_OPTIONS and getattr(args, f.name, None) is not None]  # fmt: skip
    if fixed:
        raise CLIError(f"--protector keeps the saved protector's config; these options cannot change it: "
                       f"{', '.join('--' + n.replace('_', '-') for n in fixed)} (only "
                       f"{', '.join('--' + n.replace('_', '-') for n in klass.RUNTIME_OPTIONS)})")  # fmt: skip
    protector = Protector.from_pretrained(args.protector, **runtime, **secret_values(klass, args))
    if not protector.fitted and protector.needs_fit:
        raise CLIError(f"--protector {args.protector} holds an unfitted {klass.method.upper()} protector")
    return protector


def write_output(out_dir: Path, args: argparse.Namespace, source: datasets.Dataset, protected: datasets.Dataset,
                 protector, started: float | None = None, **timings: Any) -> dict:  # fmt: skip
    """Write dataset/, protector/, summary.json and preview.png into a partial folder unique to this run,
    then move it into place (``outputs.move_into_place``: atomic, also with ``--overwrite``).

    Nothing that looks complete exists before everything succeeded. ``started``: when the run began;
    the summary's ``seconds`` then counts everything, the quality metrics and the preview included.
    Returns the summary.
    """
    tmp = partial_dir(out_dir)
    tmp.mkdir(parents=True)
    try:
        protected.save_to_disk(str(tmp / "dataset"))
        protector.save_pretrained(tmp / "protector")
        summary = protection_summary(source, protected, protector, args.dataset, args.split, args.config,
                                     preview=tmp / "preview.png", progress=not getattr(args, "quiet", False),
                                     started=started, **timings)  # fmt: skip
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        move_into_place(tmp, out_dir, overwrite=bool(getattr(args, "overwrite", False)))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def cmd_protect(args: argparse.Namespace) -> int:
    out_dir = check_output(args.output, args.overwrite)
    with OutputLock(out_dir):
        return _protect(args, out_dir)


def load_stream(name: str | None, config: str | None, split: str) -> datasets.IterableDataset:
    """The split as an ``IterableDataset``: streamed from the Hub or a local repo folder (nothing is downloaded
    or cached whole), or a ``save_to_disk`` folder / the embedded sample read row by row."""
    path = Path(name) if name is not None else None
    if path is None or (path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists())):
        return load_any_dataset(name, config, split).to_iterable_dataset()
    try:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except ValueError as exc:
        raise CLIError(f"cannot stream split {split!r} of {name}: {exc}") from exc
    except FileNotFoundError as exc:
        raise CLIError(f"dataset {name!r} not found (a Hub id, a local folder, or a save_to_disk folder): {exc}") from exc


def parse_size(text: str) -> int:
    """'500MB', '2GB', '1048576' -> bytes (the units of datasets' ``max_shard_size``)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit) and upper[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(upper[: -len(unit)]) * factor)
    if upper.isdigit():
        return int(upper)
    raise CLIError(f"--max-shard-size {text!r}: give bytes or a size such as 500MB or 2GB")


def protect_streaming(args: argparse.Namespace, out_dir: Path, on_shard: Any = None) -> int:
    """``--streaming``: fit on a seeded sample of the stream, then protect it into sharded parquet, batch by batch.

    ``on_shard(path)``: called with each finished shard (the hub script uploads and deletes it there)."""
    from .cards import summary_of
    from .preview import save_preview_cells
    from .streaming import protect_stream

    if args.splits:
        raise CLIError("--streaming protects one split (--split); run it once per split")
    max_shard_bytes = parse_size(args.max_shard_size)
    stream = load_stream(args.dataset, args.config, args.split)
    protector = load_protector(args) if args.protector else build_protector(args)
    if stream.features is None:
        raise CLIError(f"the stream of {args.dataset} has no features: cannot find its image column")
    columns = protector.columns_for(stream.features)  # column errors before the fit
    started = time.time()
    if not args.protector:
        protector.fit(stream, progress=not args.quiet, stream_sample=args.stream_sample)
    fit_s = time.time() - started
    tmp = partial_dir(out_dir)
    tmp.mkdir(parents=True)
    try:
        t0 = time.time()
        report = protect_stream(protector, stream, tmp / "dataset", split=args.split, max_shard_bytes=max_shard_bytes,
                                batch_size=args.map_batch_size or 64, progress=not args.quiet, on_shard=on_shard)  # fmt: skip
        map_s = time.time() - t0
        if report["images"] == 0:
            raise CLIError(f"split {args.split!r} is empty (0 rows): nothing to protect")
        protector.save_pretrained(tmp / "protector")
        save_preview_cells(report["preview"], tmp / "preview.png")
        summary = summary_of(protector, columns, args.dataset, args.split, args.config, images=report["images"],
                             quality=report["quality"], formats=report["formats"], streaming=True,
                             shards=[p.name for p in report["shards"]], shards_uploaded=on_shard is not None,
                             features=report["features"]._to_yaml_list(), fit_seconds=round(fit_s, 2),
                             map_seconds=round(map_s, 2), seconds=round(time.time() - started, 2))  # fmt: skip
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        move_into_place(tmp, out_dir, overwrite=bool(args.overwrite))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"protected {summary['images']} images with {protector.method.upper()} (streaming) in {summary['seconds']:.1f} s "
          f"(fit {fit_s:.1f} s, map and quality {map_s:.1f} s), {len(report['shards'])} parquet shard(s)\n"
          f"  L-inf {summary['linf_levels']} levels, mean PSNR {summary['mean_psnr']:.2f} dB, mean SSIM "
          f"{summary['mean_ssim']:.4f}\n  dataset: {out_dir / 'dataset'}  (load with datasets.load_dataset)\n"
          f"  preview: {out_dir / 'preview.png'}\n  summary: {out_dir / 'summary.json'}")  # fmt: skip
    return 0


def _protect(args: argparse.Namespace, out_dir: Path) -> int:
    if args.streaming:
        return protect_streaming(args, out_dir)
    names = [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else [args.split]
    if len(set(names)) != len(names):
        raise CLIError(f"--splits names a split twice: {args.splits}")
    fit_split = "train" if "train" in names else names[0]  # fit on the training split, as trainers do
    parts = {s: load_any_dataset(args.dataset, args.config, s) for s in names}
    empty = [s for s, d in parts.items() if len(d) == 0]
    if empty:
        raise CLIError(f"split {empty[0]!r} is empty (0 rows): nothing to protect")
    ds = parts[fit_split]
    args.split = fit_split
    protector = load_protector(args) if args.protector else build_protector(args)
    for d in parts.values():
        protector.columns_for(d.features)  # column errors before the long fit
    started = time.time()
    if not args.protector:
        protector.fit(ds, progress=not args.quiet)
    fit_s = time.time() - started
    t0 = time.time()
    done = {s: protector.apply(d, batch_size=args.map_batch_size, load_from_cache_file=False) for s, d in parts.items()}
    map_s = time.time() - t0
    if args.splits:  # several splits: one DatasetDict, one summary, one card
        ds, protected = datasets.DatasetDict(parts), datasets.DatasetDict(done)
    else:
        protected = done[fit_split]
    summary = write_output(out_dir, args, ds, protected, protector, started=started, fit_seconds=round(fit_s, 2),
                           map_seconds=round(map_s, 2))  # fmt: skip
    stats = summary
    bound = "none (CUDA is unbounded)" if protector.config.epsilon is None else f"{round(protector.config.epsilon * 255)}/255"
    print(
        f"protected {summary['images']} images with {protector.method.upper()} in {summary['seconds']:.1f} s "
        f"(fit {fit_s:.1f} s, map {map_s:.1f} s, quality and preview {summary['quality_seconds']:.1f} s)\n"
        f"  L-inf {stats['linf_levels']} levels (bound {bound}), mean PSNR {stats['mean_psnr']:.2f} dB, "
        f"mean SSIM {stats['mean_ssim']:.4f}\n"
        f"  dataset: {out_dir / 'dataset'}  (load with datasets.load_from_disk)\n"
        f"  preview: {out_dir / 'preview.png'}\n  summary: {out_dir / 'summary.json'}"
    )
    return 0


def _load_protected(path: str, split: str) -> tuple[datasets.Dataset, dict | None]:
    """A ``uexamples protect`` output folder (dataset/ + summary.json) or any dataset; also its summary."""
    folder = Path(path)
    if (folder / "summary.json").is_file() and (folder / "dataset").is_dir():
        summary = json.loads((folder / "summary.json").read_text())
        if summary.get("streaming"):  # parquet shards laid out as a Hub dataset repo
            return datasets.load_dataset(str(folder / "dataset"), split=summary.get("split", "train")), summary
        ds = datasets.load_from_disk(str(folder / "dataset"))
        if isinstance(ds, datasets.DatasetDict):  # a --splits output: the split asked for (default: the fitted one)
            split = split if split in ds else summary.get("split", "train")
            ds = ds[split]
        return ds, summary
    return load_any_dataset(path, None, split), None


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate

    protected, summary = _load_protected(args.protected, args.protected_split)
    source = (summary or {}).get("source") or {}
    if args.clean is None and not source:
        raise CLIError("pass --clean (the training split before protection): it is the baseline of the evaluation")
    clean_name = args.clean if args.clean is not None else source.get("dataset")
    clean_config = args.clean_config if args.clean is not None else source.get("config")
    clean_split = args.clean_split or source.get("split") or "train"
    clean = load_any_dataset(clean_name, clean_config, clean_split)
    test_name = args.test if args.test is not None else clean_name
    test = load_any_dataset(test_name, args.test_config if args.test is not None else clean_config, args.test_split)
    seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
    report = evaluate(
        protected,
        test,
        clean=clean,
        victim=args.victim,
        countermeasures=args.countermeasures,
        epochs=args.epochs,
        seeds=seeds,
        batch_size=args.batch_size,
        lr=args.lr,
        image_column=args.image_column,
        label_column=args.label_column,
        text_column=args.text_column,
        relabel=[r.strip() for r in args.relabel.split(",") if r.strip()] if args.relabel else None,
        device=args.device or "auto",
        progress=not args.quiet,
    )
    out = report.save(args.output)
    print(report.to_markdown())
    print(f"\n  report: {out / 'report.json'}\n  plot: {out / 'curves.png'}\n  table: {out / 'table.md'}")
    return 0


DEFAULT_METHOD = "sem"


def _relabel_names() -> list[str]:
    from .evaluation import RELABELINGS

    return sorted(RELABELINGS)


def method_from_argv(argv: Sequence[str]) -> str:
    """The ``--method`` of a command line, read before the full parser exists (its options depend on it)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default=None)
    pre.add_argument("--protector", default=None)
    known, _ = pre.parse_known_args(list(argv))
    if known.protector is not None:  # a saved protector brings its method
        method = saved_method(known.protector)
        if known.method is not None and known.method.lower() != method:
            raise CLIError(f"--method {known.method} but --protector {known.protector} holds a {method} protector")
        return method
    return str(known.method or DEFAULT_METHOD).lower()


def _show(value: Any) -> str:
    if isinstance(value, float):
        levels = value * 255
        return f"{value:.4g} = {round(levels)}/255" if 0 < value < 1 and abs(levels - round(levels)) < 1e-6 else f"{value:.4g}"
    return str(value)


def _defaults_text(klass: type, f) -> str:
    """' (default: X)', the value of each preset where the presets differ, or nothing for an unset default."""
    base = f.default if f.default is not dataclasses.MISSING else None
    per_preset = {name: values.get(f.name, base) for name, values in klass.PRESETS.items()}
    if len({repr(v) for v in per_preset.values()}) > 1:
        return " (" + ", ".join(f"{name}: {_show(v)}" for name, v in per_preset.items()) + ")"
    return "" if base is None else f" (default: {_show(base)})"


def add_method_arguments(p: argparse.ArgumentParser, klass: type) -> None:
    """One option per config field of the method (``train_steps`` -> ``--train-steps``), help from the field."""
    group = p.add_argument_group(f"{klass.method} options", f"{klass.title or klass.method}: {klass.paper}.")
    for f in cli_fields(klass.config_class):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "preset":
            group.add_argument(flag, choices=sorted(klass.PRESETS), default=None,
                               help=f"{field_help(f)} (default: fast)")  # fmt: skip
            continue
        convert = field_type(f)
        help_text = (field_help(f) + _defaults_text(klass, f)).replace("%", "%%")
        if convert is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(flag, type=convert, default=None, choices=f.metadata.get("choices"), help=help_text)
    for f in secret_fields(klass.config_class):  # never shown: a secret on a command line ends up in shell history
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, help=argparse.SUPPRESS)
    secrets = [f for f in secret_fields(klass.config_class) if f.metadata.get("env")]
    if secrets:
        group.description += " Secrets come from the environment: " + ", ".join(
            f"{f.metadata['env']} ({field_help(f)})" for f in secrets
        )


def add_protect_arguments(p: argparse.ArgumentParser, method: str | None = DEFAULT_METHOD) -> None:
    """The options of `uexamples protect` (shared with hub_scripts/protect.py): general ones, then the
    options of ``method`` (read from its config fields)."""
    p.add_argument("--dataset", help="Hub id, local dataset folder or save_to_disk folder (default: embedded sample)")
    p.add_argument("--config", help="dataset configuration name")
    p.add_argument("--split", default="train", help="the split to protect (default: train)")
    p.add_argument("--splits", help="several splits to protect into one dataset, comma-separated (e.g. train,test); the "
                   "fit uses train (or the first named). Default: only --split, since many users keep a clean test "
                   "split for their own evaluation; name the test split too when it will be published")  # fmt: skip
    p.add_argument("--method", default=DEFAULT_METHOD,
                   help=f"one of {', '.join(list_methods())} (default: {DEFAULT_METHOD}); the options below are "
                        "those of this method: `--method NAME --help` lists another's")  # fmt: skip
    p.add_argument("--protector", help="a fitted protector folder (save_pretrained, or the protector/ of an earlier output): "
                   "protect with it, no fit; its method and config come with it (T2UE: noise from the captions alone)")  # fmt: skip
    p.add_argument("--map-batch-size", type=int, default=None,
                   help="rows per datasets.map batch (default: from the image size, so that large photos fit in memory)")
    p.add_argument("--streaming", action="store_true",
                   help="read the split as a stream and write dataset/ as parquet shards, a batch at a time (bounded memory, "
                        "for datasets larger than memory); the fit uses a seeded sample of --stream-sample rows")  # fmt: skip
    p.add_argument("--stream-sample", type=int, default=10_000,
                   help="with --streaming: rows of the stream the fit sees (shuffled with the seed; default 10000)")
    p.add_argument("--max-shard-size", default="500MB", help="with --streaming: size of each parquet shard (default 500MB)")
    p.add_argument("--output", required=True, help="output folder (dataset/, protector/, summary.json, preview.png)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars, errors only")
    p.add_argument("--verbose", action="store_true", help="also log what the fit decided and measured (uexamples' INFO)")
    if method is not None:
        add_method_arguments(p, method_class(method))


def build_parser(method: str | None = DEFAULT_METHOD) -> argparse.ArgumentParser:
    """The ``uexamples`` parser; ``protect`` carries the options of ``method``."""
    parser = argparse.ArgumentParser(prog="uexamples", description="Make image datasets unlearnable.")
    parser.add_argument("--version", action="version", version=f"uexamples {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("protect", help="protect a dataset split and save it (lossless PNG/TIFF)")
    add_protect_arguments(p, method)
    p.set_defaults(func=cmd_protect)

    e = sub.add_parser("evaluate", help="train victims on protected vs clean data, under countermeasures")
    e.add_argument("--protected", required=True, help="a `uexamples protect` output folder, a save_to_disk folder or a dataset")
    e.add_argument("--protected-split", default="train")
    e.add_argument("--clean", help="the training split before protection (default: the source in the protect summary)")
    e.add_argument("--clean-config")
    e.add_argument("--clean-split", help="default: the protected split")
    e.add_argument("--test", help="the clean test set (default: the clean dataset)")
    e.add_argument("--test-config")
    e.add_argument("--test-split", default="test")
    e.add_argument("--victim", help="classifiers: convnet (default), resnet18, vit, or a transformers config id/folder; "
                   "captioned data without labels: clip-vit (default) or clip-conv, scored by retrieval")  # fmt: skip
    e.add_argument("--countermeasures", default="standard",
                   help="comma-separated: standard, cutout, mixup, grayscale, jpeg:10, bitdepth:2, blur:1, adv:8/255, partial:0.5, orthogonal (orthogonal,test=1)")  # fmt: skip
    e.add_argument("--epochs", type=int, help="default 15 (classifiers), 30 (retrieval victims)")
    e.add_argument("--seeds", default="0", help="comma-separated victim seeds")
    e.add_argument("--batch-size", type=int, help="default 128 (classifiers), 64 (retrieval victims)")
    e.add_argument("--lr", type=float)
    e.add_argument("--image-column")
    e.add_argument("--text-column", help="the caption column of image-text data (default: caption/text/...)")
    e.add_argument("--label-column", help="train the victim on this label column (label-agnostic check)")
    e.add_argument("--relabel", help="also train victims on these relabellings the protector never saw (comma-separated; "
                   "built-in: " + ", ".join(_relabel_names()) + ")")  # fmt: skip
    e.add_argument("--device")
    e.add_argument("--output", required=True, help="folder for report.json, curves.png and table.md")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        method = method_from_argv(argv)
        method_class(method)
    except CLIError as exc:
        print(f"uexamples: error: {exc}", file=sys.stderr)
        return 2
    args = build_parser(method).parse_args(argv)
    if getattr(args, "protector", None):
        args.method = method  # the saved protector's
    if args.quiet:
        datasets.disable_progress_bars()
        ue_logging.set_verbosity_error()
    elif getattr(args, "verbose", False):
        ue_logging.set_verbosity_info()
    try:
        return args.func(args)
    except (CLIError, ColumnError, ImageDecodeError, OutputError, ValueError, TypeError, FileNotFoundError) as exc:
        print(f"uexamples: error: {as_options(str(exc))}", file=sys.stderr)
        return 2


def as_options(message: str) -> str:
    """The library's advice in command-line words: ``pass label_column=`` -> ``pass --label-column``."""
    import re

    return re.sub(r"\b(\w+_column)=", lambda m: "--" + m.group(1).replace("_", "-"), message)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
