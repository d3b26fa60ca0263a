"""Progress bars that follow ``datasets``' global switch, as every bar of the HF libraries does.

>>> import datasets
>>> datasets.disable_progress_bars()
>>> progress_bar(range(3), progress=True).disable
True
>>> datasets.enable_progress_bars()
"""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm


def progress_bar(iterable: Any = None, *, progress: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar, shown when the caller asks for it (``progress``) and ``datasets``' bars are on
    (``datasets.disable_progress_bars()`` or ``HF_DATASETS_DISABLE_PROGRESS_BARS=1`` turn every one off)."""
    import datasets

    return tqdm(iterable, disable=not progress or datasets.are_progress_bars_disabled(), **kwargs)


__all__ = ["progress_bar"]
