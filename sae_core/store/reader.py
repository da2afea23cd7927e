"""Reading a store: layers, committed tokens, token ranges and chunks as torch tensors."""

from __future__ import annotations

import numbers
import operator
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ..config import as_path
from ..errors import UserError
from .format import (
    ATTRS_KEY,
    FORMAT_NAME,
    FORMAT_VERSION,
    array_path,
    from_storage,
    layer_key,
    store_state,
    torch_dtype,
)
from .layout import StoreLayout
from .manifest import MANIFEST, Manifest, damaged_shards, manifest_files, read_manifests
from .stats import RunningStats

# How many chunks a read spanning several fetches at once.
READ_THREADS = 8

# What to do about a damaged committed shard: verify sets it aside, --resume re-collects it.
REPAIR_HINT = ("run `actcache verify --repair` on the store (it sets damaged shards aside), then the same "
               "`actcache collect` command with --resume to re-collect them")


class StoreCorruptError(UserError):
    """A chunk or shard of a store fails its checksum or cannot be decoded."""


class ActivationStore:
    """Read-only view of the committed part of a store written by `actcache collect`."""

    def __init__(self, path: str | Path):
        self.path = as_path(path)
        self._load()

    def _load(self) -> None:
        import zarr

        if not self.path.exists():
            raise UserError(f"store {self.path} does not exist; create it with `actcache collect --out {self.path}`")
        try:
            self.group = zarr.open_group(str(self.path), mode="r", zarr_format=3)
        except Exception as e:  # zarr raises several types for "not a group"
            raise UserError(f"{self.path} is not an actcache store ({type(e).__name__}); check the path") from None
        meta = self.group.attrs.get(ATTRS_KEY)
        if meta is None and store_state(self.path) == "creating":
            raise UserError(
                f"store {self.path} is incomplete: its creation was interrupted, nothing is committed; "
                f"collect it with the same `actcache collect` command and --resume (or --overwrite)"
            )
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise UserError(f"{self.path} is a Zarr group but not an actcache store; check the path")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise UserError(f"{self.path} was written by a newer actcache (format {meta['format_version']}); upgrade")
        try:
            for key, kind in (("layout", dict), ("dtype", str), ("arrays", dict), ("data", dict), ("model", dict)):
                if not isinstance(meta.get(key), kind) or not meta[key]:
                    raise ValueError(f"{key!r} is missing or not a {kind.__name__}")
            self.layout = StoreLayout(**meta["layout"])
        except (TypeError, ValueError) as e:
            raise UserError(
                f"store {self.path}: its metadata (zarr.json) is damaged ({e}); restore zarr.json from a copy, or "
                "collect the store again (--overwrite)"
            ) from None
        self.meta: dict = meta
        self.dtype_name: str = meta["dtype"]
        self._identity = self._root_identity()
        self._read_manifests()

    def _read_manifests(self) -> None:
        self.manifest: Manifest = read_manifests(self.path)
        self.__dict__.pop("_arrays", None)

    def _root_identity(self) -> tuple | None:
        """(inode, mtime) of the group's zarr.json: written once when the store is created, so a
        change means the store was collected again in its place (--overwrite)."""
        try:
            st = (self.path / "zarr.json").stat()
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns

    def refresh(self) -> None:
        """Re-read the store: its manifests (a collection may still be running) and, if it was
        collected again in its place since it was opened (--overwrite), its metadata and layout."""
        if self._root_identity() != self._identity:
            self._load()
        else:
            self._read_manifests()

    def check_manifest(self) -> None:
        """Refuse a store whose manifest files are all gone: `actcache collect` writes an empty one when it
        creates the store, so none means the record of what is committed was deleted."""
        files = 0 if manifest_files(self.path) else sum(1 for p in self.path.glob("**/c/**/*") if p.is_file())
        if files:  # (none: an older actcache's store interrupted before its first commit, which wrote none)
            raise UserError(f"store {self.path}: {MANIFEST} is missing, so none of its {files} shard file(s) counts "
                            "as committed; restore it from a copy or collect again with --overwrite")

    # ------------------------------------------------------------------------- what is in it
    @property
    def layers(self) -> list[str]:
        """Array names: `layer_L` in layer mode, hookpoint names in hookpoint mode."""
        return list(self.meta["arrays"])

    @property
    def layer_ids(self) -> list[int] | None:
        return self.meta.get("layers")

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype_name)

    def d(self, layer: int | str) -> int:
        return self.meta["arrays"][self.resolve(layer)]["d"]

    @property
    def committed_shards(self) -> list[int]:
        return sorted(self.manifest.shards)

    @property
    def num_tokens(self) -> int:
        """Tokens in committed shards."""
        return sum(r.tokens[1] - r.tokens[0] for r in self.manifest.shards.values())

    @property
    def complete(self) -> bool:
        return len(self.manifest.shards) == self.layout.num_shards

    @property
    def committed_prefix(self) -> int:
        """Tokens before the first shard that is not committed (all of them once the store is complete)."""
        return self.committed_end(0)

    def committed_end(self, start: int) -> int:
        """Where the committed tokens from `start` on end: the first token of the first shard, from
        `start`'s on, that is not committed (at most `start`'s shard's first token if it is not)."""
        s = start // self.layout.shard_tokens
        while s in self.manifest.shards:
            s += 1
        return min(s * self.layout.shard_tokens, self.layout.num_tokens)

    def committed_chunks(self) -> list[int]:
        return [c for s in self.committed_shards for c in self.layout.shard_chunks(s)]

    def stats(self, layer: int | str) -> RunningStats:
        name = self.resolve(layer)
        if name not in self.manifest.stats:
            raise UserError(f"store {self.path} has no statistics of {name} yet: none of it is committed")
        return self.manifest.stats[name]

    def resolve(self, layer: int | str) -> str:
        """The array name of a layer number (3, "3") or name (`layer_3`, a hookpoint)."""
        if isinstance(layer, bool):  # an int to Python, never meant as a layer
            raise UserError(f"layer {layer!r} is not a layer; pass a number (3) or an array name ({self.layers[0]!r})")
        if isinstance(layer, numbers.Integral) or (isinstance(layer, torch.Tensor) and layer.numel() == 1):
            name = layer_key(_position(layer, "layer"))
        elif isinstance(layer, str) and layer.strip().isdigit() and layer not in self.meta["arrays"]:
            name = layer_key(int(layer))
        else:
            name = layer
        if name not in self.meta["arrays"]:
            raise UserError(f"store {self.path} has no layer {layer!r}; it has: {', '.join(self.layers)}")
        return name

    # ---------------------------------------------------------------------------------- data
    @cached_property
    def _arrays(self) -> dict:
        """The Zarr arrays by name; one whose metadata is gone or damaged is a one-line error (no
        re-collection of shards brings metadata back)."""
        arrays = {}
        for name in ["tokens", *self.layers]:
            rel = "tokens" if name == "tokens" else array_path(name)
            try:
                arrays[name] = self.group[rel]
            except Exception as e:  # noqa: BLE001 - zarr raises several types for missing or damaged metadata
                raise UserError(
                    f"store {self.path}: the metadata of {name} ({rel}/zarr.json) is missing or damaged "
                    f"({type(e).__name__}); restore it from a copy, or collect the store again (--overwrite)"
                ) from None
        return arrays

    def _check_committed(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= self.layout.num_tokens:
            raise UserError(f"token range [{start}, {stop}) is outside the store (0..{self.layout.num_tokens})")
        if stop == start:
            return
        st = self.layout.shard_tokens
        missing = [s for s in range(start // st, (stop - 1) // st + 1) if s not in self.manifest.shards]
        if missing:
            why = self.manifest.recollect.get(missing[0])
            raise UserError(
                f"tokens [{start}, {stop}) include shard {missing[0]}, which is not committed"
                + (f" (set aside by verification: {why}); finish the collection" if why else
                   "; wait for a running collection to commit it (then `refresh()`), or finish it")
                + f" with `actcache collect --resume` (committed tokens: {self.num_tokens})"
            )

    def check_shard_files(self) -> None:
        """Every committed shard file present with its recorded size (a `stat` each, no reading):
        what a damaged store shows before a long run starts, not in its middle."""
        for shard, why in damaged_shards(self.path, self.manifest).items():
            raise StoreCorruptError(f"store {self.path}: shard {shard} is damaged ({why}); {REPAIR_HINT}")

    def _check_files(self, name: str, start: int, stop: int) -> None:
        """A committed shard's file that is gone would read back as zeros (Zarr's fill value): refuse."""
        prefix = ("tokens" if name == "tokens" else array_path(name)) + "/"
        st = self.layout.shard_tokens
        for s in range(start // st, (stop - 1) // st + 1) if stop > start else ():
            for rel in self.manifest.shards[s].files:
                if rel.startswith(prefix) and not (self.path / rel).is_file():
                    raise StoreCorruptError(
                        f"store {self.path}: {rel} (shard {s} of {name}) is missing; {REPAIR_HINT}"
                    )

    def _read(self, name: str, start: int, stop: int | None) -> np.ndarray:
        if self._root_identity() != self._identity:
            raise UserError(f"store {self.path} was collected again (or deleted) since it was opened; call "
                            "refresh() or open it again")
        start = _position(start, "start")
        if stop is None:  # to the end of the committed run `start` is in (none if its shard is not committed)
            stop = max(self.committed_end(start), start)
        stop = _position(stop, "stop")
        self._check_committed(start, stop)
        self._check_files(name, start, stop)
        array = self._arrays[name]
        step = self.layout.chunk_tokens
        pieces = [(a, min(a - a % step + step, stop)) for a in [start, *range(start - start % step + step, stop, step)]]
        try:
            if len(pieces) == 1:
                return array[start:stop]
            # Chunk by chunk, several at a time: where one fails, the reads of the others end on their own
            # (one read of many chunks leaves zarr's tasks for the rest pending, reported at exit).
            out = np.empty((stop - start, *array.shape[1:]), dtype=array.dtype)

            def piece(a: int, b: int) -> None:
                out[a - start : b - start] = array[a:b]

            with ThreadPoolExecutor(min(READ_THREADS, len(pieces)), thread_name_prefix="store-read") as pool:
                for f in [pool.submit(piece, a, b) for a, b in pieces]:
                    f.result()
            return out
        except Exception as e:
            raise StoreCorruptError(
                f"store {self.path}: reading {name} tokens [{start}, {stop}) failed ({type(e).__name__}: {e}); "
                f"a chunk is corrupt or missing; {REPAIR_HINT}"
            ) from None

    def read(self, layer: int | str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Activations of tokens `[start, stop)`, `(stop - start, d)` in the logical dtype
        (`stop=None`: up to the first shard, from `start`'s on, not committed)."""
        name = self.resolve(layer)
        return from_storage(self._read(name, start, stop), self.dtype_name)

    def read_chunk(self, layer: int | str, chunk: int) -> torch.Tensor:
        """Activations of chunk `chunk` (`0 .. layout.num_chunks - 1`), the unit training reads."""
        chunk = _position(chunk, "chunk")
        if not 0 <= chunk < self.layout.num_chunks:
            raise UserError(f"chunk {chunk} is out of range: store {self.path} has chunks 0-{self.layout.num_chunks - 1}")
        r = self.layout.chunk_tokens_range(chunk)
        return self.read(layer, r.start, r.stop)

    def tokens(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Token ids of `[start, stop)` (int64; `stop=None`: up to the first shard, from `start`'s on, not committed)."""
        return torch.from_numpy(self._read("tokens", start, stop).astype(np.int64))

    def __repr__(self) -> str:
        return (
            f"ActivationStore({str(self.path)!r}, model={self.meta['model']['id']!r}, "
            f"layers={self.layers}, tokens={self.num_tokens}/{self.layout.num_tokens}, dtype={self.dtype_name})"
        )


def _position(value, what: str) -> int:
    """An integer position (int, numpy or 0-d torch integer); anything else is a one-line error."""
    try:
        return operator.index(value)
    except TypeError:
        raise UserError(f"{what} must be an integer, got {value!r} ({type(value).__name__})") from None


def open_store(path: str | Path) -> ActivationStore:
    return ActivationStore(path)
