"""Stage 1: run a language model once and cache many layers' activations in a Zarr v3 store."""

from typing import TYPE_CHECKING

from sae_core.lazy import lazy_exports

_EXPORTS = {"CollectResult": ".collection", "DataExhausted": ".collection", "collect": ".collection", "CollectConfig": ".config"}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = [
    "CollectConfig",
    "CollectResult",
    "DataExhausted",
    "collect",
]

if TYPE_CHECKING:
    from .collection import CollectResult, DataExhausted, collect
    from .config import CollectConfig
