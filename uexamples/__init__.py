"""uexamples: unlearnable examples for Hugging Face image datasets.

>>> import uexamples as ue
>>> {"sem", "em", "rem", "cuda"} <= set(ue.list_methods())   # plus any plugin methods
True
"""

__version__ = "0.1.0"

from .core import (  # noqa: E402
    ColumnError,
    ImageDecodeError,
    NotFittedError,
    Protector,
    get_method,
    list_methods,
)
from . import logging  # noqa: E402  (uexamples.logging: the library's logger and verbosity, as in transformers)
from .data import load_sample_dataset  # noqa: E402
from .evaluation import EvaluationReport, RetrievalReport, evaluate, evaluate_retrieval  # noqa: E402
from .hub import publish  # noqa: E402
from .methods import CUDAProtect, EMProtect, MEMProtect, REMProtect, SALMProtect, SEMProtect, T2UEProtect, UCProtect, captions_from_labels  # noqa: E402


def protector(method: str, **kwargs) -> Protector:
    """Build a protector by method name: ``ue.protector("sem", epsilon=8/255, seed=0)``."""
    return get_method(method)(**kwargs)


__all__ = [
    "__version__",
    "logging",
    "ColumnError",
    "ImageDecodeError",
    "NotFittedError",
    "Protector",
    "get_method",
    "list_methods",
    "load_sample_dataset",
    "evaluate",
    "EvaluationReport",
    "evaluate_retrieval",
    "RetrievalReport",
    "protector",
    "publish",
    "CUDAProtect",
    "UCProtect",
    "EMProtect",
    "REMProtect",
    "SEMProtect",
    "SALMProtect",
    "MEMProtect",
    "T2UEProtect",
    "captions_from_labels",
]
