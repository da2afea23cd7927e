"""Stage 2: stream an activation store into one TopK SAE per layer."""

from .config import TrainConfig
from .trainer import FitResult, fit

__all__ = ["FitResult", "TrainConfig", "fit"]
