"""The activation store: the contract between `actcache` (writes it) and `saetrain` (reads it)."""

from .format import CODECS, DEFAULT_CODEC, LAYER_CONVENTION, LAYER_CONVENTION_OUTPUTS, layer_key
from .layout import StoreLayout, plan_layout
from .reader import ActivationStore, StoreCorruptError, open_store
from .stats import RunningStats
from .verify import verify_store

__all__ = [
    "CODECS",
    "DEFAULT_CODEC",
    "LAYER_CONVENTION",
    "LAYER_CONVENTION_OUTPUTS",
    "ActivationStore",
    "RunningStats",
    "StoreCorruptError",
    "StoreLayout",
    "layer_key",
    "open_store",
    "plan_layout",
    "verify_store",
]
