"""The store format shared by `actcache` (writer) and `saetrain` (reader). See docs/store-format.md.

    acts.zarr/
      zarr.json                      group; attributes["actcache"] = metadata below
      tokens/                        (num_tokens,) int32 token ids
      layers/<name>/                 (num_tokens, d) activations; bf16 kept as uint16 bits
      manifest.json                  committed shards, checksums, running stats (atomic replace)
      manifest.rank<R>.json          the same, per rank, while a torchrun collection runs
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError

FORMAT_NAME = "actcache-store"
FORMAT_VERSION = 1
ATTRS_KEY = "actcache"
LAYER_CONVENTION = "layer L = hidden_states[L], the residual stream entering block L (0 = embeddings)"

# Logical dtype -> (dtype stored in zarr, bytes per element). Zarr has no bfloat16.
STORAGE_DTYPES = {"bfloat16": "uint16", "float16": "float16", "float32": "float32"}
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

CODECS = ("zstd", "blosc-zstd", "blosc-lz4", "gzip", "none")
DEFAULT_CODEC = "zstd"


def layer_key(layer: int) -> str:
    return f"layer_{layer}"


def array_path(name: str) -> str:
    return f"layers/{name}"


def shard_file(array: str, shard: int, ndim: int) -> str:
    """Path, relative to the store, of one shard file (zarr v3 default chunk keys)."""
    return f"{array}/c/{shard}" + "/0" * (ndim - 1)


def check_dtype(dtype: str) -> str:
    if dtype not in STORAGE_DTYPES:
        raise UserError(f"unknown storage dtype {dtype!r}; use bfloat16, float16 or float32")
    return dtype


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """A CPU tensor in the logical dtype -> the numpy array written to zarr."""
    x = x.to(TORCH_DTYPES[dtype])
    if dtype == "bfloat16":
        return x.view(torch.int16).numpy().view(np.uint16)
    return x.numpy()


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    """The numpy array read from zarr -> a tensor in the logical dtype."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if dtype == "bfloat16":
        return t.view(torch.bfloat16)  # same-size reinterpretation of the uint16 bits
    return t


def compressors(codec: str) -> list:
    from zarr.codecs import BloscCodec, Crc32cCodec, GzipCodec, ZstdCodec

    if codec not in CODECS:
        raise UserError(f"unknown codec {codec!r}; use one of {', '.join(CODECS)}")
    chosen = {
        "zstd": [ZstdCodec(level=1)],
        "blosc-zstd": [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")],
        "blosc-lz4": [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
        "gzip": [GzipCodec(level=1)],
        "none": [],
    }[codec]
    # A CRC32C per chunk: a corrupted chunk fails loudly when read, not silently.
    return [*chosen, Crc32cCodec()]
