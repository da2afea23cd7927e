"""What both stages share: the TopK SAE, its checkpoint and Hub I/O, and language-model loading."""

from typing import TYPE_CHECKING

from .errors import UserError
from .lazy import lazy_exports

__version__ = "0.1.0"

# Imported on first use (torch is slow to import; the CLIs' --help and usage errors need none of it).
_EXPORTS = {
    "SaeConfig": ".config",
    "format_layers": ".layers",
    "parse_layers": ".layers",
    "LoadedModel": ".models",
    "d_model": ".models",
    "decoder_blocks": ".models",
    "load_model": ".models",
    "num_layers": ".models",
    "EncoderOutput": ".sae",
    "ForwardOutput": ".sae",
    "Sae": ".sae",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = [
    "EncoderOutput",
    "ForwardOutput",
    "LoadedModel",
    "Sae",
    "SaeConfig",
    "UserError",
    "d_model",
    "decoder_blocks",
    "format_layers",
    "load_model",
    "num_layers",
    "parse_layers",
]

if TYPE_CHECKING:
    from .config import SaeConfig
    from .layers import format_layers, parse_layers
    from .models import LoadedModel, d_model, decoder_blocks, load_model, num_layers
    from .sae import EncoderOutput, ForwardOutput, Sae
