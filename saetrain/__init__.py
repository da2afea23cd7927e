"""Stage 2: stream an activation store into one TopK SAE per layer."""

from typing import TYPE_CHECKING

from sae_core.lazy import lazy_exports

_EXPORTS = {"TrainConfig": ".config", "FitResult": ".trainer", "fit": ".trainer"}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = [
    "FitResult",
    "TrainConfig",
    "fit",
]

if TYPE_CHECKING:
    from .config import TrainConfig
    from .trainer import FitResult, fit
