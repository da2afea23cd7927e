"""Stage 1: run a language model once and cache many layers' activations in a Zarr v3 store."""

from .collect import CollectResult, DataExhausted, collect
from .config import CollectConfig

__all__ = ["CollectConfig", "CollectResult", "DataExhausted", "collect"]
