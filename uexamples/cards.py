"""Dataset cards for published protected datasets (template: ``cards/dataset_card.md``).

>>> meta = card_metadata({"method": "sem", "config": {"epsilon": 8 / 255, "seed": 0, "preset": "fast"},
...                       "source": {"dataset": None, "split": "train"}}, license="mit")
>>> meta["license"], "unlearnable-examples" in meta["tags"], meta["uexamples"]["epsilon_levels"]
('mit', True, 8)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

from . import __version__

# uexamples/templates/dataset_card.md links to the repository's cards/dataset_card.md; wheels carry a copy
TEMPLATE = Path(__file__).parent / "templates" / "dataset_card.md"

def method_text(method: str) -> tuple[str, str, str]:
    """(title, one-paragraph summary, BibTeX) of a method, read from its class: a method module owns its text."""
    from .core.registry import get_method

    try:
        klass = get_method(method)
    except ValueError:  # a method this installation does not know (e.g. a plugin not loaded here)
        return method.upper(), "", ""
    return klass.title or method.upper(), klass.summary, klass.citation


def method_notes(method: str, config: dict[str, Any]) -> list[str]:
    """Method-specific lines of the card (e.g. UC's label-agnostic claim and encoder), from its class."""
    from .core.registry import get_method

    try:
        return list(get_method(method).card_notes(config))
    except ValueError:
        return []


# Below these a protected image differs visibly from its original (8/255 additive noise: 30-33 dB, SSIM 0.9+).
VISIBLE_BELOW_PSNR = 28.0
VISIBLE_BELOW_SSIM = 0.85


def captions_changed(method: str, config: dict[str, Any]) -> bool:
    """Whether the method, with this config, rewrote the captions (MEM's text triggers)."""
    from .core.registry import get_method

    try:
        return bool(get_method(method).rewrites_captions(config))
    except ValueError:
        return False


def source_license(source: str | None) -> str:
    """The license in the source dataset's card (a local folder or a Hub id), else ``"unknown"``."""
    if source is None:
        return "unknown"  # the embedded CIFAR-10 sample
    try:
        from huggingface_hub import DatasetCard

        path = Path(source) / "README.md"
        card = DatasetCard.load(path) if path.is_file() else DatasetCard.load(source)
        return str(card.data.to_dict().get("license") or "unknown")
    except Exception:  # no card, offline, not a Hub dataset: say so instead of guessing
        return "unknown"


def card_metadata(summary: dict[str, Any], license: str, evaluated: bool = False) -> dict[str, Any]:
    """The card's YAML metadata, from the run summary (which never holds a key or token)."""
    cfg = summary.get("config", {})
    eps = cfg.get("epsilon")
    src = (summary.get("source") or {}).get("dataset")
    meta: dict[str, Any] = {
        "license": license,
        "tags": ["unlearnable-examples", "uexamples", f"uexamples-{summary['method']}", "data-protection"],
        "uexamples": {
            "version": summary.get("uexamples_version", __version__),
            "method": summary["method"],
            "preset": cfg.get("preset"),
            "epsilon": eps,
            "epsilon_levels": None if eps is None else round(eps * 255),
            "seed": cfg.get("seed"),
            "source": (src if not Path(src).exists() else Path(src).name) if src else "uexamples embedded CIFAR-10 sample",
            "split": (summary.get("source") or {}).get("split"),
            "evaluated": evaluated,
        },
    }
    if src and not Path(src).exists():  # a Hub id
        meta["source_datasets"] = [src]
    return meta


def stored_formats(protected: datasets.Dataset, image_column: str) -> list[str]:
    """The file formats the protected images are stored in ("PNG", "TIFF": datasets stores CMYK as TIFF)."""
    raw = protected.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
    found = set()
    for batch in raw.iter(batch_size=256):  # a batch of encoded images in memory at a time, not the whole split
        found.update(cell_format(cell) for cell in batch[image_column])
    return sorted(found)


def cell_format(cell: dict | None) -> str:
    """"PNG", "TIFF" or "other": the container of one encoded image cell, from its first bytes."""
    head = (cell or {}).get("bytes") or b""
    return "TIFF" if head[:4] in (b"II*\x00", b"MM\x00*") else "PNG" if head[:8] == b"\x89PNG\r\n\x1a\n" else "other"


def protection_summary(source: datasets.Dataset, protected: datasets.Dataset, protector: Any, dataset: str | None,
                       split: str = "train", config: str | None = None, preview: str | Path | None = None,
                       progress: bool = False, started: float | None = None, **timings: Any) -> dict[str, Any]:  # fmt: skip
    """What a card is made from (the CLI's summary.json): method, config (no secret), rules, columns, the
    quality measured on the stored pixels, the stored formats; draws the preview into ``preview`` when given.
    ``started``: when the run began (``seconds`` then counts everything, quality and preview included)."""
    import time

    from .evaluation.metrics import dataset_quality
    from .preview import save_preview

    splits = None
    if isinstance(source, datasets.DatasetDict):  # several splits: measured together, counted apart
        splits = {s: len(source[s]) for s in source}
        source = datasets.concatenate_datasets([source[s] for s in splits])
        protected = datasets.concatenate_datasets([protected[s] for s in splits])
    columns = protector.columns_for(source.features)
    t0 = time.time()
    quality = dataset_quality(source, protected, columns.image, progress=progress)
    if preview is not None:
        save_preview(source, protected, columns.image, preview)
    timings["quality_seconds"] = round(time.time() - t0, 2)
    if started is not None:
        timings["seconds"] = round(time.time() - started, 2)
    return summary_of(protector, columns, dataset, split, config, images=len(source), quality=quality,
                      formats=stored_formats(protected, columns.image), splits=splits, **timings)  # fmt: skip


def summary_of(protector: Any, columns: Any, dataset: str | None, split: str, config: str | None, images: int,
               quality: dict[str, Any], formats: list[str], splits: dict[str, int] | None = None,
               **extra: Any) -> dict[str, Any]:  # fmt: skip
    """The summary dict from what was measured (shared by :func:`protection_summary` and the streaming writer)."""
    return {
        "uexamples_version": __version__,
        "method": protector.method,
        "dataset": dataset or "uexamples embedded CIFAR-10 sample",
        "split": split,
        "images": images,
        **extra,
        "config": protector.public_config(),
        "rules": protector.rules,
        "columns": {"image": columns.image, "label": columns.label, "text": columns.text},
        "source": {"dataset": dataset, "config": config, "split": split},
        "formats": formats,
        "splits": splits,
        **quality,
    }


def render_card(summary: dict[str, Any], repo_id: str, license: str, preview_file: str = "preview.png",
                evaluation: str | None = None) -> str:  # fmt: skip
    """The full README.md (YAML + body) of a published protected dataset."""
    import jinja2
    from huggingface_hub import DatasetCard, DatasetCardData

    method = summary["method"]
    title, what, bibtex = method_text(method)
    meta = card_metadata(summary, license, evaluated=evaluation is not None)
    src = (summary.get("source") or {}).get("dataset")
    # a local path is shown by its folder name only (it means nothing on the Hub, and may be private)
    source = (Path(src).name if Path(src).exists() else src) if src else "the uexamples embedded CIFAR-10 sample"
    cfg = summary.get("config", {})
    eps = cfg.get("epsilon")
    splits = summary.get("splits") or {}
    if len(splits) > 1:
        fitted = (summary.get("source") or {}).get("split", "train")
        split_text = ("splits " + ", ".join(f"`{s}` ({n} images)" for s, n in splits.items())
                      + f"; the method was fitted on `{fitted}`")  # fmt: skip
    else:
        split_text = f"split `{(summary.get('source') or {}).get('split', 'train')}`, {summary.get('images')} images"
    body = jinja2.Template(TEMPLATE.read_text(), undefined=jinja2.StrictUndefined).render(
        split_text=split_text,
        pretty_name=f"{Path(source).name} ({title.split(' ')[0]}-protected)",
        source_name=source,
        method=method,
        method_title=title,
        method_summary=what,
        preset=cfg.get("preset"),
        seed=cfg.get("seed"),
        epsilon_levels=None if eps is None else round(eps * 255),
        version=summary.get("uexamples_version", __version__),
        linf=summary.get("linf_levels"),
        psnr=f"{summary.get('mean_psnr', float('nan')):.2f}",
        ssim=f"{summary.get('mean_ssim', float('nan')):.4f}",
        preview_file=preview_file,
        repo_id=repo_id,
        tiff="TIFF" in (summary.get("formats") or []),
        evaluation=evaluation,
        bibtex=bibtex,
        method_notes=method_notes(method, cfg),
        rules=summary.get("rules") or {},
        image_column=(summary.get("columns") or {}).get("image") or "image",
        text_column=(summary.get("columns") or {}).get("text"),
        captions_changed=captions_changed(method, cfg),
        # the wording follows the measured quality: CUDA's blur (about 19 dB on CIFAR) is not invisible
        visible=not (summary.get("mean_psnr", 0) >= VISIBLE_BELOW_PSNR and summary.get("mean_ssim", 0) >= VISIBLE_BELOW_SSIM),
    )
    data = DatasetCardData(**{k: v for k, v in meta.items() if k in ("license", "tags", "source_datasets")},
                           uexamples=meta["uexamples"], pretty_name=Path(source).name + " (protected)")  # fmt: skip
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))
