"""Core: the protector protocol, image I/O, column detection and the method registry."""

from .columns import ColumnError, Columns, detect_columns
from .images import SUPPORTED_MODES, ImageDecodeError, NativeImage, bound_levels, storage_format
from .protector import NotFittedError, Protector, ProtectorConfig
from .registry import get_method, list_methods, register_method

__all__ = [
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
