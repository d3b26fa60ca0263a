"""Find the image, label and text columns of a dataset from its features."""

from __future__ import annotations

from dataclasses import dataclass

import datasets

LABEL_NAMES = ("label", "labels", "fine_label", "coarse_label")
TEXT_NAMES = ("caption", "captions", "text", "sentences")


class ColumnError(ValueError):
    """A required column is missing or has the wrong type."""


@dataclass(frozen=True)
class Columns:
    image: str
    label: str | None
    text: str | None
    num_classes: int | None


def _is_image(feature) -> bool:
    return isinstance(feature, datasets.Image)


def _is_int(feature) -> bool:
    return isinstance(feature, datasets.ClassLabel) or (
        isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))
    )


def _is_text(feature) -> bool:
    if isinstance(feature, datasets.Value):
        return feature.dtype in ("string", "large_string")
    inner = getattr(feature, "feature", None)  # List / Sequence of strings
    return isinstance(inner, datasets.Value) and inner.dtype in ("string", "large_string")


def label_column_of(features: datasets.Features, label_column: str | None = None) -> str | None:
    """The class-label column: ``label_column`` (checked), else the first ``ClassLabel``, else an integer
    ``label``/``labels``/... column; None when there is none."""
    names = list(features)
    if label_column is not None:
        if label_column not in features:
            raise ColumnError(f"label column {label_column!r} not found; columns are {names}")
        if not _is_int(features[label_column]):
            raise ColumnError(f"label column {label_column!r} is {features[label_column]!r}, not integer class labels")
        return label_column
    found = next((n for n in names if isinstance(features[n], datasets.ClassLabel)), None)
    return found or next((n for n in LABEL_NAMES if n in features and _is_int(features[n])), None)


def detect_columns(
    features: datasets.Features,
    image_column: str | None = None,
    label_column: str | None = None,
    text_column: str | None = None,
    need_label: bool = False,
    need_text: bool = False,
    method: str = "this method",
) -> Columns:
    """Detect columns: the first ``Image`` column, a ClassLabel/integer label column, a caption column.

    Explicit names win; a named column that does not exist is an error that lists the columns.
    """
    names = list(features)
    if image_column is not None:
        if image_column not in features:
            raise ColumnError(f"image column {image_column!r} not found; columns are {names}")
        if not _is_image(features[image_column]):
            raise ColumnError(f"column {image_column!r} is {features[image_column]!r}, not an Image feature")
    else:
        image_column = next((n for n in names if _is_image(features[n])), None)
        if image_column is None:
            raise ColumnError(
                f"no image column: none of the columns {names} has the datasets.Image feature "
                "(cast one with ds.cast_column(name, datasets.Image()) or pass image_column=)"
            )

    label_column = label_column_of(features, label_column)
    if need_label and label_column is None:
        from .registry import list_methods, methods_without

        hint = ""
        if method.lower() in list_methods():  # a protection method: point to those that need no labels
            free = methods_without("labels")
            hint = ", or use a method that needs no labels: " + (
                ", ".join(free) if free else "none is installed yet (UC and T2UE are on the roadmap)"
            )
        raise ColumnError(
            f"{method} needs class labels, but no ClassLabel or integer 'label'/'labels' column was found "
            f"among {names}. Name one with label_column=...{hint}"
        )

    if text_column is not None:
        if text_column not in features:
            raise ColumnError(f"text column {text_column!r} not found; columns are {names}")
    else:
        text_column = next((n for n in TEXT_NAMES if n in features and _is_text(features[n])), None)
    if text_column is not None and not _is_text(features[text_column]):
        raise ColumnError(f"caption column {text_column!r} is {features[text_column]!r}, not strings or lists of strings")
    if need_text and text_column is None:
        raise ColumnError(
            f"{method} needs captions, but no string or list-of-strings column named {list(TEXT_NAMES)} was found "
            f"among {names}. Name one with text_column=..."
        )

    num_classes = None
    if label_column is not None and isinstance(features[label_column], datasets.ClassLabel):
        num_classes = features[label_column].num_classes
    return Columns(image=image_column, label=label_column, text=text_column, num_classes=num_classes)
