"""Core: the protector protocol, the batch a method sees, config options, image I/O, columns, the registry."""

from .additive import AdditiveConfig, AdditiveProtector
from .batch import ProtectBatch
from .columns import ColumnError, Columns, detect_columns
from .images import SUPPORTED_MODES, ImageDecodeError, NativeImage, bound_levels, storage_format
from .protector import NotFittedError, Protector, ProtectorConfig
from .options import option
from .registry import get_method, list_methods, register_method

__all__ = [
    "AdditiveConfig",
    "AdditiveProtector",
    "ProtectBatch",
    "option",
    "ColumnError",
    "Columns",
    "detect_columns",
    "SUPPORTED_MODES",
    "ImageDecodeError",
    "NativeImage",
    "bound_levels",
    "storage_format",
    "NotFittedError",
    "Protector",
    "ProtectorConfig",
    "get_method",
    "list_methods",
    "register_method",
]
