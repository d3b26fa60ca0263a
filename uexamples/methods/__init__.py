"""One module per method; importing this package registers them all."""

from .cuda import CUDAProtect
from .em import EMProtect
from .mem import MEMProtect
from .minmin import MinMinConfig, MinMinProtector
from .rem import REMProtect
from .salm import SALMProtect
from .sem import SEMProtect
from .t2ue import T2UEProtect, captions_from_labels
from .uc import UCProtect

__all__ = ["CUDAProtect", "EMProtect", "MEMProtect", "MinMinConfig", "MinMinProtector", "REMProtect", "SALMProtect", "SEMProtect", "T2UEProtect", "UCProtect", "captions_from_labels"]
