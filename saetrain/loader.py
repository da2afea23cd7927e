"""Streaming a store into training batches: windowed token shuffle, read-ahead, exact resume.

See `order.py` for the order itself. A background thread reads the next windows (every
chunk of every requested layer plus the token ids, in a thread pool), drops excluded
tokens, checks for NaN/inf, and permutes the window; the caller slices batches from it,
pinned and copied to the device asynchronously.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from sae_core import UserError
from sae_core.store import ActivationStore

from .order import epoch_windows, window_permutation


@dataclass
class Batch:
    token_index: torch.Tensor  # (B,) int64 positions in the store
    acts: dict[str, torch.Tensor]  # layer -> (B, d) on the device, storage dtype


class StoreLoader:
    def __init__(
        self,
        store: ActivationStore,
        layers: list[str],
        chunks: list[int],
        *,
        seed: int,
        window: int = 64,
        rank: int = 0,
        world: int = 1,
        exclude_first_tokens: int = 0,
        exclude_token_ids: list[int] | None = None,
        device: torch.device | str = "cpu",
        read_threads: int = 4,
        prefetch: int = 1,
    ):
        if window < 1:
            raise UserError(f"--shuffle-window must be at least 1 chunk, got {window}")
        self.store = store
        self.layers = layers
        self.chunks = list(chunks)
        self.seed, self.window, self.rank, self.world = seed, window, rank, world
        self.exclude_first = exclude_first_tokens
        self.exclude_ids = np.asarray(sorted(set(exclude_token_ids or [])), dtype=np.int64)
        self.device = torch.device(device)
        self.read_threads = read_threads
        self.prefetch = prefetch
        self._kept_counts: dict[int, int] | None = None

    # ------------------------------------------------------------------------- pure-ish parts
    def kept_mask(self, chunk: int, tokens: np.ndarray | None = None) -> np.ndarray:
        r = self.store.layout.chunk_tokens_range(chunk)
        keep = (np.arange(r.start, r.stop) % self.store.layout.ctx_len) >= self.exclude_first
        if len(self.exclude_ids):
            if tokens is None:
                tokens = self.store.tokens(r.start, r.stop).numpy()
            keep &= ~np.isin(tokens, self.exclude_ids)
        return keep

    def kept_counts(self) -> dict[int, int]:
        """Kept tokens per chunk (reads the token ids once if ids are excluded)."""
        if self._kept_counts is None:
            self._kept_counts = {c: int(self.kept_mask(c).sum()) for c in self.chunks}
        return self._kept_counts

    def windows(self, epoch: int) -> list[list[int]]:
        return epoch_windows(self.chunks, seed=self.seed, epoch=epoch, window=self.window, rank=self.rank, world=self.world)

    def epoch_tokens(self, epoch: int) -> int:
        counts = self.kept_counts()
        return sum(counts[c] for w in self.windows(epoch) for c in w)

    # ------------------------------------------------------------------------------ reading
    def _read_window(self, pool: ThreadPoolExecutor, epoch: int, w: int, chunks: list[int], halt=None):
        layout = self.store.layout
        futs = {
            (name, c): pool.submit(self.store.read_chunk, name, c) for c in chunks for name in self.layers
        }
        idx_parts, keep_parts = [], []
        for c in chunks:
            r = layout.chunk_tokens_range(c)
            tokens = self.store.tokens(r.start, r.stop).numpy() if len(self.exclude_ids) else None
            keep = self.kept_mask(c, tokens)
            keep_parts.append(keep)
            idx_parts.append(np.arange(r.start, r.stop)[keep])
        token_index = torch.from_numpy(np.concatenate(idx_parts))
        perm = torch.from_numpy(window_permutation(len(token_index), seed=self.seed, epoch=epoch, window=w, rank=self.rank))
        acts = {}
        keep_all = all(k.all() for k in keep_parts)
        for name in self.layers:
            if halt is not None and halt.is_set():  # the consumer stopped: leave the rest unread
                raise _Halted
            parts = [futs[name, c].result() for c in chunks]
            if not keep_all:
                parts = [p[torch.from_numpy(k)] for p, k in zip(parts, keep_parts, strict=True)]
            x = torch.cat(parts)
            # A NaN or inf anywhere in a row makes its (fp32) sum non-finite: one pass, no bool matrix.
            bad = ~torch.isfinite(x.sum(dim=1, dtype=torch.float32))
            if bad.any():
                where = int(token_index[bad.nonzero()[0, 0]])
                token_id = int(self.store.tokens(where, where + 1)[0])
                raise UserError(
                    f"store {self.store.path}: {name} has NaN or inf activations ({int(bad.sum())} tokens in this "
                    f"window, first at token {where}: sequence {where // layout.ctx_len}, position "
                    f"{where % layout.ctx_len}, token id {token_id}); exclude them "
                    "(--exclude-token-ids / --exclude-first-tokens) or re-collect in a wider dtype"
                )
            acts[name] = x[perm]
        return token_index[perm], acts

    def check_finite(self, windows: int | None = None) -> None:
        """Read every chunk once (or those of the first `windows` windows), raising as training would on a
        kept NaN or inf token."""
        with ThreadPoolExecutor(self.read_threads, thread_name_prefix="saetrain-check") as pool:
            for w, chunks in enumerate(self.windows(0)):
                if windows is not None and w >= windows:
                    return
                self._read_window(pool, 0, w, chunks)

    def _producer(self, epoch: int, first_window: int, q: queue.Queue, halt: threading.Event) -> None:
        pool = ThreadPoolExecutor(self.read_threads, thread_name_prefix="saetrain-read")
        try:
            for w, chunks in enumerate(self.windows(epoch)):
                if w >= first_window and not _put(q, self._read_window(pool, epoch, w, chunks, halt), halt):
                    return
            _put(q, None, halt)
        except _Halted:
            pass
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            _put(q, e, halt)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # reads not started are dropped

    def batches(
        self, epoch: int, batch_size: int, *, start: int = 0, stop: int | None = None, group: int = 1
    ) -> Iterator[Batch]:
        """Batches of `batch_size` tokens from kept-token offset `start` to `stop` of this rank's epoch,
        in groups of `group` (the accumulation steps of one optimizer step).

        A tail shorter than half a group joins the group before it, its tokens spread evenly over
        that group's batches (each then holds up to 1.5 x `batch_size` tokens): no step trains on a
        handful of tokens, and every token is used.
        """
        total = self.epoch_tokens(epoch)
        stop = total if stop is None else min(stop, total)
        counts = self.kept_counts()
        sizes = [sum(counts[c] for c in w) for w in self.windows(epoch)]
        first, skip = 0, start
        while first < len(sizes) and skip >= sizes[first]:
            skip -= sizes[first]
            first += 1
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        halt = threading.Event()
        thread = threading.Thread(target=self._producer, args=(epoch, first, q, halt), daemon=True, name="saetrain-loader")
        thread.start()
        pending_idx: list[torch.Tensor] = []
        pending: dict[str, list[torch.Tensor]] = {n: [] for n in self.layers}
        have, pos, targets = 0, start, []  # targets: sizes of the batches left in the current group
        try:
            while pos < stop:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    break
                idx, acts = item
                if skip:
                    idx, acts = idx[skip:], {n: a[skip:] for n, a in acts.items()}
                    skip = 0
                off = 0
                while off < len(idx) and pos < stop:
                    if have == 0 and not targets:
                        targets = _group_sizes(stop - pos, batch_size, group)
                    target = targets[0]
                    take = min(target - have, len(idx) - off, stop - pos)
                    pending_idx.append(idx[off : off + take])
                    for n in self.layers:
                        pending[n].append(acts[n][off : off + take])
                    have, off, pos = have + take, off + take, pos + take
                    if have == target:
                        yield self._emit(pending_idx, pending)
                        pending_idx, pending, have = [], {n: [] for n in self.layers}, 0
                        targets.pop(0)
        finally:
            # Wait for the reader (at most the chunk reads in flight): a thread still inside zarr
            # or numpy when the interpreter exits can abort it (SIGABRT after a finished run).
            halt.set()
            thread.join()

    def _emit(self, idx: list[torch.Tensor], acts: dict[str, list[torch.Tensor]]) -> Batch:
        cuda = self.device.type == "cuda"
        out = {}
        for n, parts in acts.items():
            x = torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()
            out[n] = x.pin_memory().to(self.device, non_blocking=True) if cuda else x
        return Batch(torch.cat(idx), out)


class _Halted(Exception):
    """The consumer of the batches stopped while a window was being read."""


def _put(q: queue.Queue, item, halt: threading.Event) -> bool:
    """Put `item` on the bounded queue unless the consumer stops first (then False)."""
    while not halt.is_set():
        try:
            q.put(item, timeout=0.2)
            return True
        except queue.Full:
            pass
    return False


def _group_sizes(remaining: int, batch_size: int, group: int) -> list[int]:
    """Sizes of the next `group` batches with `remaining` tokens left: `batch_size` each, unless
    what would be left after them is under half a group, which the group then takes, spread evenly."""
    step = batch_size * group
    if remaining >= step + step // 2:
        return [batch_size] * group
    sizes = [remaining // group + (i < remaining % group) for i in range(group)]
    return [n for n in sizes if n]
