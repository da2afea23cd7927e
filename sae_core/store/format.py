"""The store format shared by `actcache` (writer) and `saetrain` (reader). See docs/store-format.md.

    acts.zarr/
      zarr.json                      group; attributes["actcache"] = metadata below
      tokens/                        (num_tokens,) int32 token ids
      layers/<name>/                 (num_tokens, d) activations; bf16 kept as uint16 bits
      manifest.json                  committed shards, checksums, running stats (atomic replace)
      manifest.rank<R>.json          the same, per rank, while a torchrun collection runs
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import UserError

if TYPE_CHECKING:  # torch is imported where tensors are made: the CLIs' --help needs none of it
    import torch

FORMAT_NAME = "actcache-store"
FORMAT_VERSION = 1
ATTRS_KEY = "actcache"
# Written into zarr.json first, while the arrays are created; replaced by ATTRS_KEY once they all are.
CREATING_KEY = "actcache_creating"
LOCK_FILE = ".writer.lock"
LAYER_CONVENTION = "layer L = hidden_states[L], the residual stream entering block L (0 = embeddings)"
# Where a model's hidden_states hold block outputs only (Mamba, FalconMamba, RWKV: no embeddings entry).
LAYER_CONVENTION_OUTPUTS = "layer L = hidden_states[L], the output of block L (this model's hidden_states have no embeddings entry)"
# A store of --hookpoints: no layers, module outputs.
HOOKPOINT_CONVENTION = "hookpoints: each array is the output of the module it is named after, one row per token"

# Logical dtype -> (dtype stored in zarr, bytes per element). Zarr has no bfloat16.
STORAGE_DTYPES = {"bfloat16": "uint16", "float16": "float16", "float32": "float32"}

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


def torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of a logical dtype name (a key of STORAGE_DTYPES)."""
    import torch

    return getattr(torch, check_dtype(dtype))


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """A CPU tensor in the logical dtype -> the numpy array written to zarr."""
    import torch

    x = x.to(torch_dtype(dtype))
    if dtype == "bfloat16":
        return x.view(torch.int16).numpy().view(np.uint16)
    return x.numpy()


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    """The numpy array read from zarr -> a tensor in the logical dtype."""
    import torch

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


def store_state(path: Path) -> str:
    """What `path` is: "missing"; "empty" (a folder with nothing in it but perhaps a writer lock);
    "store" (an actcache store, its metadata written); "creating" (an actcache store whose creation
    was interrupted: nothing can be committed in it); "other" (anything else: never deleted)."""
    path = Path(path)
    if not path.exists():
        return "missing"
    if not path.is_dir():
        return "other"
    entries = {p.name for p in path.iterdir()}
    if entries <= {LOCK_FILE}:
        return "empty"
    try:
        root = json.loads((path / "zarr.json").read_text())
        attrs = root.get("attributes") or {}
        group = root.get("node_type") == "group"
    except (OSError, ValueError, AttributeError):
        return "other"
    if ATTRS_KEY in attrs:
        return "store"
    if CREATING_KEY in attrs:
        return "creating"
    # An older actcache wrote the attributes last, after the arrays: a group without attributes whose
    # creation was interrupted holds `layers/` and `tokens/`, or nothing but Zarr metadata (no data).
    if group and not attrs and ((path / "layers").is_dir() and (path / "tokens").is_dir() or _metadata_only(path)):
        return "creating"
    return "other"


def _metadata_only(path: Path) -> bool:
    for _, _, files in os.walk(path):
        if any(f not in ("zarr.json", LOCK_FILE) for f in files):
            return False
    return True
