"""The protector protocol: a callable for ``ds.map(protector, batched=True)``.

A protector takes a batched dict of columns and returns it with the image column replaced by
protected images (same size and mode, stored losslessly); every other column passes through.
Surrogate-based methods are fitted first with :meth:`Protector.fit`. A fitted protector is saved as a
JSON config plus safetensors (no pickle) and pickles as config plus fitted arrays only, so
``datasets`` fingerprints it by what it *is*, not by the identity of a model object.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, ClassVar, Sequence

import datasets
import numpy as np
import torch

from .. import __version__
from ..logging import get_logger
from .batch import ProtectBatch, at_row, caption_of, sample_key  # noqa: F401  (sample_key: importable from here as before)
from .columns import TEXT_NAMES, ColumnError, Columns, detect_columns
from .images import NativeImage, bound_levels, load_pil, restore_cell
from .options import check_choices, check_int, option, secret_fields
from .registry import get_method, methods_without

logger = get_logger(__name__)

CONFIG_NAME = "protector_config.json"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # what from_pretrained reads as a Hub repo id when no such folder exists
WEIGHTS_NAME = "protector.safetensors"


class NotFittedError(RuntimeError):
    """A surrogate-based protector was called before ``fit``."""


@dataclasses.dataclass
class ProtectorConfig:
    """Settings shared by every method (each field documents itself: see ``core.options``)."""

    epsilon: float | None = option(8 / 255, "L-inf bound as a fraction of the pixel range (8/255 is the field's standard)")
    seed: int = option(0, "seed of everything random: the same seed gives the same bytes")
    image_column: str | None = option(None, "image column (default: the first Image feature)")
    label_column: str | None = option(None, "class label column (default: a ClassLabel, or an integer 'label'/'labels')")
    text_column: str | None = option(None, "caption column, strings or lists of strings (default: 'caption'/'text'/...)")
    batch_size: int = option(128, "images processed together inside one map batch (at most)")
    batch_pixels: int = option(2**22, "pixels processed together (at most; one larger image goes alone): bounds "
                               "memory on large photos, whatever the number of rows")  # fmt: skip
    device: str | None = option(None, "torch device: cpu, cuda, cuda:1, ... (default: CUDA when available)")
    preset: str = option("fast", "a named set of defaults of the method (see its PRESETS)")


def check_epsilon(epsilon: Any) -> float:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float, np.floating)):
        raise TypeError(f"epsilon must be a number in (0, 1], got {epsilon!r}")
    epsilon = float(epsilon)
    if not (0.0 < epsilon <= 1.0):
        raise ValueError(f"epsilon must be in (0, 1] (a fraction of the pixel range, e.g. 8/255), got {epsilon}")
    return epsilon


def secret_fingerprint(value: Any) -> str:
    """A salted, slow (PBKDF2) hash of a secret: lets a saved protector check it without storing it."""
    digest = hashlib.pbkdf2_hmac("sha256", str(value).encode(), b"uexamples-cuda-key-v1", 200_000)
    return digest[:12].hex()


_IMPORT_PID = os.getpid()


def _single_thread_in_worker() -> None:
    """In a worker process (``map(num_proc=...)``), run torch on one thread.

    A worker forked after the parent used torch's OpenMP pool deadlocks on its first parallel
    region (libgomp is not fork-safe); one thread per worker avoids it, and one process per core
    is what ``num_proc`` is for.
    """
    if os.getpid() != _IMPORT_PID:  # forked after import: datasets' multiprocess pool
        torch.set_num_threads(1)


class Protector:
    """Base class of every protection method: the ``datasets.map`` protocol, fitting, saving, pickling.

    A method is one module with a subclass that sets:

    - ``method`` (its registered name), ``title``, ``summary``, ``paper`` and ``citation`` (BibTeX):
      what the CLI, the README table and the dataset card say about it;
    - ``config_class``: a dataclass derived from :class:`ProtectorConfig` whose fields carry their
      help (``core.options.option``), and ``PRESETS``: named overrides of those fields;
    - what it needs: ``needs_fit``, ``needs_labels``, ``needs_texts`` (checked against the dataset
      with errors that name the column or the row);
    - :meth:`protect_batch` (and, when it fits, :meth:`_fit`, :meth:`_fitted_arrays`,
      :meth:`_fitted_meta`, :meth:`_load_fitted`).

    Then it is decorated with ``@register_method`` and nothing else in the package needs to know it.
    """

    method: ClassVar[str] = "base"
    title: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    citation: ClassVar[str] = ""
    config_class: ClassVar[type] = ProtectorConfig
    needs_fit: ClassVar[bool] = False
    needs_labels: ClassVar[bool] = False
    needs_texts: ClassVar[bool] = False
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"fast": {}, "paper": {}}
    # Config fields a loaded protector may take at run time without changing what it computes.
    RUNTIME_OPTIONS: ClassVar[tuple[str, ...]] = ("device", "batch_size", "batch_pixels")
    # A config field that may be given a torch.nn.Module (a custom surrogate or encoder): the config keeps a
    # name for it, the module lives in ``self._module`` and must be passed again to ``from_pretrained``.
    MODULE_FIELD: ClassVar[str | None] = None

    def __init__(self, preset: str = "fast", **kwargs: Any) -> None:
        module = None
        if self.MODULE_FIELD is not None and self.MODULE_FIELD in kwargs:
            kwargs[self.MODULE_FIELD], module = self._module_as_config(kwargs[self.MODULE_FIELD])
        if preset not in self.PRESETS:
            raise ValueError(f"unknown preset {preset!r} for {self.method}; choose from {sorted(self.PRESETS)}")
        fields = {f.name for f in dataclasses.fields(self.config_class)}
        unknown = sorted(set(kwargs) - fields)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown option(s) {unknown}; valid options: {sorted(fields)}")
        values = {**self.PRESETS[preset], **kwargs, "preset": preset}
        self.config = self.config_class(**values)
        self.validate_config()
        self._secret_fingerprints = {
            name: secret_fingerprint(getattr(self.config, name))
            for name in self.secret_names() if getattr(self.config, name) is not None
        }  # fmt: skip
        self.fitted = False
        self.num_classes: int | None = None
        self.fitted_on: dict[str, Any] | None = None  # what fit saw: dataset name (when it has one), rows, fingerprint
        self._columns: Columns | None = None
        self._init_runtime()
        self._module = module

    def _init_runtime(self) -> None:
        """Attributes that live only in this process (models, tensors): never pickled, never saved."""
        self._runtime: dict[str, Any] = {}
        self._accelerator: Any = None  # set only during a data-parallel fit
        self._checkpoint: tuple[Any, int] | None = None  # (directory, every) only during a checkpointed fit
        self._module: Any = None  # the torch.nn.Module given for MODULE_FIELD, if any

    @staticmethod
    def _module_as_config(value: Any) -> tuple[Any, Any]:
        """(what the config keeps, the module or None) for a value given to ``MODULE_FIELD``."""
        return ("module", value) if isinstance(value, torch.nn.Module) else (value, None)

    def validate_config(self) -> None:
        """Check the config; run by the constructor *and* on every load (a saved config is input too)."""
        cfg = self.config
        if cfg.preset not in self.PRESETS:
            raise ValueError(f"unknown preset {cfg.preset!r} for {self.method}; choose from {sorted(self.PRESETS)}")
        if cfg.epsilon is not None:
            cfg.epsilon = check_epsilon(cfg.epsilon)
        if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, (int, np.integer)):
            raise TypeError(f"seed must be an integer, got {cfg.seed!r}")
        if not 0 <= cfg.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63) (what torch's generators take), got {cfg.seed}")
        check_int(cfg, "batch_size")
        check_int(cfg, "batch_pixels")
        check_choices(cfg)

    @classmethod
    def secret_names(cls) -> list[str]:
        return [f.name for f in secret_fields(cls.config_class)]

    # ------------------------------------------------------------------ public API
    def fit(
        self,
        dataset: datasets.Dataset,
        progress: bool = True,
        accelerator: Any = None,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 100,
        stream_sample: int = 10_000,
    ) -> "Protector":
        """Fit the protector on ``dataset`` (a ``datasets.Dataset``) and return ``self``.

        A streamed ``IterableDataset`` (``load_dataset(..., streaming=True)``) is fitted on a bounded, seeded
        sample of ``stream_sample`` rows (:meth:`stream_sample`; its size is logged and kept in ``fitted_on``).

        ``accelerator``: an ``accelerate.Accelerator``; with several processes, surrogate-based
        methods fit data-parallel (every process must call ``fit`` with the same dataset).
        ``checkpoint_dir``: surrogate-based methods save their fit there every ``checkpoint_every``
        steps and, called again after a kill, go on from the last checkpoint to the same result
        (``core.checkpoint``).
        """
        if isinstance(dataset, datasets.DatasetDict):  # fit on the training split only, as trainers do
            if "train" not in dataset:
                raise TypeError(f"fit got a DatasetDict without a 'train' split (splits: {list(dataset)}): pass the split "
                                "to fit on, e.g. ds['validation']")  # fmt: skip
            logger.info("fitting on the 'train' split of the DatasetDict (%d rows)", len(dataset["train"]))
            dataset = dataset["train"]
        if isinstance(dataset, datasets.IterableDatasetDict):
            dataset = dataset["train"] if "train" in dataset else dataset
        sampled = isinstance(dataset, datasets.IterableDataset)
        if sampled:
            dataset = self.stream_sample(dataset, stream_sample)
        if not isinstance(dataset, datasets.Dataset):
            raise TypeError(f"fit expects a datasets.Dataset, got {type(dataset).__name__} (pick a split: ds['train'])")
        if len(dataset) == 0:
            raise ValueError("cannot fit on an empty dataset (0 rows)")
        self._columns = self.columns_for(dataset.features)
        if self.needs_labels:
            self.num_classes = self._fit_num_classes(dataset, self._columns)
        self._accelerator = accelerator
        self._checkpoint = (checkpoint_dir, checkpoint_every) if checkpoint_dir is not None else None
        started = time.time()
        try:
            self._fit(dataset, self._columns, progress=progress)
        finally:
            self._accelerator = None
            self._checkpoint = None
        self.fitted = True
        self.fitted_on = {"dataset": dataset.info.dataset_name or None, "rows": len(dataset),
                          "fingerprint": getattr(dataset, "_fingerprint", None)}  # fmt: skip
        if sampled:
            self.fitted_on["sampled_from_stream"] = True
        stats = getattr(self, "fit_stats", None) or {}
        done = f"; {stats['steps']} steps" if stats.get("steps") is not None else ""
        if stats.get("train_accuracy") is not None:
            done += f", surrogate accuracy on noisy data {stats['train_accuracy']:.3f}"
        rules = "".join(f"; {name}: {decision}" for name, decision in self.rules.items())
        logger.info("%s fitted on %d images in %.1f s%s%s", self.method.upper(), len(dataset), time.time() - started,
                    done, rules)  # fmt: skip
        return self

    def stream_sample(self, stream: datasets.IterableDataset, rows: int = 10_000, buffer: int = 10_000) -> datasets.Dataset:
        """The first ``rows`` rows of ``stream`` after a shuffle buffer of ``buffer`` rows seeded by the config's
        seed, in memory: what a fit on a stream sees (the same seed, the same sample)."""
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(f"stream_sample must be a positive number of rows, got {rows!r}")
        sample = stream.shuffle(seed=int(self.config.seed) % 2**32, buffer_size=buffer).take(rows)
        ds = datasets.Dataset.from_list(list(sample), features=stream.features)  # in memory: no cache to go stale
        logger.info("fitting on a sample of %d rows of the stream (shuffle buffer %d, seed %d)", len(ds), buffer, self.config.seed)
        return ds

    def _fit_num_classes(self, dataset: datasets.Dataset, columns: Columns) -> int:
        """The number of classes, after checking every label (integers, >= 0, below a ClassLabel's count)."""
        labels = np.asarray(dataset[columns.label])
        if labels.dtype.kind not in "iu":
            raise ValueError(f"label column {columns.label!r} holds {labels.dtype} values, not integer class labels")
        bad = np.flatnonzero((labels < 0) | ((labels >= columns.num_classes) if columns.num_classes else False))
        if bad.size == len(labels):
            raise ValueError(f"no row of {columns.label!r} has a class label (all are like {labels[0]}: unlabelled); "
                             f"{self.method.upper()} needs labels: use a method that needs none ({label_free_methods()})")  # fmt: skip
        if bad.size:
            raise ValueError(f"label {labels[bad[0]]} at row {bad[0]} is not a class ({bad.size} such rows; "
                             f"unlabelled rows are -1): drop them before protecting with {self.method.upper()}")  # fmt: skip
        return columns.num_classes if columns.num_classes is not None else int(labels.max()) + 1

    def columns_for(self, features: datasets.Features) -> Columns:
        """The dataset's image/label/caption columns; an error when one this method needs is missing."""
        cfg = self.config
        return detect_columns(
            features, cfg.image_column, cfg.label_column, cfg.text_column,
            need_label=self.needs_labels, need_text=self.needs_texts, method=self.method.upper(),
        )  # fmt: skip

    def require_fitted(self, before: str) -> None:
        """A ``NotFittedError`` when this method needs a fit that has not happened (``before``: what needs it)."""
        if self.needs_fit and not self.fitted:
            raise NotFittedError(f"{type(self).__name__} must be fitted before {before}: call protector.fit(train_dataset) "
                                 "first (or load a fitted one with from_pretrained)")  # fmt: skip

    def __call__(self, batch: dict[str, list], indices: Sequence[int] | None = None) -> dict[str, list]:
        """Protect one batch from ``datasets.map(..., batched=True)`` (``with_indices=True`` names rows in errors)."""
        self.require_fitted("it protects images")
        image_col, label_col, text_col = self._batch_columns(batch)
        cells = batch[image_col]
        if not isinstance(cells, (list, tuple)):  # one row: ds.map(protector) without batched=True
            raise TypeError(f"{type(self).__name__} protects batches: use ds.map(protector, batched=True) "
                            f"(it got one row, whose {image_col!r} is a {type(cells).__name__})")  # fmt: skip
        if len(cells) == 0:
            return batch
        rows = list(indices) if indices is not None else [None] * len(cells)
        labels = self._read_labels(batch, label_col, rows)
        texts = [caption_of(v, r) for v, r in zip(batch[text_col], rows)] if text_col is not None else None
        out_cells: list[Any] = [None] * len(cells)
        out_texts: list[Any] | None = None  # captions a method rewrote (MEM's text triggers); else untouched
        cfg = self.config
        chunk: list[int] = []
        natives: dict[int, NativeImage] = {}
        pixels = 0

        def flush() -> None:
            nonlocal out_texts
            part = ProtectBatch(
                images=[natives[i] for i in chunk],
                labels=None if labels is None else [labels[i] for i in chunk],
                texts=None if texts is None else [texts[i] for i in chunk],
                rows=[rows[i] for i in chunk],
                seed=cfg.seed,
            )
            for i, color in zip(chunk, self.protect_batch(part)):
                nat = natives.pop(i)
                out_cells[i] = restore_cell(cells[i], nat.to_pil(color, self.bound_for(nat)))
            changed = self.changed_captions(part)
            if changed is not None:
                out_texts = out_texts or list(batch[text_col])
                for i, caption in zip(chunk, changed):
                    out_texts[i] = caption
            chunk.clear()

        # images are decoded one chunk at a time: at most batch_size rows and batch_pixels pixels in memory
        for i, (cell, row) in enumerate(zip(cells, rows)):
            nat = NativeImage.from_pil(load_pil(cell, row=row), row=row)
            size = nat.size[0] * nat.size[1]
            if chunk and (len(chunk) >= cfg.batch_size or pixels + size > cfg.batch_pixels):
                flush()
                pixels = 0
            natives[i] = nat
            chunk.append(i)
            pixels += size
        flush()
        out = dict(batch)
        out[image_col] = out_cells
        if out_texts is not None:
            out[text_col] = out_texts
        return out

    def apply(self, dataset: datasets.Dataset | datasets.DatasetDict, splits: Sequence[str] | None = None,
              **map_kwargs: Any) -> datasets.Dataset | datasets.DatasetDict:  # fmt: skip
        """``dataset.map(self, batched=True)`` that names the row of a bad image in its error.

        The image column is read as raw bytes so that a corrupt image is reported by row, then cast back.
        A ``DatasetDict`` gives a ``DatasetDict`` of the protected ``splits`` (default: every split; a
        published test split is as exposed as the training split). Fit on the training split first:
        ``protector.fit(dd)`` does that.
        """
        if isinstance(dataset, (datasets.IterableDataset, datasets.IterableDatasetDict)):
            # datasets cannot know what a map function returns on a stream: give it the features, or the
            # Image feature is lost (the rows come back as bare PIL images with features None)
            if isinstance(dataset, datasets.IterableDatasetDict):
                names = list(dataset) if splits is None else list(splits)
                return datasets.IterableDatasetDict({s: self.apply(dataset[s], **map_kwargs) for s in names})
            self.columns_for(dataset.features)  # column errors now, not at the first row read
            map_kwargs.setdefault("batch_size", 64)
            return dataset.map(self, batched=True, features=dataset.features, **map_kwargs)
        if isinstance(dataset, datasets.DatasetDict):
            names = list(dataset) if splits is None else list(splits)
            missing = [s for s in names if s not in dataset]
            if missing:
                raise KeyError(f"split(s) {missing} not in the DatasetDict (splits: {list(dataset)})")
            return datasets.DatasetDict({s: self.apply(dataset[s], **map_kwargs) for s in names})
        if splits is not None:
            raise TypeError("splits= is for a DatasetDict; this is one split")
        cols = self.columns_for(dataset.features)
        raw = dataset.cast_column(cols.image, datasets.Image(decode=False))
        if map_kwargs.get("batch_size") is None:
            map_kwargs["batch_size"] = self.map_batch_size(raw, cols.image)
        map_kwargs.setdefault("batched", True)
        map_kwargs.setdefault("desc", f"Protecting ({self.method})")
        out = raw.map(self, with_indices=True, **map_kwargs)
        return out.cast_column(cols.image, dataset.features[cols.image])

    def map_batch_size(self, raw: datasets.Dataset, image_column: str, peek: int = 32) -> int:
        """Rows per ``datasets.map`` batch: the output rows of a batch stay in memory until ``datasets``
        writes them, so large photos get small batches. From the image sizes of the first rows (headers
        only); a multiple of ``batch_size`` so that the chunks a method sees do not depend on it.
        """
        import io

        import PIL.Image

        sizes = []
        for cell in raw.select(range(min(peek, len(raw))))[image_column]:
            try:
                src = io.BytesIO(cell["bytes"]) if cell.get("bytes") is not None else cell["path"]
                with PIL.Image.open(src) as img:  # reads the header, not the pixels
                    sizes.append(img.size[0] * img.size[1])
            except Exception:  # a bad image is reported by the map itself, with its row
                continue
        mean = max(1.0, float(np.mean(sizes))) if sizes else 1024.0
        rows = int(min(1000, max(1, 8 * self.config.batch_pixels // mean)))
        bs = self.config.batch_size
        return rows - rows % bs if rows >= bs else rows

    def bound_for(self, native: NativeImage) -> int | None:
        eps = self.config.epsilon
        return None if eps is None else bound_levels(eps, native.maxval)

    @property
    def rules(self) -> dict[str, str]:
        """What the preset's data-dependent rules decided at fit (e.g. the working resolution and the number
        of fit steps of the min-min family), in words; saved with the protector and written into the card."""
        return dict(self._runtime.get("rules") or {})

    def _set_rule(self, name: str, decision: str) -> None:
        self._runtime.setdefault("rules", {})[name] = decision

    @classmethod
    def card_notes(cls, config: dict[str, Any]) -> list[str]:
        """Lines the dataset card adds under "What was done" for this method (``config``: the public config)."""
        return []

    @classmethod
    def rewrites_captions(cls, config: dict[str, Any]) -> bool:
        """Whether this method, with this (public) config, changes the captions (the card says so)."""
        return False

    def changed_captions(self, batch: ProtectBatch) -> list[Any] | None:
        """The captions of ``batch`` as this method rewrites them (same shape: a string or a list per row),
        called after :meth:`protect_batch`; None (the default): captions pass through untouched."""
        return None

    # ------------------------------------------------------------------ to implement
    def protect_batch(self, batch: ProtectBatch) -> list[np.ndarray]:
        """Return the protected colour array (same shape as ``image.color``) of each image of ``batch``."""
        raise NotImplementedError

    def _fit(self, dataset: datasets.Dataset, columns: Columns, progress: bool) -> None:
        """Method-specific fitting; the default (model-free methods) does nothing."""

    def _fitted_arrays(self) -> dict[str, np.ndarray]:
        """Arrays of the fitted state (saved as safetensors, part of the fingerprint)."""
        return {}

    def _saved_arrays(self) -> dict[str, np.ndarray]:
        """Arrays written by :meth:`save_pretrained` (default: all fitted arrays; CUDA writes none)."""
        return self._fitted_arrays()

    def _fitted_meta(self) -> dict[str, Any]:
        """JSON-able fitted state besides arrays (e.g. a surrogate's description)."""
        return {}

    def _load_fitted(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`_fitted_meta` and :meth:`_fitted_arrays` returned."""

    def _accept_runtime_kwargs(self, kwargs: dict[str, Any]) -> None:
        """Take the ``from_pretrained`` arguments a method understands (pop them); the rest is an error."""
        if self.MODULE_FIELD is not None and self.MODULE_FIELD in kwargs:
            module = kwargs.pop(self.MODULE_FIELD)
            if module is not None and not isinstance(module, torch.nn.Module):
                raise TypeError(f"from_pretrained({self.MODULE_FIELD}=...) takes the torch.nn.Module the protector was "
                                f"fitted with, got {module!r}")  # fmt: skip
            self._module = module
        if kwargs:
            raise TypeError(f"unexpected argument(s) {sorted(kwargs)} for {type(self).__name__}.from_pretrained")

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        if self.config.device:
            return torch.device(self.config.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _batch_columns(self, batch: dict[str, list]) -> tuple[str, str | None, str | None]:
        """The image, label and caption columns of a batch (label/caption None when absent)."""
        cols = self._columns
        image_col = self.config.image_column or (cols.image if cols else None)
        label_col = self.config.label_column or (cols.label if cols else None)
        text_col = self.config.text_column or (cols.text if cols else None)
        if image_col is None:
            image_col = next((k for k in ("image", "img", "pixel_values") if k in batch), None)
        if image_col is None or image_col not in batch:
            raise ColumnError(f"no image column in the batch (columns: {list(batch)}); pass image_column=")
        label_col = self._optional_column(batch, label_col, ("label", "labels"), self.needs_labels,
                                          f"class labels but the batch has no label column (columns: {list(batch)}); "
                                          f"pass label_column=, or use a method that needs none ({label_free_methods()})")  # fmt: skip
        text_col = self._optional_column(batch, text_col, TEXT_NAMES, self.needs_texts,
                                         f"captions but the batch has no caption column (columns: {list(batch)}); "
                                         "pass text_column=")  # fmt: skip
        return image_col, label_col, text_col

    def _optional_column(self, batch: dict[str, list], name: str | None, fallbacks: Sequence[str], needed: bool,
                         missing: str) -> str | None:  # fmt: skip
        """A label or caption column of the batch: the named one, else a usual name; an error if needed and absent."""
        if name is None:
            name = next((k for k in fallbacks if k in batch), None)
        if name is not None and name not in batch:
            name = None
        if needed and name is None:
            raise ColumnError(f"{self.method.upper()} needs {missing}")
        return name

    def _read_labels(self, batch: dict[str, list], label_col: str | None, rows: list) -> list[int] | None:
        """Integer labels when the batch has them; checked (and required) only if the method needs them."""
        if label_col is None:
            return None
        values = batch[label_col]
        integer = [not isinstance(v, bool) and isinstance(v, (int, np.integer)) for v in values]
        if not self.needs_labels:  # informative only: never truncated (1.9 is not class 1), never an error
            return [int(v) for v in values] if all(integer) else None
        labels = []
        for v, ok, row in zip(values, integer, rows):
            if not ok:
                raise ValueError(f"label {v!r}{at_row(row)} is not an integer class label")
            labels.append(int(v))
        self._check_labels(labels, rows)
        return labels

    def _check_labels(self, labels: list[int], rows: list) -> None:
        n = self.num_classes
        for lab, row in zip(labels, rows):
            if lab < 0 or (n is not None and lab >= n):
                raise ValueError(f"label {lab}{at_row(row)} is outside [0, {n}) (the classes seen at fit)")

    def public_config(self) -> dict[str, Any]:
        """The config as JSON-able dict, secrets removed."""
        cfg = dataclasses.asdict(self.config)
        for name in self.secret_names():
            cfg.pop(name, None)
        return cfg

    def _state(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "config": self.public_config(),
            "secret_fingerprints": dict(sorted(self._secret_fingerprints.items())),
            "fitted": self.fitted,
            "num_classes": self.num_classes,
            "fitted_meta": self._fitted_meta() if self.fitted else {},
            "columns": dataclasses.asdict(self._columns) if self._columns else None,
            "fitted_on": self.fitted_on,
        }

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={v!r}" for k, v in self.public_config().items())
        return f"{type(self).__name__}({cfg}, fitted={self.fitted})"

    # ------------------------------------------------------------------ restore (pickling and loading)
    def _restore(self, state: dict[str, Any], arrays: dict[str, np.ndarray], runtime: dict[str, Any],
                 secrets_required: bool) -> None:  # fmt: skip
        """The one way back from a saved or pickled state: config, secrets, fitted state.

        ``runtime``: secrets (never saved) and run-time options (``device``, ``batch_size``; a method may
        take more, such as a custom surrogate module). ``secrets_required``: loading from disk needs the
        secrets again (a pickled protector in a worker has its fitted arrays and needs none).
        """
        runtime = dict(runtime)
        config = dict(state["config"])
        fingerprints = dict(state.get("secret_fingerprints") or {})
        if "key_fingerprint" in config:  # written by uexamples before the protocol rework (CUDA)
            fingerprints.setdefault("key", config.pop("key_fingerprint"))
        for name in self.RUNTIME_OPTIONS:
            if name in runtime:
                config[name] = runtime.pop(name)
        for name in self.secret_names():
            value = runtime.pop(name, None)
            if value is None:
                if secrets_required and fingerprints.get(name):
                    raise ValueError(
                        f"a saved {self.method.upper()} protector does not contain its {name}: "
                        f"from_pretrained(path, {name}=...)"
                    )
                continue
            if fingerprints.get(name) and secret_fingerprint(value) != fingerprints[name]:
                raise ValueError(f"wrong {name}: it does not match the fingerprint this protector was saved with")
            config[name] = value
        fields = {f.name for f in dataclasses.fields(self.config_class)}
        unknown = sorted(set(config) - fields)
        if unknown:
            raise ValueError(f"saved config of {self.method} has unknown field(s) {unknown}")
        self.config = self.config_class(**config)
        self.validate_config()
        self._secret_fingerprints = fingerprints
        self.fitted = bool(state["fitted"])
        self.num_classes = state["num_classes"]
        self.fitted_on = state.get("fitted_on")  # absent in protectors saved before uexamples recorded it
        self._columns = Columns(**state["columns"]) if state.get("columns") else None
        self._init_runtime()
        self._accept_runtime_kwargs(runtime)
        if self.fitted:
            for name, value in arrays.items():
                value = np.asarray(value)
                if value.dtype.kind == "f" and not np.isfinite(value).all():
                    raise ValueError(f"the fitted array {name!r} holds NaN or infinite values: the protector is damaged")
            self._load_fitted(state["fitted_meta"], arrays)

    def __getstate__(self) -> dict[str, Any]:
        # Only config and fitted arrays: stable across processes, cheap to hash, no live model object.
        # Secrets (the CUDA key) are not in it: workers get the derived arrays (the filters) instead.
        state = self._state()
        arrays = self._fitted_arrays() if self.fitted else {}
        state["arrays"] = {k: arrays[k] for k in sorted(arrays)}  # canonical order, as safetensors stores it
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        _single_thread_in_worker()
        self._restore(state, state["arrays"], {}, secrets_required=False)

    @property
    def fingerprint(self) -> str:
        """The hash ``datasets`` uses for this transform: depends only on config and fitted state."""
        from datasets.fingerprint import Hasher

        return Hasher.hash(self)

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Save config (JSON) and fitted arrays (safetensors). Secrets are never written."""
        from safetensors.numpy import save_file

        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        state = self._state()
        state["uexamples_version"] = __version__
        arrays = self._saved_arrays() if self.fitted else {}
        save_file({k: np.require(v, requirements="C") for k, v in arrays.items()}, str(path / WEIGHTS_NAME))
        state["integrity"] = _digest(state, (path / WEIGHTS_NAME).read_bytes())
        (path / CONFIG_NAME).write_text(json.dumps(state, indent=2, sort_keys=True))
        return path

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None,
                    commit_message: str | None = None, revision: str | None = None) -> str:  # fmt: skip
        """Upload this fitted protector (config, weights, a model card) to the Hub model repo ``repo_id``, as
        transformers models are pushed; load it anywhere with ``Protector.from_pretrained(repo_id)``.
        Secrets (the CUDA key) are never uploaded: the loader passes them again. Returns the commit URL."""
        self.require_fitted("it is pushed (an unfitted one protects nothing)")
        from ..hub import push_protector

        return push_protector(self, repo_id, private=private, token=token, commit_message=commit_message, revision=revision)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, revision: str | None = None,
                        token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
                        local_files_only: bool = False, **runtime_kwargs: Any) -> "Protector":  # fmt: skip
        """Load a protector saved with :meth:`save_pretrained` (a folder) or pushed with :meth:`push_to_hub`
        (a Hub model repo id; ``revision``, ``token``, ``cache_dir``, ``local_files_only`` and ``HF_HUB_OFFLINE``
        as in transformers).

        ``runtime_kwargs`` supply what is never saved (secrets such as the CUDA ``key``) or override
        run-time options (``device``, ``batch_size``). ``Protector.from_pretrained`` picks the saved
        method's class.
        """
        from safetensors.numpy import load_file

        path = protector_folder(name_or_path, revision, token, cache_dir, local_files_only)
        state = json.loads((path / CONFIG_NAME).read_text())
        klass = get_method(state["method"])
        if cls is not Protector and not issubclass(klass, cls):
            raise TypeError(f"{path} holds a {klass.__name__}, not a {cls.__name__}")
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} is missing: a saved protector is {CONFIG_NAME} and {WEIGHTS_NAME} together")
        expected = state.pop("integrity", None)  # absent in protectors saved before uexamples kept a digest
        if expected is not None and _digest(state, weights.read_bytes()) != expected:
            raise ValueError(
                f"{path} was modified after it was saved (its config or weights do not match the digest written "
                "with them): refusing to protect with it; save it again from the fitted protector"
            )
        arrays = load_file(str(weights)) if state["fitted"] else {}
        obj = klass.__new__(klass)
        obj._restore(state, arrays, runtime_kwargs, secrets_required=True)
        return obj


def protector_folder(name_or_path: str | os.PathLike, revision: str | None = None, token: str | bool | None = None,
                     cache_dir: str | os.PathLike | None = None, local_files_only: bool = False) -> Path:  # fmt: skip
    """The local folder holding a saved protector's config: ``name_or_path`` itself, or, for a Hub model repo
    id ("user/name") that is not a folder here, its copy in huggingface_hub's cache (downloaded if needed)."""
    path = Path(name_or_path)
    if not path.exists() and HUB_ID.fullmatch(str(name_or_path)):
        from ..hub import download_protector

        path = download_protector(str(name_or_path), revision, token, cache_dir, local_files_only)
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {name_or_path}: not a saved uexamples protector")
    return path


def _digest(state: dict[str, Any], weights: bytes) -> str:
    """sha256 of the saved config (canonical JSON, digest excluded) and the weights file: edits are detected."""
    h = hashlib.sha256(json.dumps({k: v for k, v in state.items() if k != "integrity"}, sort_keys=True).encode())
    h.update(weights)
    return h.hexdigest()


def label_free_methods() -> str:
    """The registered methods that need no labels, for error messages."""
    names = methods_without("labels")
    return ", ".join(names) if names else "none is installed yet; UC and T2UE are on the roadmap"
