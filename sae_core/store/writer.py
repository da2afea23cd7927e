"""Writing a store: create or reopen it, then write and commit shards in background threads.

The caller (the collection loop) hands over one shard at a time: every array's rows for
that shard. Layers are compressed and written in a thread pool, each shard file whole; a
commit thread then checksums the files and atomically replaces this writer's manifest,
in shard order. The caller blocks only when `max_pending` shards are already in flight.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .format import (
    ATTRS_KEY,
    CREATING_KEY,
    FORMAT_NAME,
    FORMAT_VERSION,
    LOCK_FILE,
    STORAGE_DTYPES,
    array_path,
    compressors,
    shard_file,
    store_state,
    to_storage,
)
from .layout import StoreLayout
from .manifest import (
    Manifest,
    ShardRecord,
    atomic_write,
    file_crc32,
    manifest_files,
    read_manifests,
)
from .stats import RunningStats

# What must match for --resume to continue a store (and the flag that sets each).
RESUME_KEYS = {
    "model": "--model/--revision/--gguf-file/--model-dtype/--load-in-8bit",
    "arrays": "--layers/--hookpoints",
    "dtype": "--dtype",
    "ctx_len": "--ctx-len",
    "data": "--dataset/--dataset-config/--split/--text-column/--seed/--max-tokens/--skip-tokens",
    "layout": "--seqs-per-shard/--chunk-tokens",
    "codec": "--codec",
}


class DiskFullError(UserError):
    pass


def _write_root(path: Path, attributes: dict) -> None:
    """The group's zarr.json, replaced atomically."""
    atomic_write(path / "zarr.json", json.dumps({"attributes": attributes, "zarr_format": 3, "node_type": "group"}))


def create_store(path: Path, meta: dict, layout: StoreLayout, arrays: dict[str, int], codec: str) -> None:
    """Create the group, its metadata and empty arrays (no chunk is written) in `path`, an empty folder.

    The group's zarr.json is written first, marked as being created (CREATING_KEY): a crash from
    then on leaves a folder `--overwrite` and `--resume` recognise as an actcache store in which
    nothing is committed. The metadata replaces the mark once every array exists.
    """
    import zarr

    path.mkdir(parents=True, exist_ok=True)
    _write_root(path, {CREATING_KEY: {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}})
    group = zarr.open_group(str(path), mode="r+", zarr_format=3)
    storage = STORAGE_DTYPES[meta["dtype"]]
    for name, d in arrays.items():
        group.create_array(
            array_path(name),
            shape=(layout.num_tokens, d),
            chunks=(layout.chunk_tokens, d),
            shards=(layout.shard_tokens, d),
            dtype=storage,
            compressors=compressors(codec),
            fill_value=0,
        )
    group.create_array(
        "tokens",
        shape=(layout.num_tokens,),
        chunks=(layout.chunk_tokens,),
        shards=(layout.shard_tokens,),
        dtype="int32",
        compressors=compressors(codec),
        fill_value=0,
    )
    # An empty manifest: from now on a store without one has lost its commit record (`verify` says so).
    Manifest().save(path, None)
    # Metadata last: a store whose creation crashed has only the mark and is created afresh.
    _write_root(path, {ATTRS_KEY: {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **meta,
                                   "layout": layout.to_dict()}})


def clear_folder(path: Path) -> None:
    """Delete everything in `path` but the writer lock (held by the caller)."""
    for p in path.iterdir():
        if p.name == LOCK_FILE:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _stored_meta(path: Path) -> dict | None:
    """The metadata the store at `path` was created with (None where there is no readable store of ours)."""
    import zarr

    try:
        old = zarr.open_group(str(path), mode="r", zarr_format=3).attrs.get(ATTRS_KEY)
    except Exception:  # noqa: BLE001 - no store, or not a readable one
        return None
    return old if isinstance(old, dict) and old.get("format") == FORMAT_NAME else None


def stored_layout(path: Path) -> StoreLayout | None:
    """The layout the store at `path` was made with (None where there is no readable store)."""
    try:
        return StoreLayout(**_stored_meta(path)["layout"])
    except (TypeError, KeyError, ValueError):  # no store, or its layout unreadable: the caller plans afresh
        return None


def check_resumable(path: Path, meta: dict, layout: StoreLayout) -> None:
    """Refuse to resume a store written with different settings, naming what differs."""
    old = _stored_meta(path)
    if old is None:
        hint = "pass --overwrite to start again" if is_store(path) else "choose another --out"
        raise UserError(f"{path} is not a resumable actcache store; {hint}")
    new = {**meta, "layout": layout.to_dict()}
    for key, flag in RESUME_KEYS.items():
        a, b = old.get(key), new.get(key)
        if key == "data" and isinstance(a, dict) and isinstance(b, dict) and a.get("fingerprint") == b.get("fingerprint"):
            a, b = ({k: v for k, v in d.items() if k != "packing"} for d in (a, b))  # same data: only the words differ
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):  # name the entry that differs, not the whole dict
                # the setting that differs (a model's id first) before what follows from it (its width, the
                # data's description and fingerprint); an entry missing from an older store equals None (a
                # setting added since, left unset)
                order = sorted(a.keys() | b.keys(), key=lambda k: (k != "id", k == "fingerprint", k == "packing", str(k)))
                sub = next((k for k in order if a.get(k) != b.get(k)), None)
                if sub is None:
                    continue
                key, a, b = f"{key}.{sub}", a.get(sub), b.get(sub)
            if key == "data.packing":  # not a setting: the store predates the current data order
                raise UserError(
                    f"cannot resume {path}: an older actcache wrote it with another data order ({_short(a)}); "
                    "collect it afresh with --overwrite"
                )
            raise UserError(
                f"cannot resume {path}: {key} differs (store: {_short(a)}, now: {_short(b)}); "
                f"use the same {flag} as the first run, or --overwrite"
            )


def _short(v) -> str:
    s = repr(v)
    return s if len(s) < 120 else s[:117] + "..."


def consolidate_manifests(path: Path) -> Manifest:
    """Fold per-rank manifests into manifest.json (then delete them); return the result."""
    merged = read_manifests(path)
    files = manifest_files(path)
    if any(p.name != "manifest.json" for p in files):
        merged.save(path, None)
        for p in files:
            if p.name != "manifest.json":
                p.unlink(missing_ok=True)
    return merged


def lock_store(path: Path):
    """Hold an exclusive lock on the store for this process's lifetime: one collection at a time."""
    import fcntl

    f = open(path / LOCK_FILE, "a")  # noqa: SIM115 - kept open while the process writes
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise UserError(f"another `actcache collect` is writing {path}; wait for it to finish or stop it") from None
    return f


def is_store(path: Path) -> bool:
    """Whether `path` holds an actcache store (perhaps one whose creation or collection crashed)."""
    return store_state(path) in ("store", "creating")


def check_writable(path: Path) -> None:
    """Refuse an --out that cannot be created: under a file, or in a folder this process cannot write."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    if existing != path and not existing.is_dir():
        raise UserError(f"cannot create {path}: {existing} is a file; choose another --out")
    target = path if existing == path else existing
    if not os.access(target, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {target} (permission denied or read-only); choose another --out")


def check_disk_space(path: Path, needed: int) -> None:
    existing = path
    while not existing.exists():  # the store (and maybe its parents) will be created
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise UserError(
            f"not enough disk for {path}: the run needs about {needed / 1e9:.2f} GB "
            f"(uncompressed upper bound) and {free / 1e9:.2f} GB are free; free space, lower --max-tokens "
            "or collect fewer layers"
        )


class ShardWriter:
    """One writer of a store (one per rank). Not thread-safe: one caller submits."""

    def __init__(
        self,
        path: Path,
        *,
        layout: StoreLayout,
        dtype: str,
        manifest: Manifest,
        rank: int | None = None,
        num_threads: int = 2,
        max_pending: int = 2,
        fsync: bool = True,
        on_commit: Callable[[int, int], None] | None = None,
        counted: frozenset[int] = frozenset(),
    ):
        import zarr

        self.path = path
        self.layout = layout
        self.dtype = dtype
        self.rank = rank
        self.manifest = manifest
        self.fsync = fsync
        self.on_commit = on_commit
        # Shards whose statistics the store already counts (set aside after failing verification):
        # re-collecting one adds its files, not its statistics again.
        self.counted = counted | set(manifest.recollect)
        group = zarr.open_group(str(path), mode="r+", zarr_format=3)
        self.arrays = {name: group[array_path(name)] for name in group.attrs[ATTRS_KEY]["arrays"]}
        self.tokens = group["tokens"]
        self.pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="actcache-write")
        self.max_pending = max_pending
        self.slots = threading.Semaphore(max_pending)
        self.commits: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.committer = threading.Thread(target=self._commit_loop, name="actcache-commit", daemon=True)
        self.committer.start()

    # ------------------------------------------------------------------------------ caller
    def submit(
        self, shard: int, acts: dict[str, torch.Tensor], tokens: np.ndarray, ready: Callable[[], None] | None = None
    ) -> None:
        """Queue one shard: `acts[name]` is `(shard tokens, d)` on the CPU; `ready()` waits for its copy."""
        self._raise_if_failed()
        while not self.slots.acquire(timeout=0.5):
            self._raise_if_failed()
        rows = self.layout.shard_tokens_range(shard)
        futures = {name: self.pool.submit(self._write_array, name, shard, rows, x, ready) for name, x in acts.items()}
        futures["tokens"] = self.pool.submit(self._write_tokens, shard, rows, tokens)
        self.commits.put((shard, rows, futures))

    def close(self) -> None:
        """Wait for every queued shard to be committed; raise the first error, if any."""
        self.commits.put(None)
        self.committer.join()
        self.pool.shutdown(wait=True)
        self._raise_if_failed()

    def abort(self) -> None:
        """Stop after the shards already handed over (used when the caller fails)."""
        try:
            self.close()
        except BaseException:
            pass

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            err = self.error
            if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                raise DiskFullError(
                    f"disk full while writing {self.path}; {self.committed_tokens} tokens are committed and intact: "
                    "free space and run the same command with --resume"
                ) from None
            raise err

    @property
    def committed_tokens(self) -> int:
        return sum(r.tokens[1] - r.tokens[0] for r in self.manifest.shards.values())

    # ---------------------------------------------------------------------------- threads
    def _write_array(self, name: str, shard: int, rows: range, x: torch.Tensor, ready) -> tuple:
        if ready is not None:
            ready()
        data = to_storage(x, self.dtype)
        # The shard is written whole: drop a leftover (maybe torn) file of an uncommitted shard
        # first, or zarr would try to read and merge it.
        (self.path / shard_file(array_path(name), shard, 2)).unlink(missing_ok=True)
        self.arrays[name][rows.start : rows.stop] = data
        stats = RunningStats.of(x)
        return self._checksum(array_path(name), shard, 2), stats

    def _write_tokens(self, shard: int, rows: range, tokens: np.ndarray) -> tuple:
        (self.path / shard_file("tokens", shard, 1)).unlink(missing_ok=True)
        self.tokens[rows.start : rows.stop] = tokens.astype(np.int32, copy=False)
        return self._checksum("tokens", shard, 1), None

    def _checksum(self, array: str, shard: int, ndim: int) -> tuple[str, dict]:
        rel = shard_file(array, shard, ndim)
        full = self.path / rel
        if self.fsync:
            fd = os.open(full, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return rel, {"crc32": file_crc32(full), "bytes": full.stat().st_size}

    def _commit_loop(self) -> None:
        while (item := self.commits.get()) is not None:
            shard, rows, futures = item
            try:
                if self.error is None:
                    self._commit(shard, rows, futures)
            except BaseException as e:  # noqa: BLE001 - handed to the caller thread
                self.error = e
            finally:
                self.slots.release()

    def _commit(self, shard: int, rows: range, futures: dict[str, Future]) -> None:
        files, stats = {}, dict(self.manifest.stats)
        for name, fut in futures.items():
            (rel, info), s = fut.result()
            files[rel] = info
            if s is not None and shard not in self.counted:
                stats[name] = stats[name].merge(s) if name in stats else s
        shards = {**self.manifest.shards, shard: ShardRecord(shard, (rows.start, rows.stop), files)}
        recollect = {i: why for i, why in self.manifest.recollect.items() if i != shard}
        new = Manifest(shards, stats, recollect)
        new.save(self.path, self.rank)
        self.manifest = new
        if self.on_commit is not None:
            self.on_commit(shard, rows.stop - rows.start)
