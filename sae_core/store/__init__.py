"""The activation store: the contract between `actcache` (writes it) and `saetrain` (reads it)."""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_EXPORTS = {
    "CODECS": ".format",
    "DEFAULT_CODEC": ".format",
    "LAYER_CONVENTION": ".format",
    "LAYER_CONVENTION_OUTPUTS": ".format",
    "layer_key": ".format",
    "StoreLayout": ".layout",
    "plan_layout": ".layout",
    "ActivationStore": ".reader",
    "StoreCorruptError": ".reader",
    "open_store": ".reader",
    "RunningStats": ".stats",
    "verify_store": ".verify",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = [
    "ActivationStore",
    "CODECS",
    "DEFAULT_CODEC",
    "LAYER_CONVENTION",
    "LAYER_CONVENTION_OUTPUTS",
    "RunningStats",
    "StoreCorruptError",
    "StoreLayout",
    "layer_key",
    "open_store",
    "plan_layout",
    "verify_store",
]

if TYPE_CHECKING:
    from .format import CODECS, DEFAULT_CODEC, LAYER_CONVENTION, LAYER_CONVENTION_OUTPUTS, layer_key
    from .layout import StoreLayout, plan_layout
    from .reader import ActivationStore, StoreCorruptError, open_store
    from .stats import RunningStats
    from .verify import verify_store
