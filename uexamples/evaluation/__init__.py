"""Evaluation: victim training and image-quality metrics."""

from .metrics import image_quality, psnr, ssim
from .victim import VictimResult, dataset_to_tensors, train_victim

__all__ = ["image_quality", "psnr", "ssim", "VictimResult", "dataset_to_tensors", "train_victim"]
