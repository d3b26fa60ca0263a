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
import logging
import os
from pathlib import Path
from typing import Any, ClassVar, Sequence

import datasets
import numpy as np
import torch

from .. import __version__
from .columns import Columns, ColumnError, detect_columns
from .images import NativeImage, bound_levels, load_pil, restore_cell

logger = logging.getLogger("uexamples")

CONFIG_NAME = "protector_config.json"
WEIGHTS_NAME = "protector.safetensors"


class NotFittedError(RuntimeError):
    """A surrogate-based protector was called before ``fit``."""


@dataclasses.dataclass
class ProtectorConfig:
    """Settings shared by every method.

    epsilon: L-inf bound as a fraction of the dynamic range (8/255 is the field's standard).
    seed: makes everything reproducible; the same seed gives the same bytes.
    image_column / label_column: override the columns detected from the features.
    batch_size: images processed together inside one ``map`` batch.
    device: "cpu", "cuda", ...; default: CUDA when available.
    """

    epsilon: float | None = 8 / 255
    seed: int = 0
    image_column: str | None = None
    label_column: str | None = None
    batch_size: int = 128
    device: str | None = None
    preset: str = "fast"


def check_epsilon(epsilon: Any) -> float:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float, np.floating)):
        raise TypeError(f"epsilon must be a number in (0, 1], got {epsilon!r}")
    epsilon = float(epsilon)
    if not (0.0 < epsilon <= 1.0):
        raise ValueError(f"epsilon must be in (0, 1] (a fraction of the pixel range, e.g. 8/255), got {epsilon}")
    return epsilon


def sample_key(native: NativeImage, seed: int) -> int:
    """A 63-bit key from the image content and the seed: per-sample randomness that does not depend on
    the batch an image lands in, its position, or the number of processes."""
    h = hashlib.blake2b(digest_size=8)
    h.update(str(seed).encode())
    h.update(str(native.levels.shape).encode())
    h.update(np.ascontiguousarray(native.levels).tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


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
    """Base class of every protection method.

    Subclasses set ``method``, ``config_class``, ``PRESETS`` and implement :meth:`protect_colors`
    (and :meth:`_fit`, :meth:`_fitted_arrays`, :meth:`_load_fitted` when they need fitting).
    """

    method: ClassVar[str] = "base"
    config_class: ClassVar[type] = ProtectorConfig
    needs_fit: ClassVar[bool] = False
    needs_labels: ClassVar[bool] = False
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"fast": {}, "paper": {}}
    # Config fields that must never be written anywhere (saved config, logs, cards, fingerprints).
    SECRET_FIELDS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, preset: str = "fast", **kwargs: Any) -> None:
        if preset not in self.PRESETS:
            raise ValueError(f"unknown preset {preset!r} for {self.method}; choose from {sorted(self.PRESETS)}")
        fields = {f.name for f in dataclasses.fields(self.config_class)}
        unknown = sorted(set(kwargs) - fields)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown option(s) {unknown}; valid options: {sorted(fields)}")
        values = {**self.PRESETS[preset], **kwargs, "preset": preset}
        self.config = self.config_class(**values)
        if self.config.epsilon is not None:
            self.config.epsilon = check_epsilon(self.config.epsilon)
        self.fitted = False
        self.num_classes: int | None = None
        self._columns: Columns | None = None
        self._runtime: dict[str, Any] = {}  # models and tensors built lazily; never pickled
        self._accelerator: Any = None  # set only during a data-parallel fit
        self._checkpoint: tuple[Any, int] | None = None  # (directory, every) only during a checkpointed fit

    # ------------------------------------------------------------------ public API
    def fit(
        self,
        dataset: datasets.Dataset,
        progress: bool = True,
        accelerator: Any = None,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 100,
    ) -> "Protector":
        """Fit the protector on ``dataset`` (a ``datasets.Dataset``) and return ``self``.

        ``accelerator``: an ``accelerate.Accelerator``; with several processes, surrogate-based
        methods fit data-parallel (every process must call ``fit`` with the same dataset).
        ``checkpoint_dir``: surrogate-based methods save their fit there every ``checkpoint_every``
        steps and, called again after a kill, go on from the last checkpoint to the same result
        (``core.checkpoint``).
        """
        if not isinstance(dataset, datasets.Dataset):
            raise TypeError(f"fit expects a datasets.Dataset, got {type(dataset).__name__} (pick a split: ds['train'])")
        if len(dataset) == 0:
            raise ValueError("cannot fit on an empty dataset (0 rows)")
        self._columns = self.columns_for(dataset.features)
        if self._columns.num_classes is not None:
            self.num_classes = self._columns.num_classes
        elif self._columns.label is not None:
            labels = np.asarray(dataset[self._columns.label])
            self.num_classes = int(labels.max()) + 1
        self._accelerator = accelerator
        self._checkpoint = (checkpoint_dir, checkpoint_every) if checkpoint_dir is not None else None
        try:
            self._fit(dataset, self._columns, progress=progress)
        finally:
            self._accelerator = None
            self._checkpoint = None
        self.fitted = True
        return self

    def columns_for(self, features: datasets.Features) -> Columns:
        cfg = self.config
        return detect_columns(
            features, cfg.image_column, cfg.label_column, need_label=self.needs_labels, method=self.method.upper()
        )

    def __call__(self, batch: dict[str, list], indices: Sequence[int] | None = None) -> dict[str, list]:
        """Protect one batch from ``datasets.map(..., batched=True)`` (``with_indices=True`` names rows in errors)."""
        if self.needs_fit and not self.fitted:
            raise NotFittedError(
                f"{type(self).__name__} must be fitted before it protects images: "
                f"call protector.fit(train_dataset) first (or load a fitted one with from_pretrained)"
            )
        image_col, label_col = self._batch_columns(batch)
        cells = batch[image_col]
        if len(cells) == 0:
            return batch
        rows = list(indices) if indices is not None else [None] * len(cells)
        natives = [NativeImage.from_pil(load_pil(c, row=r), row=r) for c, r in zip(cells, rows)]
        labels = None
        if self.needs_labels:
            labels = [int(v) for v in batch[label_col]]
            self._check_labels(labels, rows)
        new_colors: list[np.ndarray] = []
        bs = self.config.batch_size
        for start in range(0, len(natives), bs):
            chunk = natives[start : start + bs]
            chunk_labels = labels[start : start + bs] if labels is not None else None
            new_colors.extend(self.protect_colors(chunk, chunk_labels))
        bound = self.bound_for
        out = dict(batch)
        out[image_col] = [
            restore_cell(cell, nat.to_pil(col, bound(nat))) for cell, nat, col in zip(cells, natives, new_colors)
        ]
        return out

    def apply(self, dataset: datasets.Dataset, **map_kwargs: Any) -> datasets.Dataset:
        """``dataset.map(self, batched=True)`` that names the row of a bad image in its error.

        The image column is read as raw bytes so that a corrupt image is reported by row, then cast back.
        """
        cols = self.columns_for(dataset.features)
        raw = dataset.cast_column(cols.image, datasets.Image(decode=False))
        map_kwargs.setdefault("batched", True)
        map_kwargs.setdefault("desc", f"Protecting ({self.method})")
        out = raw.map(self, with_indices=True, **map_kwargs)
        return out.cast_column(cols.image, dataset.features[cols.image])

    def bound_for(self, native: NativeImage) -> int | None:
        eps = self.config.epsilon
        return None if eps is None else bound_levels(eps, native.maxval)

    # ------------------------------------------------------------------ to implement
    def protect_colors(self, images: list[NativeImage], labels: list[int] | None) -> list[np.ndarray]:
        """Return the protected colour array (same shape as ``image.color``) of each image."""
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

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        if self.config.device:
            return torch.device(self.config.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _batch_columns(self, batch: dict[str, list]) -> tuple[str, str | None]:
        cols = self._columns
        image_col = self.config.image_column or (cols.image if cols else None)
        label_col = self.config.label_column or (cols.label if cols else None)
        if image_col is None:
            image_col = next((k for k in ("image", "img", "pixel_values") if k in batch), None)
        if image_col is None or image_col not in batch:
            raise ColumnError(f"no image column in the batch (columns: {list(batch)}); pass image_column=")
        if self.needs_labels:
            if label_col is None:
                label_col = next((k for k in ("label", "labels") if k in batch), None)
            if label_col is None or label_col not in batch:
                raise ColumnError(
                    f"{self.method.upper()} needs class labels but the batch has no label column "
                    f"(columns: {list(batch)}); pass label_column=, or use a label-agnostic method"
                )
        return image_col, label_col

    def _check_labels(self, labels: list[int], rows: list) -> None:
        n = self.num_classes
        for lab, row in zip(labels, rows):
            if lab < 0 or (n is not None and lab >= n):
                where = f" at row {row}" if row is not None else ""
                raise ValueError(f"label {lab}{where} is outside [0, {n}) (the classes seen at fit)")

    def public_config(self) -> dict[str, Any]:
        """The config as JSON-able dict, secrets removed."""
        cfg = dataclasses.asdict(self.config)
        for name in self.SECRET_FIELDS:
            cfg.pop(name, None)
        return cfg

    def _state(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "config": self.public_config(),
            "fitted": self.fitted,
            "num_classes": self.num_classes,
            "fitted_meta": self._fitted_meta() if self.fitted else {},
        }

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={v!r}" for k, v in self.public_config().items())
        return f"{type(self).__name__}({cfg}, fitted={self.fitted})"

    # ------------------------------------------------------------------ pickling and fingerprint
    def __getstate__(self) -> dict[str, Any]:
        # Only config and fitted arrays: stable across processes, cheap to hash, no live model object.
        # Secrets (the CUDA key) are not in it: workers get the derived arrays (the filters) instead.
        state = self._state()
        arrays = self._fitted_arrays() if self.fitted else {}
        state["arrays"] = {k: arrays[k] for k in sorted(arrays)}  # canonical order, as safetensors stores it
        state["columns"] = dataclasses.asdict(self._columns) if self._columns else None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        _single_thread_in_worker()
        self.config = self.config_class(**state["config"])
        self.fitted = state["fitted"]
        self.num_classes = state["num_classes"]
        self._columns = Columns(**state["columns"]) if state.get("columns") else None
        self._runtime = {}
        self._accelerator = None
        self._checkpoint = None
        if self.fitted:
            self._load_fitted(state["fitted_meta"], state["arrays"])

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
        state["columns"] = dataclasses.asdict(self._columns) if self._columns else None
        (path / CONFIG_NAME).write_text(json.dumps(state, indent=2, sort_keys=True))
        arrays = self._saved_arrays() if self.fitted else {}
        save_file({k: np.require(v, requirements="C") for k, v in arrays.items()}, str(path / WEIGHTS_NAME))
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **runtime_kwargs: Any) -> "Protector":
        """Load a protector saved with :meth:`save_pretrained`.

        ``runtime_kwargs`` supply what is never saved (the CUDA ``key``) or override run-time options
        (``device``, ``batch_size``). Calling ``Protector.from_pretrained`` picks the saved method's class.
        """
        from safetensors.numpy import load_file

        from .registry import get_method

        path = Path(directory)
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {path}: not a saved uexamples protector")
        state = json.loads((path / CONFIG_NAME).read_text())
        klass = get_method(state["method"])
        if cls is not Protector and not issubclass(klass, cls):
            raise TypeError(f"{path} holds a {klass.__name__}, not a {cls.__name__}")
        obj = klass.__new__(klass)
        config = dict(state["config"])
        for key in ("device", "batch_size"):
            if key in runtime_kwargs:
                config[key] = runtime_kwargs.pop(key)
        obj.config = klass.config_class(**config)
        obj.fitted = state["fitted"]
        obj.num_classes = state["num_classes"]
        obj._columns = Columns(**state["columns"]) if state.get("columns") else None
        obj._runtime = {}
        obj._accept_runtime_kwargs(runtime_kwargs, state)
        if obj.fitted:
            arrays = load_file(str(path / WEIGHTS_NAME)) if (path / WEIGHTS_NAME).is_file() else {}
            obj._load_fitted(state["fitted_meta"], arrays)
        return obj

    def _accept_runtime_kwargs(self, kwargs: dict[str, Any], state: dict[str, Any]) -> None:
        if kwargs:
            raise TypeError(f"unexpected argument(s) {sorted(kwargs)} for {type(self).__name__}.from_pretrained")
