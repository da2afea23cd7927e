"""Packing for collection: tokenize documents, pack them into `ctx_len` sequences, order them.

The order of a collection is a pure function of the data, the tokenizer, `ctx_len` and the seed:

1. the documents in a seeded order (a permutation of their positions). A document is a row of a
   table or a text file; a text file over 1 MiB is cut at blank lines into documents of about
   256 KiB, read only when needed (a compressed one is first decompressed into the cache);
2. tokenized whole and joined with the EOS token in that order, then cut into `ctx_len`
   sequences (the remainder is dropped): a sequence may span a document boundary, never a
   line-by-line split. A pre-tokenized dataset (`input_ids` column) is used as it is;
3. each block of `shuffle_block(ctx_len)` consecutive sequences (2**20 tokens) in a seeded
   order of its own, so that neighbours in the store come from different documents.

A window of that order (`--skip-tokens`, `--max-tokens`) needs the documents only up to the
end of its last block: a 10M-token collection from a 1T-token dataset tokenizes ~10M tokens.
The packed sequences of data of 16 MB or more are cached (`$SAE_CORE_CACHE/packed/`, keyed
by the data's files or `datasets` fingerprint, the tokenizer, `ctx_len` and the seed) and
extended on demand, so resuming a collection or collecting the next window does not tokenize
anything twice, and ranks under torchrun tokenize once between them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sae_core import UserError
from sae_core.models import cache_dir
from sae_core.store.manifest import atomic_write

from .data import Documents, prune_cache

# Bumped whenever packing changes what it produces, so that older cache entries are not used.
PACK_VERSION = 4
# Data smaller than this (about 4M tokens of text) packs in seconds: it is not cached.
CACHE_MIN_BYTES = 16 << 20
# Sequences are shuffled within blocks of this many tokens (see the module docstring).
BLOCK_TOKENS = 1 << 20
# Documents tokenized per call of the tokenizer: at most TOKENIZE_BATCH, and at first TOKENIZE_FIRST
# (until the sequences per document are known, then as many as the sequences still needed take).
TOKENIZE_BATCH = 64
TOKENIZE_FIRST = 4


def shuffle_block(ctx_len: int) -> int:
    """Sequences per block of the order (step 3 of the module docstring)."""
    return max(1, BLOCK_TOKENS // ctx_len)


def _rng(seed: int, *path: int) -> np.random.Generator:
    return np.random.default_rng([seed % 2**64, *path])


def document_order(num_docs: int, seed: int | None) -> np.ndarray:
    """Step 1: the documents' positions in collection order (None keeps the dataset's order)."""
    return np.arange(num_docs) if seed is None else _rng(seed, 0).permutation(num_docs)


@dataclass
class PackState:
    """Where packing stands: enough to continue it later (it is saved beside the cached sequences)."""

    sequences: int = 0
    docs_done: int = 0
    """Documents consumed, in the document order."""
    pending: list[int] = field(default_factory=list)
    """Tokens carried into the next sequence."""
    tokens_seen: int = 0
    docs_with_tokens: int = 0
    done: bool = False
    """Every document is consumed."""


def _pack_more(docs: Documents, tokenizer, ctx_len: int, order: np.ndarray, state: PackState, limit: float) -> Iterator[np.ndarray]:
    """Pack the next documents of `order` until `state.sequences >= limit` or they run out, a batch of
    documents at a time; yields each batch's new `(m, ctx_len)` int32 sequences and updates `state`."""
    eos = None if docs.tokenized else getattr(tokenizer, "eos_token_id", None)
    while state.sequences < limit and not state.done:
        batch = TOKENIZE_BATCH
        if state.sequences and limit < float("inf"):  # no more documents than the sequences so far say are needed
            batch = min(batch, math.ceil((limit - state.sequences) * state.docs_done / state.sequences * 1.1))
        elif not state.sequences:
            batch = min(batch, TOKENIZE_FIRST)
        idx = order[state.docs_done : state.docs_done + batch].tolist()
        state.done = state.docs_done + len(idx) >= len(order)
        state.docs_done += len(idx)
        rows = docs.fetch(idx)
        if not docs.tokenized:
            texts = [t for t in rows if t]
            rows = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
        out, pending = [], state.pending
        for i, ids in enumerate(rows):
            if docs.tokenized:
                ids = _token_ids(ids, docs, idx[i])
            if len(ids) == 0:
                continue
            state.docs_with_tokens += 1
            state.tokens_seen += len(ids)
            if docs.tokenized and len(ids) == ctx_len and not pending:
                out.append(np.asarray(ids, dtype=np.int32))  # already packed
                continue
            pending.extend(ids)
            if eos is not None:
                pending.append(eos)
            cut = len(pending) // ctx_len * ctx_len
            if cut:
                out.extend(np.asarray(pending[:cut], dtype=np.int32).reshape(-1, ctx_len))
                del pending[:cut]
        state.sequences += len(out)
        yield np.stack(out) if out else np.empty((0, ctx_len), dtype=np.int32)


def _token_ids(row, docs: Documents, doc: int) -> list[int]:
    """A pre-tokenized row as token ids, refused unless it is a flat list of whole numbers >= 0."""
    try:
        ids = np.asarray(row)
    except (TypeError, ValueError):
        ids = np.asarray(row, dtype=object)
    if ids.ndim == 1 and ids.size == 0:
        return []
    if ids.ndim != 1 or ids.dtype.kind not in "iu" or int(ids.min()) < 0 or int(ids.max()) >= 2**31:
        shown = repr(row) if len(repr(row)) <= 60 else f"{repr(row)[:57]}..."
        raise UserError(f"dataset {docs.id}: input_ids of row {doc} must be a list of token ids (whole numbers from 0), "
                        f"got {shown}; tokenize the text again with the model's tokenizer")
    return ids.tolist()


def _check_not_empty(docs: Documents, state: PackState, ctx_len: int) -> None:
    if state.done and state.sequences == 0:
        if state.docs_with_tokens == 0:
            raise UserError(f"dataset {docs.id} is empty; point --dataset at data with at least one document")
        raise UserError(
            f"dataset {docs.id} has {state.tokens_seen} tokens, fewer than --ctx-len {ctx_len}; lower --ctx-len or add data"
        )


def pack(docs: Documents, tokenizer, ctx_len: int, seed: int | None = None) -> np.ndarray:
    """Steps 1-2 in memory, without the cache: every sequence, `(num_sequences, ctx_len)` int32."""
    return packed_prefix(docs, tokenizer, ctx_len, seed, float("inf"), cache=False)[0]


def packed_prefix(
    docs: Documents, tokenizer, ctx_len: int, seed: int | None, need: float, *, cache: bool = True
) -> tuple[np.ndarray, bool]:
    """Steps 1-2 up to at least `need` sequences (fewer where the data ends first): the sequences (a
    memory map when cached) and whether they are all there are."""
    if docs.num_docs == 0:
        raise UserError(f"dataset {docs.id} is empty; point --dataset at data with at least one document")
    path = _cache_path(docs, tokenizer, ctx_len, seed) if cache else None
    result = None
    if path is not None:
        with contextlib.suppress(OSError):  # the cache is an optimisation: a full or read-only disk only costs time
            result = _cached_prefix(path, docs, tokenizer, ctx_len, seed, need)
    if result is None:
        state = PackState()
        parts = list(_pack_more(docs, tokenizer, ctx_len, document_order(docs.num_docs, seed), state, need))
        result = np.concatenate(parts) if parts else np.empty((0, ctx_len), dtype=np.int32), state
    seqs, state = result
    _check_not_empty(docs, state, ctx_len)
    return seqs, state.done


def _cached_prefix(path: Path, docs: Documents, tokenizer, ctx_len: int, seed, need: float) -> tuple[np.ndarray, PackState]:
    """`packed_prefix` through the cache folder `path`: sequences appended to `sequences.i32` and the
    packing state in `state.json` (replaced after the sequences it counts are on disk), one process
    at a time extending them (an flock); the others wait, then read. Creating an entry deletes the
    entries no run has used for CACHE_MAX_AGE_DAYS."""
    if not path.is_dir():
        prune_cache(path.parent)
    path.mkdir(parents=True, exist_ok=True)
    os.utime(path)  # last used: now
    data, state_file = path / "sequences.i32", path / "state.json"
    row_bytes = ctx_len * 4
    with open(path / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = PackState()
        with contextlib.suppress(FileNotFoundError, ValueError, TypeError):
            state = PackState(**json.loads(state_file.read_text()))
        if state.sequences < need and not state.done:
            with open(data, "a+b") as f:
                f.truncate(state.sequences * row_bytes)  # drop what a crash left beyond the saved state
                order = document_order(docs.num_docs, seed)
                for i, seqs in enumerate(_pack_more(docs, tokenizer, ctx_len, order, state, need)):
                    f.write(seqs.tobytes())
                    if i % 256 == 255 or state.sequences >= need or state.done:
                        f.flush()
                        os.fsync(f.fileno())
                        atomic_write(state_file, json.dumps(asdict(state)))
    if state.sequences == 0:
        return np.empty((0, ctx_len), dtype=np.int32), state
    return np.memmap(data, dtype=np.int32, mode="r", shape=(state.sequences, ctx_len)), state


def _cache_path(docs: Documents, tokenizer, ctx_len: int, seed: int | None) -> Path | None:
    if docs.content_key is None or (docs.nbytes is not None and docs.nbytes < CACHE_MIN_BYTES):
        return None
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast tokenizer: its whole definition
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(f"{type(tokenizer).__name__}:{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}".encode())
    eos = getattr(tokenizer, "eos_token_id", None)
    h.update(json.dumps([PACK_VERSION, docs.content_key, docs.tokenized, eos, ctx_len, seed]).encode())
    return cache_dir() / "packed" / h.hexdigest()[:32]


def window(
    docs: Documents, tokenizer, ctx_len: int, seed: int | None, first: int, count: int | None
) -> tuple[np.ndarray, int | None]:
    """Sequences `[first, first + count)` of the collection order (to the end when `count` is None),
    and the number of sequences the data holds if packing reached its end (else None). The result
    is shorter where the data ends first, and empty when it ends before `first`."""
    block = shuffle_block(ctx_len)
    need = float("inf") if count is None else -(-(first + count) // block) * block
    seqs, done = packed_prefix(docs, tokenizer, ctx_len, seed, need)
    n = len(seqs)
    stop = n if count is None else min(first + count, n)
    parts = [np.empty((0, ctx_len), dtype=np.int32)]
    for b in range(first // block, -(-stop // block)):
        lo, hi = b * block, min((b + 1) * block, n)
        part = np.asarray(seqs[lo:hi])
        if seed is not None:  # step 3
            part = part[_rng(seed, 1, b).permutation(hi - lo)]
        parts.append(part[max(first, lo) - lo : stop - lo])
    return np.concatenate(parts), (n if done else None)


def fingerprint(seqs: np.ndarray) -> str:
    """SHA-256 of the ordered token ids: equal iff the data and its order are equal."""
    h = hashlib.sha256(np.ascontiguousarray(seqs, dtype="<i4").tobytes())
    h.update(str(seqs.shape).encode())
    return h.hexdigest()
