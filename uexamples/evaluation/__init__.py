"""Evaluation: victims trained from scratch under countermeasures, image-quality metrics, reports."""

from .countermeasures import COUNTERMEASURES, Countermeasure, CountermeasureError, parse_countermeasure, parse_countermeasures
from .evaluate import RELABELINGS, EvaluationError, EvaluationReport, NamedRelabel, evaluate
from .metrics import balanced_accuracy, dataset_quality, image_quality, macro_auc, psnr, ssim
from .retrieval import RetrievalError, RetrievalReport, chance_levels, evaluate_retrieval, retrieval_metrics, train_retrieval_victim
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
    "balanced_accuracy",
    "dataset_quality",
    "macro_auc",
    "image_quality",
    "psnr",
    "ssim",
    "VictimResult",
    "build_victim",
    "dataset_to_tensors",
    "train_victim",
    "RetrievalError",
    "RetrievalReport",
    "chance_levels",
    "evaluate_retrieval",
    "retrieval_metrics",
    "train_retrieval_victim",
]
