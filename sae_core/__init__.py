"""What both stages share: the TopK SAE, its checkpoint and Hub I/O, and language-model loading."""

from .config import SaeConfig
from .errors import UserError
from .layers import format_layers, parse_layers
from .models import LoadedModel, d_model, decoder_blocks, load_model, num_layers
from .sae import EncoderOutput, ForwardOutput, Sae

__version__ = "0.1.0"

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
