"""Evaluation: victims trained from scratch under countermeasures, image-quality metrics, reports."""

from .countermeasures import COUNTERMEASURES, Countermeasure, CountermeasureError, parse_countermeasure, parse_countermeasures
from .evaluate import RELABELINGS, EvaluationError, EvaluationReport, NamedRelabel, evaluate
from .metrics import dataset_quality, image_quality, psnr, ssim
from .victim import VictimResult, build_victim, dataset_to_tensors, train_victim

__all__ = [
    "COUNTERMEASURES",
    "Countermeasure",
    "CountermeasureError",
    "parse_countermeasure",
    "parse_countermeasures",
    "EvaluationError",
    "EvaluationReport",
    "NamedRelabel",
    "RELABELINGS",
    "evaluate",
    "dataset_quality",
    "image_quality",
    "psnr",
    "ssim",
    "VictimResult",
    "build_victim",
    "dataset_to_tensors",
    "train_victim",
]
